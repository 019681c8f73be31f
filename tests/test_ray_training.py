"""S3T stages on Ray (s3t_llm/distributed.py), confined to loopback.

Every Ray process of these tests runs inside a network namespace that the test creates with only ``lo``
(``unshare -n``, then ``ip link set lo up``): this file re-executes itself as the helper inside it, and the
helper asserts that ``lo`` is its only interface before it starts Ray. No test sends traffic anywhere else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve()
ROOT = HERE.parent.parent


def _netns_available() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace (unshare -n)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def _in_netns(args: list[str], timeout: float, **extra_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **extra_env, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", TOKENIZERS_PARALLELISM="false")
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, *args]
    proc = subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ours, ns = os.stat("/proc/self/ns/net").st_ino, None
    deadline = time.time() + 10
    while ns is None and time.time() < deadline and proc.poll() is None:
        try:
            ino = os.stat(f"/proc/{proc.pid}/ns/net").st_ino
            ns = ino if ino != ours else None
        except FileNotFoundError:
            break
        time.sleep(0.01)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise
    finally:
        # Ray's own processes (GCS, raylets, workers) of a helper that failed half way would outlive it and load
        # the machine for every later test: end whatever is still in the helper's namespace.
        if ns is not None:
            _kill_namespace(ns)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_namespace(ns_inode: int) -> None:
    for _ in range(3):
        left = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if os.stat(d / "ns" / "net").st_ino == ns_inode:
                        left.append(int(d.name))
                except (FileNotFoundError, PermissionError, ProcessLookupError):
                    pass
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def _block_shas(run) -> dict:
    return {(s, p): run.store.manifest(s, p)["sha256"] for s, p in run.store.blocks()}


# ===== the helper, run inside the namespace =======================================================
def _only_loopback() -> None:
    names = sorted(name for _, name in socket.if_nameindex())
    assert names == ["lo"], f"the helper must run in a namespace with only lo, got {names}"


def _helper_cluster(run_dir: str, del_dir: str, work: str, out: str) -> None:
    """Two Ray nodes (1 CPU each) on one machine: (1) kill the worker of one stage mid-stage; (2) on a second
    run, a deletion lands while a stage that uses the deleted sample trains; (3) a guard probe."""
    _only_loopback()
    import ray
    from ray.cluster_utils import Cluster

    from s3t_llm.distributed import train_run_ray
    from s3t_llm.run import Run

    work = Path(work)
    target = os.environ["S3T_TEST_KILL_STAGE"]
    temp = Path(os.environ.get("S3T_TEST_RAY_TMP", "/tmp")) / f"s3tray{os.getpid()}"
    # Cluster.add_node writes the head's address to Ray's default temp dir whatever temp_dir says: on a fresh
    # machine /tmp/ray does not exist yet (a CI run failed on that).
    from ray._private.utils import get_ray_address_file

    Path(get_ray_address_file(None)).parent.mkdir(parents=True, exist_ok=True)
    cluster = Cluster()
    killed: dict = {}
    try:
        cluster.add_node(num_cpus=1, include_dashboard=False, node_ip_address="127.0.0.1", temp_dir=str(temp),
                         _system_config={"automatic_object_spilling_enabled": False})
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        assert ray.cluster_resources().get("CPU") == 2.0 and len(ray.nodes()) == 2

        def hook(phase, stage, step, _work=str(work), _target=target):
            # In the worker: on the target stage's first attempt (the first to create the "armed" file), after two
            # training steps, say so and wait to be killed (by pid, from the driver). Anything else trains normally.
            import os as _os
            import time as _time

            if phase == "step" and stage == _target and step == 2:
                try:
                    _os.close(_os.open(_os.path.join(_work, "armed"), _os.O_CREAT | _os.O_EXCL | _os.O_WRONLY))
                except FileExistsError:
                    return
                with open(_os.path.join(_work, f"kill-{_os.getpid()}"), "w") as f:
                    f.write(stage)
                _time.sleep(600)

        def on_poll(state):
            for f in work.glob("kill-*"):
                pid = int(f.name.split("-")[1])
                running = state["running"].get(target)
                assert running is not None and running["pid"] == pid and running["attempt"] == 1
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, at=time.time())
                f.unlink()

        run = Run.open(run_dir)
        summary = train_run_ray(run, threads=1, progress=False, hook=hook, on_poll=on_poll)

        @ray.remote(num_cpus=1, max_retries=0)
        def probe(run_dir):
            # The guard every stage runs under, on a fresh task: it must refuse and record these.
            from s3t_llm.distributed import GuardViolation, _GUARD, install_guard

            install_guard([run_dir])
            refused = []
            for what, fn in (("open", lambda: open(os.path.join(run_dir, "run.json"))),
                             ("listdir", lambda: os.listdir(os.path.join(run_dir, "blocks"))),
                             ("sqlite", lambda: __import__("sqlite3").connect(os.path.join(run_dir, "ledger.sqlite")))):
                try:
                    fn()
                except GuardViolation:
                    refused.append(what)
            ok = open(os.path.join(os.path.dirname(run_dir), "..", "outside.txt"), "w")  # not under the run: fine
            ok.close()
            return refused, list(_GUARD["violations"])

        refused, violations = ray.get(probe.remote(str(Path(run_dir).resolve())))

        # (2) A deletion while the cluster trains: the stage that trains on the victim's slice holds after one
        # step until the deletion is journaled (by the driver side, the one writer), then finishes on stale data.
        del_target, victim = os.environ["S3T_TEST_DELETE_STAGE"], os.environ["S3T_TEST_VICTIM"]
        deleted: dict = {}

        def hook2(phase, stage, step, _work=str(work), _target=del_target):
            import os as _os
            import time as _time

            if phase == "step" and stage == _target and step == 1 and not _os.path.exists(_os.path.join(_work, "deleted")):
                open(_os.path.join(_work, "delete-now"), "w").close()
                deadline = _time.time() + 120
                while not _os.path.exists(_os.path.join(_work, "deleted")) and _time.time() < deadline:
                    _time.sleep(0.05)

        def on_poll2(state):
            if (work / "delete-now").exists() and not deleted:
                from s3t_llm.run import DATASET

                with Run.open(del_dir).ledger() as led:
                    led.journal_deletion(DATASET, [victim])
                deleted.update(at=time.time(), running=state["running"].get(del_target))
                (work / "deleted").touch()

        summary2 = train_run_ray(Run.open(del_dir), threads=1, progress=False, hook=hook2, on_poll=on_poll2)
        Path(out).write_text(json.dumps({"summary": summary, "killed": killed, "probe_refused": refused,
                                         "probe_violations": violations, "pid_alive_after": _alive(killed.get("pid")),
                                         "summary2": summary2, "deleted": deleted}))
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _alive(pid) -> bool:
    if pid is None:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    return True


def _helper_cli(recipe: str, *overrides: str) -> None:
    """``s3t train RECIPE --ray`` in local mode, inside the namespace."""
    _only_loopback()
    from s3t_llm.cli import main

    sys.argv = ["s3t", "train", recipe, *overrides, "--ray", "--ray-workers", "2", "--ray-threads", "1", "--no-export"]
    sys.exit(main())


def _helper_retrain(run_dir: str, victim: str, out: str) -> None:
    """``s3t serve --retrain --ray``'s retraining: a gateway (fake vLLM engine) whose deletion kills shard 0
    retrains it on a local Ray instance, in the background, while it stays the run's one writer."""
    _only_loopback()
    from s3t_llm.run import Run
    from s3t_llm.serving import Gateway
    from tests.fakes import FakeVLLM

    run = Run.open(run_dir)
    gw = Gateway(run, FakeVLLM(), retrain=True,
                 retrain_ray={"address": None, "threads": 1, "workers": 2, "gpus_per_stage": None,
                              "max_retries": 3, "resubmits": 2})
    gw.refresh("start-up")
    cert = gw.delete([victim])
    gw.retrain_thread.join(timeout=200)
    Path(out).write_text(json.dumps({"dead": cert["dead_shards"], "alive": gw.retrain_thread.is_alive(),
                                     "status": gw.retrain_status, "routing": gw.routing,
                                     "engine": sorted(gw.server.ids)}, default=str))


# ===== the tests ====================================================================================
pytestmark = pytest.mark.skipif(_netns_available() is not None, reason=str(_netns_available()))


@pytest.fixture(scope="module")
def ray_setup(tmp_path_factory, tiny_llama, alpaca_sample):
    """One serial `s3t train` (train_run) of the plan at 1 thread: the reference for every Ray test here."""
    pytest.importorskip("ray")
    torch = pytest.importorskip("torch")
    from tests.test_training import make_cfg
    from s3t_llm.run import Run
    from s3t_llm.training import stage_plan, train_run

    tmp_path = tmp_path_factory.mktemp("ray-serial")
    data = tmp_path / "data.json"
    data.write_text(json.dumps(alpaca_sample[:48]))
    extra = ["s3t.shards=2", "s3t.slices=3", "s3t.budget=1", "train.epochs=1"]
    serial = Run.create(make_cfg(tmp_path, tiny_llama, data, name="serial", extra=extra))
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count
    try:
        train_run(serial, progress=False)
    finally:
        torch.set_num_threads(old)
    ref = _block_shas(serial)
    assert len(ref) == len(stage_plan(serial)) == 6
    return {"data": data, "extra": extra, "serial": serial, "ref": ref, "make_cfg": make_cfg}


def test_two_node_cluster_survives_a_killed_worker_with_byte_identical_blocks(tmp_path, tiny_llama, ray_setup):
    from s3t_llm.run import DATASET, Run

    run = Run.create(ray_setup["make_cfg"](tmp_path, tiny_llama, ray_setup["data"], name="ray",
                                           extra=ray_setup["extra"]))
    seq = run.sequences[0]
    target = f"s1/p{seq[0]}-{seq[1]}"  # shard 1, stage 2: its parent was trained on Ray too
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out.json"
    # The second run: a deletion from slice seq[1] of shard 0 lands while stage (seq[0], seq[1]) trains.
    drun = Run.create(ray_setup["make_cfg"](tmp_path, tiny_llama, ray_setup["data"], name="del",
                                            extra=ray_setup["extra"]))
    with drun.ledger() as led:
        victim = led.slice_samples(DATASET, 0, seq[1])[0][0]
    del_target = f"s0/p{seq[0]}-{seq[1]}"
    t0 = time.time()
    proc = _in_netns([str(HERE), "cluster", str(run.dir), str(drun.dir), str(work), str(out)], timeout=300,
                     S3T_TEST_KILL_STAGE=target, S3T_TEST_DELETE_STAGE=del_target, S3T_TEST_VICTIM=victim)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(out.read_text())
    summary = res["summary"]
    # Byte-identical (sha256 of every block file) to the serial run with the same thread count.
    got = _block_shas(Run.open(run.dir))
    assert got == ray_setup["ref"] and len(got) == 6
    assert summary["stages_trained"] == 6 and summary["stages_discarded"] == 0
    # The killed stage: our attempt counter says 2, Ray's retry kept the task id, a new process ran it.
    assert res["killed"]["pid"] > 0 and res["pid_alive_after"] is False
    assert summary["attempts"][target] == 2
    assert {k: v for k, v in summary["attempts"].items() if k != target} == {w["stage"]: 1 for w in summary["where"]
                                                                           if w["stage"] != target}
    log = summary["attempt_log"][target]
    assert log[0]["pid"] == res["killed"]["pid"] and log[1]["pid"] != log[0]["pid"]
    assert log[0]["task_id"] == log[1]["task_id"]  # Ray's own retry (max_retries), not a resubmission
    where = {w["stage"]: w for w in summary["where"]}
    assert where[target]["attempt"] == 2 and where[target]["pid"] == log[1]["pid"]
    man = Run.open(run.dir).store.manifest(1, tuple(seq[:2]))
    assert man["ray"]["attempt"] == 2 and man["env"]["threads"] == 1
    # Two nodes ran stages; every stage ran under the run-directory guard, which saw file accesses and
    # refused none; the same guard on a probe task refuses an open, a listdir and a sqlite connect.
    assert len(summary["ray"]["nodes"]) == 2 and {w["ip"] for w in summary["where"]} == {"127.0.0.1"}
    assert all(w["guard_events"] > 0 for w in summary["where"])
    assert res["probe_refused"] == ["open", "listdir", "sqlite"] and len(res["probe_violations"]) == 3
    # The deletion: the stage that was training on the victim's slice was discarded (its result was stale when it
    # came back) and trained again on the new data; no stored block was trained on the victim.
    s2, ref = res["summary2"], ray_setup["ref"]
    assert res["deleted"]["running"]["attempt"] == 1  # the stage was running when the deletion landed
    assert s2["stages_discarded"] == 1 and s2["stages_trained"] == 6 and s2["attempts"][del_target] == 2
    drun = Run.open(drun.dir)
    blocks = drun.store.blocks()
    assert len(blocks) == 6 and all(drun.block_is_valid(sh, p) for sh, p in blocks)
    assert not any(victim in drun.store.manifest(sh, p)["sample_ids"] for sh, p in blocks)
    assert drun.store.manifest(0, tuple(seq[:2]))["n_samples"] == 15
    got2 = _block_shas(drun)
    # What the deletion did not touch is the serial bytes; what it touched (shard 0 from slice seq[1] on) is not.
    assert {k: v for k, v in got2.items() if not (k[0] == 0 and len(k[1]) >= 2)} == \
        {k: v for k, v in ref.items() if not (k[0] == 0 and len(k[1]) >= 2)}
    assert all(got2[(0, tuple(seq[:d]))] != ref[(0, tuple(seq[:d]))] for d in (2, 3))
    print(f"ray cluster test: {time.time() - t0:.1f}s")


def test_cli_ray_local_mode_matches_serial(tmp_path, tiny_llama, ray_setup):
    import yaml

    from s3t_llm.run import Run

    cfg = ray_setup["make_cfg"](tmp_path, tiny_llama, ray_setup["data"], name="cli", extra=ray_setup["extra"])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = _in_netns([str(HERE), "cli", str(recipe)], timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "stages: 6 trained, 0 reused of 6" in proc.stdout
    run = Run.open(cfg.run_dir)
    assert _block_shas(run) == ray_setup["ref"]
    summary = json.loads((run.dir / "train_summary.json").read_text())
    assert len(summary["where"]) == 6 and set(summary["attempts"].values()) == {1}
    # --ray-workers 2: at most two worker processes (each loads the model once) ran the six stages
    assert 1 <= len({w["pid"] for w in summary["where"]}) <= 2
    assert sum(1 for w in summary["where"] if w["model_load_s"] > 0) == len({w["pid"] for w in summary["where"]})
    # where each stage ran is printed: one row per stage, with its block digest
    for w in summary["where"]:
        assert w["stage"] in proc.stdout and w["sha256"][:12] in proc.stdout


def test_serve_retrain_on_ray_revives_a_dead_shard_with_serial_bytes(tmp_path, tiny_llama, ray_setup):
    """`s3t serve --retrain --ray`: the dead shard's stages run on Ray (where each ran is reported), never on the
    deleted sample, and a serial retraining of each of those stages in this process writes the same bytes."""
    import torch

    from s3t_llm.run import DATASET, Run
    from s3t_llm.training import StageTrainer, train_run

    run = Run.create(ray_setup["make_cfg"](tmp_path, tiny_llama, ray_setup["data"], name="rt",
                                           extra=ray_setup["extra"]))
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train_run(run, progress=False)
        assert _block_shas(run) == ray_setup["ref"]
        seq = run.sequences[0]
        with run.ledger() as led:
            victim = led.slice_samples(DATASET, 0, seq[0])[0][0]
        out = tmp_path / "retrain.json"
        proc = _in_netns([str(HERE), "retrain", str(run.dir), victim, str(out)], timeout=240)
        assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
        res = json.loads(out.read_text())
        assert res["dead"] == [0] and res["alive"] is False
        st = res["status"]
        assert st["state"] == "idle" and st["scheduler"] == "ray" and st["stages_trained"] == 3, st
        assert sorted(w["stage"] for w in st["where"]) == sorted(f"s0/p{'-'.join(map(str, seq[:k]))}"
                                                                 for k in (1, 2, 3))
        assert all(w["attempt"] == 1 and w["pid"] != os.getpid() for w in st["where"])
        run = Run.open(run.dir)
        assert res["routing"]["0"]["depth"] == 3 and res["routing"]["0"]["name"] in res["engine"]
        got = _block_shas(run)
        assert all(run.block_is_valid(s, p) for s, p in got)
        assert not any(victim in run.store.manifest(s, p)["sample_ids"] for s, p in got)
        # shard 1 untouched; shard 0 new bytes, equal to a serial retraining of the same stages on the same data
        assert {k: v for k, v in got.items() if k[0] == 1} == {k: v for k, v in ray_setup["ref"].items() if k[0] == 1}
        trainer = StageTrainer(run)
        for k in (1, 2, 3):
            key = (0, tuple(seq[:k]))
            assert got[key] != ray_setup["ref"][key]
            assert trainer.train_stage(*key)["sha256"] == got[key], f"stage {key} differs from a serial retraining"
    finally:
        torch.set_num_threads(old)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"cluster": _helper_cluster, "cli": _helper_cli, "retrain": _helper_retrain}[mode](*rest)
