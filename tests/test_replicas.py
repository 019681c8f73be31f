"""One gateway over several vLLM replicas (two fake vLLMs on private sockets, with the real S3T middleware; the
run's adapters are real, trained on a tiny model). A deletion is acknowledged only when every replica that
receives traffic has applied it; a replica that fails is fenced (no traffic) until it is reconciled to the
ledger's routing; a replica that comes back with stale adapters is reconciled before its first request."""

import json
import threading
import time

import pytest

pytest.importorskip("torch")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from s3t_llm.deletion import publish  # noqa: E402
from s3t_llm.run import DATASET, Run  # noqa: E402
from s3t_llm.serving import Gateway, free_port, route_shard  # noqa: E402
from tests.test_gateway_http import SocketFake, fake_vllm_app, post, serve_in_thread  # noqa: E402
from tests.test_training import make_cfg  # noqa: E402

TOK = {"authorization": "Bearer rep-token"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, alpaca_sample):
    d = tmp_path_factory.mktemp("replicas")
    data = d / "data.json"
    data.write_text(json.dumps(alpaca_sample[:24]))
    run = Run.create(make_cfg(d, tiny_llama, data, name="rep", extra=["s3t.shards=2", "s3t.slices=2", "s3t.budget=1"]))
    from s3t_llm.training import train_run

    train_run(run, progress=False)
    return run.dir


@pytest.fixture()
def gw2(tmp_path, trained):
    """A fresh copy of the trained run per test (each test deletes), served by a gateway over two replicas."""
    import shutil

    dst = tmp_path / "rep"
    shutil.copytree(trained, dst, ignore=shutil.ignore_patterns("serve.json", "*.log", ".s3t-*"))
    run = Run.open(dst)
    publish(run)
    engines, servers = [], []
    for _ in range(2):
        e = SocketFake()
        servers.append(serve_in_thread(fake_vllm_app(e), uds=e.uds))
        engines.append(e)
    g = Gateway(run, engines, token="rep-token")
    g.check_interval = 3600
    g.reconcile_interval = 3600  # the tests call supervise_once themselves
    g.refresh("start-up")
    port = free_port()
    gsrv, g_t = serve_in_thread(g.app(), host="127.0.0.1", port=port)
    g.url = f"http://127.0.0.1:{port}"
    yield g
    gsrv.should_exit = True
    for s, _ in servers:
        s.should_exit = True
    g_t.join(10)


def routed(g) -> set[str]:
    return {e["name"] for e in g.routing.values() if e}


def victim_of(g, shard=0):
    e = g.routing[shard]
    seq = g.run.sequences[e["sequence"]]
    with g.run.ledger() as led:
        return led.slice_samples(DATASET, shard, seq[e["depth"] - 1])[0][0]


def test_requests_spread_over_replicas_and_the_shard_of_a_prompt_does_not_change(gw2):
    a, b = gw2.replicas[0].server, gw2.replicas[1].server
    assert set(a.ids) == set(b.ids) == routed(gw2)
    live = gw2.live_shards()
    for i in range(12):
        prompt = f"prompt number {i}"
        r = post(gw2, "/v1/completions", {"model": "rep", "prompt": prompt, "max_tokens": 2})
        assert r.status_code == 200
        assert r.headers["x-s3t-shard"] == str(route_shard(prompt, live))  # as with one replica
    na, nb = len(a.requests), len(b.requests)
    assert na + nb == 12 and na >= 4 and nb >= 4, (na, nb)


def test_a_deletion_cuts_long_generations_on_every_replica(gw2):
    old = gw2.routing[0]["name"]
    events: list[list] = [[], []]

    def stream(i):
        with httpx.stream("POST", gw2.url + "/v1/completions", timeout=60, headers={"X-S3T-Shard": "0"},
                          json={"model": "rep", "prompt": f"p{i}", "stream": True, "max_tokens": 2000,
                                "delay": 0.01}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events[i].append((time.time(), line[6:]))

    threads = [threading.Thread(target=stream, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    t_wait = time.time()
    while min(len(e) for e in events) < 5 and time.time() - t_wait < 20:
        time.sleep(0.02)
    assert all(r.outstanding == 1 for r in gw2.replicas)  # one long stream on each replica
    r = post(gw2, "/s3t/delete", {"ids": [victim_of(gw2)], "request_id": "rep-1"}, headers=TOK, timeout=120)
    acked = time.time()
    assert r.status_code == 200, r.text
    for t in threads:
        t.join(30)
    sw = r.json()["switch_report"]
    assert sw["cut_requests"] == 2 and sw["cut"]["engine_quiesced"]
    assert {x["replica"] for x in sw["removed"] if x["name"] == old} == {0, 1}
    for ev in events:
        assert json.loads(ev[-1][1])["error"]["code"] == "deletion_in_progress"
        assert all(t <= acked for t, _ in ev[:-1]) and len(ev) < 2000  # the error event itself may follow
    for rep in gw2.replicas:  # both engines: nothing from the old adapter after the acknowledgement
        assert all(t <= acked for t, m in rep.server.produced if m == old)
        assert old not in rep.server.ids and set(rep.server.ids) == routed(gw2)
    cert = json.loads((gw2.run.dir / "certificates" / "rep-1.json").read_text())
    views = cert["served_after"]["replicas"]
    assert [v["replica"] for v in views] == [0, 1] and all(v["receives_traffic"] for v in views)
    assert all(set(v["engine_adapters"]) == routed(gw2) for v in views)


def test_a_replica_that_fails_the_switch_is_fenced_and_reconciled_before_traffic(gw2):
    a, b = gw2.replicas[0].server, gw2.replicas[1].server
    old = gw2.routing[0]["name"]
    b.fail_next["remove"] = 1  # replica 1 cannot remove the superseded adapter
    r = post(gw2, "/s3t/delete", {"ids": [victim_of(gw2)], "request_id": "rep-2"}, headers=TOK, timeout=120)
    assert r.status_code == 200, r.text  # acknowledged: the replica that receives traffic applied it
    assert gw2.replicas[1].fenced and "remove failed" in gw2.replicas[1].fenced
    assert old in b.ids and old not in a.ids  # the fenced replica still holds it ...
    cert = json.loads((gw2.run.dir / "certificates" / "rep-2.json").read_text())
    views = {v["replica"]: v for v in cert["served_after"]["replicas"]}
    assert views[0]["receives_traffic"] and not views[1]["receives_traffic"] and "remove failed" in views[1]["fenced"]
    # ... and receives no traffic: every request goes to replica 0.
    before = len(b.requests)
    for i in range(6):
        assert post(gw2, "/v1/completions", {"model": "rep", "prompt": f"q{i}", "max_tokens": 1}).status_code == 200
    assert len(b.requests) == before
    m = httpx.get(gw2.url + "/metrics").text
    assert 's3t_replica_fenced{replica="1"} 1.0' in m and 's3t_replica_up{replica="0"} 1.0' in m
    gw2.supervise_once()  # reconcile: the stale adapter goes, the routed ones are checked
    assert gw2.replicas[1].fenced is None and gw2.replicas[1].reconciles == 1
    assert set(b.ids) == routed(gw2) and set(b.engine_loras()) == {b.ids[n] for n in routed(gw2)}
    assert old not in b.ids
    for i in range(6):
        assert post(gw2, "/v1/completions", {"model": "rep", "prompt": f"z{i}", "max_tokens": 1}).status_code == 200
    assert len(b.requests) > before
    assert 's3t_replica_fenced{replica="1"} 0.0' in httpx.get(gw2.url + "/metrics").text


def test_a_replica_back_with_stale_adapters_is_reconciled_before_its_first_request(gw2):
    b = gw2.replicas[1].server
    served = gw2.routing[0]
    stale_files = b.engine[b.ids[gw2.routing[1]["name"]]]["files"]
    # Replica 1 "restarts" with an adapter loaded behind the gateway's back, and wrong weights under a served name.
    gw2._fence(gw2.replicas[1], "process exited with code -9")
    b.engine[777] = {"name": "stale", "path": "/old", "files": dict(stale_files)}
    b.engine[b.ids[served["name"]]]["files"] = dict(stale_files)
    before = len(b.requests)
    for i in range(4):
        assert post(gw2, "/v1/completions", {"model": "rep", "prompt": f"s{i}", "max_tokens": 1}).status_code == 200
    assert len(b.requests) == before  # fenced: no traffic
    rep = gw2.reconcile_replica(gw2.replicas[1])
    assert rep["ok"], rep
    assert 777 not in b.engine and set(b.ids) == routed(gw2)
    assert gw2.check_integrity(repair=False)["ok"]  # digests of every served adapter match their files
    # An integrity problem on one replica of several fences that replica only (the shard stays in service).
    b.engine[b.ids[served["name"]]]["files"] = dict(stale_files)
    res = gw2.check_integrity(repair=False)
    assert not res["ok"] and gw2.replicas[1].fenced and gw2.replicas[0].fenced is None
    assert 0 in gw2.live_shards()
    assert gw2.reconcile_replica(gw2.replicas[1])["ok"] and gw2.check_integrity()["ok"]


# ----- vLLM servers started elsewhere (--upstream): the admin secret and the checks before attaching ---------
def test_an_upstream_is_refused_without_admin_protection_or_with_another_model(monkeypatch, trained):
    from s3t_llm.serving import ServingError, VLLMServer, vllm_command_for

    run = Run.open(trained)
    cmd = vllm_command_for(run.dir, port=8123, admin_token="s3kret")
    assert cmd.startswith("S3T_ADMIN_TOKEN=s3kret ") and "--middleware s3t_llm.vllm_ext.S3TMiddleware" in cmd
    assert "--worker-extension-cls s3t_llm.vllm_ext.S3TWorkerExtension" in cmd and "--port 8123" in cmd
    assert f"--model {run.model_path}" in cmd and "--enable-lora" in cmd

    def upstream(token):
        if token:
            monkeypatch.setenv("S3T_ADMIN_TOKEN", token)
        else:
            monkeypatch.delenv("S3T_ADMIN_TOKEN", raising=False)
        engine = SocketFake()
        port = free_port()
        srv, _ = serve_in_thread(fake_vllm_app(engine), host="127.0.0.1", port=port)
        return srv, f"http://127.0.0.1:{port}"

    # An unprotected vLLM: anyone who reaches it could change what is served. Refused.
    srv, url = upstream(None)
    att = VLLMServer.attach(url, run.model_path, admin_token="s3kret", max_loras=4, max_lora_rank=8)
    with pytest.raises(ServingError, match="without the secret"):
        att.check_upstream()
    srv.should_exit = True
    # A protected one: without the header every admin path is refused (403), with it the middleware lets it pass.
    srv, url = upstream("s3kret")
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/collective_rpc", "/reset_prefix_cache",
                 "/s3t/flights", "/v1/completions"):
        r = httpx.post(url + path, json={"lora_name": "x", "lora_path": "/tmp/x"})
        assert r.status_code == 403, (path, r.status_code)
        r = httpx.post(url + path, json={}, headers={"X-S3T-Admin": "wrong"})
        assert r.status_code == 403
    assert httpx.get(url + "/health").status_code != 403  # liveness probes need no secret
    assert httpx.post(url + "/s3t/flights", json={}, headers={"X-S3T-Admin": "s3kret"}).status_code == 200
    # ... but the fake serves no base model named like the run's: refused, naming both.
    att = VLLMServer.attach(url, run.model_path, admin_token="s3kret", max_loras=4, max_lora_rank=8)
    with pytest.raises(ServingError, match="not this run's base model"):
        att.check_upstream()
    srv.should_exit = True


def test_adding_a_replica_at_run_time_needs_the_token_and_a_protected_upstream(gw2):
    r = post(gw2, "/s3t/replicas", {"url": "http://127.0.0.1:1", "admin_token": "x"})
    assert r.status_code == 401
    r = post(gw2, "/s3t/replicas", {"url": "file:///etc", "admin_token": "x"}, headers=TOK)
    assert r.status_code == 400 and "url" in r.json()["error"]["message"]
    port = free_port()  # nothing listens there
    r = post(gw2, "/s3t/replicas", {"url": f"http://127.0.0.1:{port}", "admin_token": "x"}, headers=TOK)
    assert r.status_code == 400 and "does not answer" in r.json()["error"]["message"]
    assert len(gw2.replicas) == 2  # nothing was added


def test_a_deletion_does_not_wait_behind_a_slow_reconciliation_which_then_catches_up(gw2):
    """Reconciling a replica runs its network calls without the switch lock: a deletion that arrives meanwhile is
    applied to the live replica at once, and the fenced one is reconciled again to the new routing before it is
    unfenced (it never serves the superseded adapter)."""
    r1 = gw2.replicas[1]
    srv = r1.server
    gw2._fence(r1, "test: stale")
    for name in list(srv.ids):
        srv.remove(name)  # it came back empty: reconciling reloads every routed adapter
    slow_load, started, calls = srv.load, threading.Event(), []

    def load(name, path):
        calls.append(name)
        started.set()
        time.sleep(2.0)
        return slow_load(name, path)

    srv.load = load
    out = {}
    t = threading.Thread(target=lambda: out.update(gw2.reconcile_replica(r1)))
    t.start()
    assert started.wait(20)
    old = gw2.routing[0]["name"]
    t0 = time.time()
    r = post(gw2, "/s3t/delete", {"ids": [victim_of(gw2)], "request_id": "rep-slow"}, headers=TOK, timeout=120)
    took = time.time() - t0
    assert r.status_code == 200, r.text
    assert t.is_alive() and r1.fenced is not None  # the deletion finished while the reconcile was still loading
    cert = json.loads((gw2.run.dir / "certificates" / "rep-slow.json").read_text())
    views = {v["replica"]: v for v in cert["served_after"]["replicas"]}
    assert views[0]["receives_traffic"] and old not in views[0]["engine_adapters"]
    assert not views[1]["receives_traffic"]  # fenced while being reconciled: listed, no traffic
    t.join(60)
    srv.load = slow_load
    assert out["ok"], out
    assert r1.fenced is None and old not in srv.ids and set(srv.ids) == routed(gw2)
    assert set(srv.engine_loras()) == set(srv.ids.values()) and gw2.check_integrity()["ok"]
    assert took < 2.0 * len(calls)  # it did not wait for the reconcile's loads
