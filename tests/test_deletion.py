"""The deletion module without a server: plans, artifacts destroyed, certificates, and real kills."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

from s3t_llm.deletion import STEPS, apply_deletion, publish, recover, serving_plan  # noqa: E402
from s3t_llm.ledger import UnknownSampleError  # noqa: E402
from s3t_llm.run import DATASET, Run  # noqa: E402
from s3t_llm.training import train_run  # noqa: E402
from tests.fakes import FakeVLLM  # noqa: E402
from tests.test_training import make_cfg  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, alpaca_sample):
    d = tmp_path_factory.mktemp("deletion")
    data = d / "data.json"
    data.write_text(json.dumps(alpaca_sample[:48]))
    run = Run.create(make_cfg(d, tiny_llama, data, name="del", extra=["s3t.shards=2", "s3t.slices=2", "s3t.budget=2",
                                                                    "data.heldout=6"]))
    train_run(run, progress=False)
    publish(run)
    return run.dir


def clone(src, dst):
    shutil.copytree(src, dst)
    return Run.open(dst)


def sample_in(run, shard, sl, i=0):
    with run.ledger() as led:
        return led.slice_samples(DATASET, shard, sl)[i][0]


def disk_state(run):
    """Everything on disk that serving depends on, with content hashes (paths made relative)."""
    blocks = {(s, p): run.store.manifest(s, p)["sha256"] for s, p in run.store.blocks()}
    adapters = {n: run.store.adapter_manifest(n)["sha256"] for n in run.store.adapters()}
    served = json.loads((run.dir / "served.json").read_text())
    served = {k: v and {kk: vv for kk, vv in v.items() if kk != "path"} for k, v in served.items()}
    return blocks, adapters, served


def cert_core(cert):
    drop = {"received_at", "planned_at", "effective_at", "deletion_to_effect_seconds", "switch_seconds", "run",
            "steps"}  # timings; a recovered request's certificate records none
    out = {k: v for k, v in cert.items() if k not in drop}
    out["destroyed"] = sorted((a["kind"], a["sha256"]) for a in cert["destroyed"])
    out["erasure"] = {k: v for k, v in cert["erasure"].items() if k != "ledger"}
    out.pop("served_when_first_planned", None)
    return out


def test_deletion_truncates_destroys_and_certifies(trained, tmp_path):
    run = clone(trained, tmp_path / "r")
    seq0 = run.sequences[0]
    assert serving_plan(run)[0]["depth"] == 2
    victim = sample_in(run, 0, seq0[1])
    before_blocks = set(run.store.blocks())
    cert = apply_deletion(run, [victim], request_id="req-1")
    # Shard 0: every block whose prefix holds the victim's slice is gone; the rest is untouched.
    after_blocks = set(run.store.blocks())
    gone = {(s, p) for s, p in before_blocks if s == 0 and seq0[1] in p}
    assert before_blocks - after_blocks == gone and len(gone) == 3
    destroyed_blocks = {(a["shard"], tuple(a["prefix"])) for a in cert["destroyed"] if a["kind"] == "block"}
    assert destroyed_blocks == gone
    for a in cert["destroyed"]:
        assert not os.path.exists(a["path"]) and len(a["sha256"]) == 64
    # The shard now serves a depth-1 prefix that excludes the slice; shard 1 is unchanged.
    plan = serving_plan(run)
    assert plan[0]["depth"] == 1 and seq0[1] not in plan[0]["prefix"] and plan[1]["depth"] == 2
    assert [c["shard"] for c in cert["served_changes"]] == [0]
    for ev in cert["served"]:
        assert ev["deleted_samples_trained_on"] == [] and ev["slice_hashes_match"]
        man = run.store.adapter_manifest(ev["adapter"])
        trained_ids = set()
        for k in range(1, len(man["prefix"]) + 1):
            trained_ids |= set(run.store.manifest(ev["shard"], tuple(man["prefix"][:k]))["sample_ids"])
        assert victim not in trained_ids and ev["n_trained_samples"] == len(trained_ids) > 0
    with run.ledger() as led:
        assert led.request("req-1").status == "applied" and led.is_deleted(DATASET, victim)
    # Idempotent: the same request again returns the same certificate; a new request for it is a no-op.
    assert apply_deletion(run, [victim], request_id="req-1") == cert
    again = apply_deletion(run, [victim])
    assert again["noop"] and again["served_changes"] == [] and again["destroyed"] == []


def test_shard_with_no_surviving_prefix_is_reported_dead(trained, tmp_path):
    run = clone(trained, tmp_path / "r")
    firsts = {seq[0] for seq in run.sequences}
    cert = apply_deletion(run, [sample_in(run, 1, sl) for sl in sorted(firsts)])
    assert cert["dead_shards"] == [1]
    assert serving_plan(run)[1] is None and not run.store.blocks(shard=1)
    assert not [n for n in run.store.adapters() if run.store.adapter_manifest(n)["shard"] == 1]
    # Retraining the dead shard rebuilds it on the live data only.
    train_run(run, shards=[1], progress=False)
    plan = serving_plan(run)
    assert plan[1]["depth"] == 2
    deleted = set(cert["newly_deleted"])
    for s, p in run.store.blocks(shard=1):
        assert not deleted & set(run.store.manifest(s, p)["sample_ids"])


def test_bad_deletions_leave_the_ledger_unchanged(trained, tmp_path):
    run = clone(trained, tmp_path / "r")
    blocks = set(run.store.blocks())
    with run.ledger() as led:
        n_live = led.dataset(DATASET).n_live
    with pytest.raises(UnknownSampleError, match="nope"):
        apply_deletion(run, [sample_in(run, 0, 0), "nope"])
    with pytest.raises(ValueError, match="empty"):
        apply_deletion(run, [])
    with pytest.raises(ValueError, match="duplicate"):
        apply_deletion(run, [sample_in(run, 0, 0)] * 2)
    with run.ledger() as led:
        assert led.dataset(DATASET).n_live == n_live and led.requests(DATASET) == []
    assert set(run.store.blocks()) == blocks


@pytest.mark.parametrize("step", STEPS)
def test_killed_deletion_finishes_on_restart_like_an_uninterrupted_one(step, trained, tmp_path):
    ref = clone(trained, tmp_path / "ref")
    victim = sample_in(ref, 0, ref.sequences[0][1])
    ref_cert = apply_deletion(ref, [victim], request_id="req-crash")
    crashed = clone(trained, tmp_path / "crashed")
    env = dict(os.environ, S3T_CRASH_AT=step)
    proc = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "delete", str(crashed.dir), "--ids", victim,
                           "--offline", "--request-id", "req-crash"], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]  # really killed, at that step
    with crashed.ledger() as led:
        assert led.request("req-crash").status != "applied"
        assert led.is_deleted(DATASET, victim)  # journaled before anything else
    certs = recover(crashed)
    assert [c["request_id"] for c in certs] == ["req-crash"]
    assert disk_state(crashed) == disk_state(ref)
    assert cert_core(certs[0]) == cert_core(ref_cert)
    with crashed.ledger() as led:
        assert led.request("req-crash").status == "applied" and led.pending(DATASET) == []


def test_unlearned_adapters_go_with_their_source_blocks(trained, tmp_path):
    run = clone(trained, tmp_path / "r")
    plan = serving_plan(run)
    keep, drop = tmp_path / "r" / "unlearned" / "keep", tmp_path / "r" / "unlearned" / "drop"
    for d, shard in ((keep, 1), (drop, 0)):
        d.mkdir(parents=True)
        man = run.store.adapter_manifest(plan[shard]["name"])
        (d / "unlearn_manifest.json").write_text(json.dumps(
            {"shard": shard, "source_adapter": {"prefix": man["prefix"], "blocks": man["blocks"]}}))
        (d / "adapter_model.safetensors").write_bytes(b"weights derived from the source blocks")
    cert = apply_deletion(run, [sample_in(run, 0, plan[0]["prefix"][-1])])
    assert not drop.exists() and keep.exists()
    assert [a["name"] for a in cert["destroyed"] if a["kind"] == "unlearned-adapter"] == ["drop"]


def test_background_retraining_revives_a_dead_shard_without_the_deleted_sample(tmp_path, tiny_llama, alpaca_sample,
                                                                              write_records):
    """`s3t serve --retrain`: a deletion that kills a shard retrains it in the background on what is left; the
    revived shard's blocks never saw the deleted sample and the other shard is untouched."""
    from s3t_llm.serving import Gateway

    run = Run.create(make_cfg(tmp_path, tiny_llama, write_records(alpaca_sample[:24]),
                              extra=["s3t.shards=2", "s3t.slices=2", "s3t.budget=1"]))
    train_run(run, progress=False)
    gw = Gateway(run, FakeVLLM(), retrain=True)
    gw.refresh("start-up")
    other_before = gw.routing[1]["name"]
    with run.ledger() as led:
        victim = next(sid for sid, _ in led.slice_samples(DATASET, 0, run.sequences[0][0]))
    cert = gw.delete([victim])
    assert cert["dead_shards"] == [0]
    gw.retrain_thread.join(timeout=300)
    assert not gw.retrain_thread.is_alive()
    e = gw.routing[0]
    assert e is not None and e["depth"] == 2 and gw.routing[1]["name"] == other_before
    hashes = run.slice_hashes()
    for k in (1, 2):
        man = run.store.manifest(0, tuple(e["prefix"][:k]))
        assert victim not in man["sample_ids"]
        assert man["slice_hashes"] == {str(sl): hashes[(0, sl)] for sl in e["prefix"][:k]}
    assert set(gw.server.ids) == {e["name"], other_before} and len(gw.server.engine) == 2


def test_eval_offline_scores_the_ledgers_live_prefixes_like_one_peft_model_each(trained, tmp_path, capsys):
    """`s3t eval RUN --backend offline`: the current prefix adapter of every live shard, all in one multi-adapter
    PEFT model, scores exactly as that adapter loaded alone (HFScorer + PEFT, fp32); after a deletion that kills a
    shard only the live one is scored, and with no live shard at all the command refuses before scoring."""
    from s3t_llm.cli import main
    from s3t_llm.evaluation import HFScorer, evaluate, heldout_loss, load_tasks

    fix = str(Path(__file__).resolve().parent / "fixtures" / "lm_tasks")
    run = clone(trained, tmp_path / "r")
    out = tmp_path / "eval.json"
    rc = main(["eval", str(run.dir), "--backend", "offline", "--tasks", "fx_split,fx_multi,s3t_arc_easy",
               "--include-path", fix, "--limit", "6", "--heldout", "6", "--base", "--output", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    plan = serving_plan(run)
    assert res["backend"] == "offline" and res["live_shards"] == [0, 1]
    assert {k: v["name"] for k, v in res["adapters"].items()} == {f"shard{s}": plan[s]["name"] for s in (0, 1)}
    # each adapter alone, loaded the plain way
    tasks = load_tasks(["fx_split", "fx_multi", "s3t_arc_easy"], limit=6, include_path=fix)
    recs = run.heldout()[:6]
    alone = {f"shard{s}": HFScorer.from_pretrained(run.model_path, adapter=str(run.store.adapter_dir(plan[s]["name"])))
             for s in (0, 1)}
    ref = evaluate(alone, tasks, progress=False)
    for name in ("fx_split", "fx_multi", "s3t_arc_easy"):
        for s in alone:
            assert res["tasks"][name]["per_shard"][s] == ref["tasks"][name]["scorers"][s]["acc"], (name, s)
        assert res["tasks"][name]["acc"] == ref["tasks"][name]["ensemble"]["acc"]
        assert "base_acc" in res["tasks"][name]
    assert "lm_eval" in res["tasks"]["fx_multi"]   # the task's own process_results, on the ensemble too
    for s, sc in alone.items():
        h = heldout_loss(sc, recs, run.config.data.template, run.config.data.max_length)
        assert res["heldout"]["per_shard"][s] == pytest.approx(h["loss"], rel=1e-6, abs=0)
    base = heldout_loss(HFScorer.from_pretrained(run.model_path), recs, run.config.data.template,
                        run.config.data.max_length)
    assert res["heldout"]["base"] == pytest.approx(base["loss"], rel=1e-6, abs=0)
    assert res["heldout"]["base"] != res["heldout"]["per_shard"]["shard0"]   # the adapters do change the model

    firsts = {seq[0] for seq in run.sequences}
    apply_deletion(run, [sample_in(run, 1, sl) for sl in sorted(firsts)])          # shard 1 dies
    capsys.readouterr()
    assert main(["eval", str(run.dir), "--backend", "offline", "--tasks", "fx_split", "--include-path", fix,
                 "--heldout", "0", "--output", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["live_shards"] == [0] and set(res["tasks"]["fx_split"]["per_shard"]) == {"shard0"}
    apply_deletion(run, [sample_in(run, 0, sl) for sl in sorted(firsts)])          # shard 0 dies too
    capsys.readouterr()
    assert main(["eval", str(run.dir), "--backend", "offline", "--tasks", "fx_split", "--include-path", fix]) == 2
    assert "no live shard" in capsys.readouterr().err
    assert main(["eval", str(run.dir), "--backend", "vllm", "--tasks", "fx_split", "--include-path", fix]) == 2
    assert "not serving" in capsys.readouterr().err
    # a bad task name is refused before any model is loaded, with the close matches
    assert main(["eval", str(run.dir), "--backend", "offline", "--tasks", "s3t_arc_esay", "--base"]) == 2
    assert "s3t_arc_easy" in capsys.readouterr().err
