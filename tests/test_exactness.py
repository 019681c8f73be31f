"""The exactness rule (s3t_llm.exactness), property-tested, and the deletion design around it driven by a seeded
random model-based test: the real deletion module, the real Gateway, the real ledger and store, with only the
vLLM engine faked (tests/fakes.py), under injected faults, retries, training and derived-adapter races and
restarts. No torch: it runs in seconds."""

from __future__ import annotations

import itertools
import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from s3t_llm import exactness
from s3t_llm.deletion import CrashPoint, STEPS, apply_deletion, certificate_path, recover
from s3t_llm.ledger import LedgerError
from s3t_llm.planner import best_prefix, cyclic_sequences
from s3t_llm.run import DATASET, HELDOUT
from s3t_llm.serving import Gateway
from s3t_llm.unlearn import StaleSourceError, commit_derived
from s3t_llm.verify import verify_run
from tests.fakes import BackendFault, FakeTrainer, FakeVLLM, make_fake_run

L3 = 3
PREFIXES = [p for k in range(1, L3 + 1) for p in itertools.permutations(range(L3), k)]


# ----- the rule, property-tested ------------------------------------------------------------------------------
@st.composite
def stores(draw):
    """A random store of one shard: every prefix present or not, each with current or stale slice hashes and a
    parent digest that matches or not; current hashes per slice."""
    hashes = {(0, s): f"h{s}" for s in range(L3)}
    blocks = {}
    for p in PREFIXES:
        if not draw(st.booleans()):
            continue
        stale = draw(st.sets(st.sampled_from(p), max_size=len(p)))
        man = {"sha256": f"sha-{'-'.join(map(str, p))}-{draw(st.integers(0, 1))}",
               "slice_hashes": {str(s): ("old" if s in stale else f"h{s}") for s in p}}
        if len(p) > 1:
            man["parent_sha256"] = draw(st.sampled_from([f"sha-{'-'.join(map(str, p[:-1]))}-0",
                                                         f"sha-{'-'.join(map(str, p[:-1]))}-1", None]))
        blocks[(0, p)] = man
    return blocks, hashes


def brute_valid(key, blocks, hashes):
    shard, p = key
    for j in range(1, len(p) + 1):
        man = blocks.get((shard, p[:j]))
        if man is None or set(map(int, man["slice_hashes"])) != set(p[:j]):
            return False
        if any(hashes[(shard, int(s))] != h for s, h in man["slice_hashes"].items()):
            return False
        if j > 1 and man.get("parent_sha256") != blocks[(shard, p[:j - 1])]["sha256"]:
            return False
    return True


@settings(max_examples=400, deadline=None)
@given(stores(), st.integers(1, 6))
def test_rule_matches_an_independent_definition(store, budget):
    blocks, hashes = store
    valid = exactness.valid_blocks(blocks, hashes)
    assert valid == {k for k in blocks if brute_valid(k, blocks, hashes)}
    seqs = [list(s) for s in cyclic_sequences(L3, min(budget, L3))]
    routing = exactness.desired_routing("r", 1, seqs, blocks, hashes)
    lens = [max((k for k in range(len(s) + 1) if all(brute_valid((0, tuple(s[:j])), blocks, hashes)
                                                      for j in range(1, k + 1))), default=0) for s in seqs]
    best = max(lens)
    if best == 0:
        assert routing[0] is None
    else:
        e = routing[0]
        assert e["depth"] == best and e["sequence"] == lens.index(best)  # ties: lowest index
        assert e["block_sha256"] == [blocks[(0, tuple(e["prefix"][:k]))]["sha256"] for k in range(1, best + 1)]
    stale = exactness.stale(blocks, hashes, {})
    assert set(stale["blocks"]) == set(blocks) - valid


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, 3)), st.integers(1, 4))
def test_rule_agrees_with_the_planners_surviving_prefix_when_every_block_is_trained(hit, budget):
    """Every block trained on current data, then the slices in ``hit`` lose a sample: the served prefix per
    shard is the planner's best_prefix (the paper's rule) for those hits."""
    L = 4
    seqs = [list(s) for s in cyclic_sequences(L, budget)]
    blocks, prev = {}, {}
    for s in seqs:
        for k in range(1, L + 1):
            p = tuple(s[:k])
            blocks[(0, p)] = {"sha256": "d" + "-".join(map(str, p)), "parent_sha256": prev.get(p[:-1]),
                              "slice_hashes": {str(x): f"h{x}" for x in p}}
            prev[p] = blocks[(0, p)]["sha256"]
    hashes = {(0, x): (f"h{x}" if x not in hit else "changed") for x in range(L)}
    routing = exactness.desired_routing("r", 1, seqs, blocks, hashes)
    qi, depth = best_prefix(seqs, hit)
    assert (routing[0]["sequence"], routing[0]["depth"]) == (qi, depth) if depth else routing[0] is None


def test_a_child_over_a_retrained_parent_is_not_valid():
    hashes = {(0, 0): "a", (0, 1): "b"}
    blocks = {(0, (0,)): {"sha256": "p-new", "slice_hashes": {"0": "a"}},
              (0, (0, 1)): {"sha256": "c", "slice_hashes": {"0": "a", "1": "b"}, "parent_sha256": "p-old"}}
    assert exactness.valid_blocks(blocks, hashes) == {(0, (0,))}
    blocks[(0, (0, 1))]["parent_sha256"] = "p-new"
    assert exactness.valid_blocks(blocks, hashes) == {(0, (0,)), (0, (0, 1))}


# ----- the model-based test -------------------------------------------------------------------------------------
CANARY = "ŝ3t-çanary-Ω"


def records(n: int, tag: str = "t") -> list[dict]:
    """Unique, searchable texts (ASCII and non-ASCII) per record."""
    return [{"id": f"{tag}{i:03d}", "instruction": f"Instruction {tag}{i:03d} {CANARY} zq{i * 7919:07d}",
             "input": "" if i % 3 else f"input-{tag}{i:03d}-ünïcode-{i * 104729:08d}",
             "output": f"Answer {tag}{i:03d}: {CANARY}-{i * 15485863:010d} “quoted”"} for i in range(n)]


def needles(rec: dict) -> list[bytes]:
    out = []
    for f in ("instruction", "input", "output"):
        t = rec.get(f)
        if t:
            out += [t.encode(), json.dumps(t)[1:-1].encode(), json.dumps(t, ensure_ascii=False)[1:-1].encode()]
    return out


def bytes_hold_deleted(run_dir: Path, deleted_recs: list[dict]) -> list[str]:
    pats = [(r["id"], n) for r in deleted_recs for n in needles(r)]
    hits = []
    for p in sorted(Path(run_dir).rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            hits += [f"{p.name}: {sid}" for sid, n in pats if n in data]
    return hits


class Harness:
    """The system under test, as `s3t serve` builds it, with a fake engine; restarts rebuild it."""

    def __init__(self, run):
        self.run = run
        self.trainer = FakeTrainer(run)
        self.start()

    def start(self):
        self.engine = FakeVLLM()
        self.gw = Gateway(self.run, self.engine)
        recover(self.run, backend=self.gw)
        self.gw.refresh("start-up")

    def restart(self):
        self.start()


def check_invariants(h: Harness, by_id: dict[str, dict], where: str, reconciled: bool = True) -> None:
    """``reconciled``: the step just reconciled serving with the ledger (a new request, a recovery, a refresh), so
    the routing must EQUAL the ledger's; otherwise (a retry answered from its stored certificate, while a trainer
    may have revived a shard) every served adapter must still be current."""
    run = h.run
    with run.ledger() as led:
        deleted = set().union(*(led.deleted_ids(d) for d in run.datasets()))
    # nothing served, loaded or stored was trained on a deleted id (lineage from the trainer's own record)
    snap = run.snapshot()
    for (s, p), man in snap.blocks.items():
        assert not (h.trainer.trained[man["sha256"]] & deleted), f"{where}: block {s} {p} saw a deleted id"
    for name, man in snap.adapters.items():
        for b in man["blocks"]:
            assert not (h.trainer.trained[b["sha256"]] & deleted), f"{where}: adapter {name} saw a deleted id"
    for i, e in h.engine.engine.items():
        man = json.loads(e["files"]["s3t_manifest.json"])
        for b in man["blocks"]:
            assert not (h.trainer.trained[b["sha256"]] & deleted), f"{where}: engine adapter {e['name']} saw one"
    # the gateway serves what the ledger says, and the engine holds exactly that
    want = {s: (e or {}).get("name") for s, e in run.desired_routing(snap).items()}
    served = h.gw.served()
    if reconciled:
        assert served["routing"] == want, where
    valid = exactness.valid_blocks(snap.blocks, snap.hashes)
    for s, name in served["routing"].items():
        if name:
            man = snap.adapters[name]
            assert exactness.chain_current(s, man["blocks"], snap.blocks, valid), f"{where}: {name} is stale"
    routed = {n for n in served["routing"].values() if n}
    assert set(served["engine_adapters"]) == routed and not served["engine_unknown_ids"], where
    # no deleted content in any byte of the run directory
    assert bytes_hold_deleted(run.dir, [by_id[s] for s in deleted]) == [], where
    # the auditor's check passes
    rep = verify_run(run.dir)
    assert rep["problems"] == [], (where, rep["problems"])


def final_state(run) -> tuple:
    snap = run.snapshot()
    blocks = {(s, p): m["sha256"] for (s, p), m in snap.blocks.items()}
    return blocks, {s: (e or {}).get("name") for s, e in run.desired_routing(snap).items()}


def drive(tmp_path: Path, seed: int, steps: int, monkeypatch) -> tuple[Counter, Counter]:
    rng = random.Random(seed)
    recs, held = records(120), records(6, "h")
    by_id = {r["id"]: r for r in recs + held}
    run = make_fake_run(tmp_path / "faulty", recs, heldout=held)
    h = Harness(run)
    h.trainer.train_missing()
    h.gw.refresh("trained")
    actions, faults = Counter(), Counter()
    history: list[tuple[str, list[str]]] = []  # acknowledged or journaled requests, in order
    jobs: list[dict] = []  # stages begun and not finished (a trainer racing deletions)
    derived_jobs: list[dict] = []
    n = 0

    def live_ids():
        with run.ledger() as led:
            out = []
            for s in range(run.shards):
                for sl in range(run.config.s3t.slices):
                    ids = [sid for sid, _ in led.slice_samples(DATASET, s, sl)]
                    if len(ids) > 3:
                        out += ids
            out += [sid for sid, _ in led.slice_samples(HELDOUT, 0, 0)]
        return out

    for step in range(steps):
        r = rng.random()
        where = f"seed {seed} step {step}"
        if r < 0.45:  # a new deletion request, maybe with a fault
            pool = live_ids()
            if len(pool) < 2:
                continue
            ids = rng.sample(pool, rng.choice([1, 1, 2]))
            n += 1
            rid = f"req-{seed}-{n}"
            fault = rng.choice(["none"] * 4 + ["load", "remove", "crash"])
            history.append((rid, ids))
            actions["delete"] += 1
            faults[fault] += 1
            if fault in ("load", "remove"):
                h.engine.fail_next[fault] = 1
            if fault == "crash":
                step_at = rng.choice(STEPS)
                faults[f"crash@{step_at}"] += 1
                monkeypatch.setenv("S3T_CRASH_MODE", "raise")
                monkeypatch.setenv("S3T_CRASH_AT", step_at)
            try:
                h.gw.delete(ids, request_id=rid)
                ok = True
            except (BackendFault, CrashPoint, RuntimeError):
                ok = False
                assert fault != "none", f"{where}: a deletion failed with no fault injected"
            finally:
                monkeypatch.delenv("S3T_CRASH_AT", raising=False)
                h.engine.fail_next.clear()
            if fault == "crash" and not ok:
                h.restart()  # what `s3t serve` does after a kill: recover, then serve
                actions["restart-after-crash"] += 1
            if ok or fault == "crash":
                check_invariants(h, by_id, where)
        elif r < 0.55 and history:  # a client retries an earlier request id
            rid, ids = rng.choice(history)
            actions["retry"] += 1
            cert = h.gw.delete(ids, request_id=rid)
            assert cert["request_id"] == rid
            check_invariants(h, by_id, where, reconciled=False)
        elif r < 0.70:  # a trainer begins a stage (it will finish later, maybe after deletions)
            shard = rng.randrange(run.shards)
            seq = rng.choice(run.sequences)
            k = rng.randrange(1, len(seq) + 1)
            job = h.trainer.begin(shard, tuple(seq[:k]))
            if job and job["ids"]:
                jobs.append(job)
                actions["train-begin"] += 1
        elif r < 0.80 and jobs:  # ... and finishes: refused if what it read is no longer current
            job = jobs.pop(rng.randrange(len(jobs)))
            with run.ledger() as led:
                deleted = led.deleted_ids(DATASET)
            from s3t_llm.run import StaleStageError

            try:
                man = h.trainer.finish(job)
                assert not (set(man["sample_ids"]) & deleted), f"{where}: a block derived from a deleted id was written"
                actions["train-written"] += 1
            except StaleStageError:  # refused: what it read is no longer current (new deletions or a new parent)
                now = {str(sl): h_ for (s_, sl), h_ in run.slice_hashes().items() if s_ == job["shard"]
                       and sl in job["prefix"]}
                parent_now = (run.store.manifest(job["shard"], job["prefix"][:-1])["sha256"]
                              if len(job["prefix"]) > 1 and run.store.has_block(job["shard"], job["prefix"][:-1])
                              else None)
                assert now != job["hashes"] or parent_now != job["parent_sha256"], f"{where}: refused a current stage"
                actions["train-refused-stale"] += 1
        elif r < 0.86:  # an approximate-unlearning job reads the served adapter of a shard
            e = h.gw.routing.get(rng.randrange(run.shards))
            if e:
                derived_jobs.append({"shard": e["shard"], "blocks": [
                    {"prefix": e["prefix"][:k], "sha256": sha} for k, sha in enumerate(e["block_sha256"], 1)]})
                actions["derived-begin"] += 1
        elif r < 0.91 and derived_jobs:  # ... and writes its adapter only if its source is still current
            job = derived_jobs.pop(rng.randrange(len(derived_jobs)))
            name = f"fake-s{job['shard']}-del-{step}"

            def write(job=job, name=name):
                d = run.dir / "unlearned" / name
                d.mkdir(parents=True)
                (d / "adapter_model.safetensors").write_bytes(b"\0" * 16)
                (d / "unlearn_manifest.json").write_text(json.dumps({"shard": job["shard"], "source_adapter": {
                    "shard": job["shard"], "blocks": job["blocks"]}}))
                return d
            try:
                commit_derived(run, job["shard"], job["blocks"], write)
                actions["derived-written"] += 1
            except StaleSourceError:
                actions["derived-refused-stale"] += 1
        elif r < 0.96:  # background retraining of dead or shortened shards
            actions["retrain"] += 1
            h.trainer.train_missing()
            h.gw.refresh("retrained")  # completes any request a failure left journaled, then serves
            check_invariants(h, by_id, where)
        else:
            actions["restart"] += 1
            h.restart()
            check_invariants(h, by_id, where)
    # finish: every journaled request completes on a last restart; then retrain to the full plan
    h.restart()
    h.trainer.train_missing()
    h.gw.refresh("final")
    check_invariants(h, by_id, "end")
    with run.ledger() as led:
        assert led.pending(DATASET) == []
        assert {r.request_id for r in led.requests(DATASET)} == {rid for rid, _ in history}
    for rid, _ in history:
        assert certificate_path(run, rid).exists()
    # the same deletions, in the same order, without faults, races or restarts: the same final state
    ref = make_fake_run(tmp_path / "reference", recs, heldout=held)
    rt = FakeTrainer(ref)
    rt.train_missing()
    for rid, ids in history:
        apply_deletion(ref, ids, request_id=rid)
    rt.train_missing()
    assert final_state(run) == final_state(ref)
    return actions, faults


def test_random_interleavings_with_faults_keep_every_guarantee(tmp_path, monkeypatch, capsys):
    seeds, steps = int(os.environ.get("S3T_MODEL_SEEDS", "2")), int(os.environ.get("S3T_MODEL_STEPS", "150"))
    total_a, total_f = Counter(), Counter()
    for seed in range(seeds):
        a, f = drive(tmp_path / f"s{seed}", seed, steps, monkeypatch)
        total_a += a
        total_f += f
    with capsys.disabled():
        print(f"\nmodel-based: {seeds} seeds x {steps} steps; actions {dict(sorted(total_a.items()))}; "
              f"faults {dict(sorted(total_f.items()))}")
    assert total_a["delete"] > 0 and total_a["retry"] > 0 and total_a["train-refused-stale"] > 0
    assert sum(v for k, v in total_f.items() if k.startswith("crash@")) > 0


# ----- regressions: each finding of the review, named after the behaviour ---------------------------------------
@pytest.fixture()
def served(tmp_path):
    run = make_fake_run(tmp_path, records(36))
    h = Harness(run)
    h.trainer.train_missing()
    h.gw.refresh("trained")
    return h


def victim(run, shard, sl, i=0):
    with run.ledger() as led:
        return led.slice_samples(DATASET, shard, sl)[i][0]


def test_a_retried_request_reconciles_instead_of_replaying_its_stale_plan(served):
    h, run = served, served.run
    seq = run.sequences[0]
    a, b = victim(run, 0, seq[2]), victim(run, 0, seq[1])
    h.engine.fail_next["load"] = 1
    with pytest.raises(BackendFault):
        h.gw.delete([a], request_id="A")  # fails at the switch: journaled and planned
    h.gw.delete([b], request_id="B")  # succeeds (and completes A on the way)
    cert = h.gw.delete([a], request_id="A")  # a retry: reconciles with the ledger as it is now
    for c in (cert, json.loads(certificate_path(run, "B").read_text())):
        assert all(not e.get("deleted_samples_trained_on") for e in c["served"])
    with run.ledger() as led:
        deleted = led.deleted_ids(DATASET)
    for name in h.gw.served()["routing"].values():
        if name:
            assert not (exactness.trained_sample_ids(0 if "-s0-" in name else 1,
                                                    run.store.adapter_manifest(name)["prefix"],
                                                    run.block_manifests()) & deleted)
    # recovery at start-up never fails on an old plan
    h.restart()
    assert verify_run(run.dir)["problems"] == []


def test_recovery_after_a_later_request_destroyed_the_old_plans_blocks(served):
    h, run = served, served.run
    seq = run.sequences[0]
    h.engine.fail_next["load"] = 1
    with pytest.raises(BackendFault):
        h.gw.delete([victim(run, 0, seq[2])], request_id="old")
    # a later deletion destroys the blocks the old plan names
    h.gw.delete([victim(run, 0, seq[0])], request_id="later")
    h.restart()  # `no block for shard 0 prefix ...` used to make this fail for ever
    with run.ledger() as led:
        assert led.pending(DATASET) == []


@pytest.mark.parametrize("rid", ["../run", "/tmp/x", "a" * 129, "bad\0id", "", " x", "a/b", ".hidden", "é"])
def test_request_ids_are_checked_before_anything_is_journaled(served, rid):
    h, run = served, served.run
    before = (run.dir / "run.json").read_bytes()
    with pytest.raises(LedgerError, match="not allowed"):
        h.gw.delete([victim(run, 0, 0)], request_id=rid)
    with run.ledger() as led:
        assert led.requests(DATASET) == []
    assert (run.dir / "run.json").read_bytes() == before
    h.restart()  # the server still starts


def test_a_block_that_finishes_after_a_deletion_is_refused(served):
    from s3t_llm.run import StaleStageError

    h, run = served, served.run
    seq = run.sequences[0]
    job = h.trainer.begin(0, tuple(seq[:2]))
    h.gw.delete([victim(run, 0, seq[1])])
    with pytest.raises(StaleStageError):
        h.trainer.finish(job)
    # and a child over a retrained parent is never served
    h.trainer.train_missing()
    h.gw.refresh("retrained")
    assert verify_run(run.dir)["problems"] == []


def test_staging_of_a_live_job_is_never_cleaned_only_a_dead_ones(served, tmp_path):
    import subprocess
    import sys

    from s3t_llm.adapters import staging_dir

    run = served.run
    mine = staging_dir(run.store.blocks_dir / "shard0", "p0")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan = run.store.blocks_dir / "shard0" / f".staging-p1-pid{dead}-0123abcd"
    orphan.mkdir()
    legacy = run.store.adapters_dir / ".staging-x-01234567"
    legacy.mkdir(parents=True)
    assert run.store.clean_staging() == 2
    assert mine.exists() and not orphan.exists() and not legacy.exists()


def test_held_out_records_are_ledger_samples_deletable_and_erased(tmp_path):
    held = records(4, "h")
    run = make_fake_run(tmp_path, records(24), heldout=held)
    h = Harness(run)
    h.trainer.train_missing()
    h.gw.refresh("t")
    assert sorted(r["id"] for r in run.heldout()) == [r["id"] for r in held]
    h.gw.delete(["h001"])
    assert sorted(r["id"] for r in run.heldout()) == ["h000", "h002", "h003"]
    assert bytes_hold_deleted(run.dir, [held[1]]) == []


def test_reregistering_the_source_never_revives_a_deleted_sample(served):
    h, run = served, served.run
    sid = victim(run, 1, 1)
    h.gw.delete([sid])
    src = json.loads(Path(run.info["source"]).read_text())
    with run.ledger() as led:
        res = led.register(DATASET, src, m=run.shards, L=run.config.s3t.slices, seed=0)
        assert res.n_new == 0 and led.is_deleted(DATASET, sid)
        changed = [dict(r, output="something else") if r["id"] == sid else r for r in src]
        with pytest.raises(LedgerError, match="changed since registration"):
            led.register(DATASET, changed, m=run.shards, L=run.config.s3t.slices, seed=0)
        rec = next(r for r in src if r["id"] == sid)
        assert led.tombstone_matches(DATASET, sid, rec) and not led.tombstone_matches(DATASET, sid, changed[0])


def test_offline_deletion_train_and_unlearn_refuse_while_a_server_holds_the_run(served):
    import subprocess
    import sys

    from s3t_llm.locking import acquire

    run = served.run
    lock = acquire(run.dir, "serve", url="http://127.0.0.1:9")
    try:
        sid = victim(run, 0, 0)
        p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "delete", str(run.dir), "--offline", "--ids", sid],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "served by `s3t serve`" in p.stderr and "http://127.0.0.1:9" in p.stderr
        for code in ("from s3t_llm.locking import hold\nwith hold(%r, 'train'): pass" % str(run.dir),
                     "from s3t_llm.unlearn import unlearn\nunlearn(%r, ['x'], 'ga')" % str(run.dir)):
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            assert p.returncode != 0 and "RunBusy" in p.stderr and "s3t delete" in p.stderr
        with run.ledger() as led:
            assert led.requests(DATASET) == [] and not led.is_deleted(DATASET, sid)
    finally:
        lock.release()
    # with the server gone, the offline deletion goes through
    p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "delete", str(run.dir), "--offline", "--ids", sid],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


def test_the_certificate_records_what_the_backend_really_served(served):
    h, run = served, served.run
    before = h.gw.served()["routing"]
    cert = h.gw.delete([victim(run, 0, run.sequences[0][0])])
    assert {int(k): v for k, v in cert["served_before"]["routing"].items()} == before
    assert {int(k): v for k, v in cert["served_after"]["routing"].items()} == h.gw.served()["routing"]
    assert cert["served_after"]["engine_adapters"] == h.gw.served()["engine_adapters"]
    assert cert["erasure"]["outside_s3t_control"] == [run.info["source"]]


def test_a_mismatch_between_engine_and_ledger_is_never_certified(served):
    h, run = served, served.run
    # the engine holds weights the gateway does not know (loaded behind its back) and cannot remove
    h.engine.engine[999] = {"name": "stray", "path": h.gw.routing[1]["path"], "files": {}}

    def cannot(lid):
        raise BackendFault("cannot remove")
    h.engine.remove_engine_id = cannot
    sid = victim(run, 0, 0)
    with pytest.raises(RuntimeError, match="not certified"):
        h.gw.delete([sid], request_id="x1")
    with run.ledger() as led:
        assert led.request("x1").status != "applied"
    assert not certificate_path(run, "x1").exists()
    # once the engine is clean again, the retry certifies
    del h.engine.engine[999]
    assert h.gw.delete([sid], request_id="x1")["request_id"] == "x1"


def test_verify_finds_planted_problems(served):
    h, run = served, served.run
    h.gw.delete([victim(run, 0, run.sequences[0][1])], request_id="r1")
    assert verify_run(run.dir)["problems"] == []
    # a stale block put back, a certificate edited, deleted text planted in a JSON file
    cert = json.loads(certificate_path(run, "r1").read_text())
    cert["sample_ids"] = ["someone-else"]
    certificate_path(run, "r1").write_text(json.dumps(cert))
    rec = next(r for r in json.loads(Path(run.info["source"]).read_text()) if r["id"] == cert["newly_deleted"][0])
    (run.dir / "notes.json").write_text(json.dumps({"kept": rec}))
    probs = verify_run(run.dir)["problems"]
    assert any("sample ids differ" in p for p in probs)
    assert any("notes.json" in p and "deleted sample" in p for p in probs)


def test_a_schema_1_run_is_refused_then_migrated_in_place_and_erased(tmp_path):
    """A run written by the previous s3t (schema 1: deleted records kept verbatim, held-out records in
    heldout.jsonl, block manifests without the parent's digest) is refused with the command that migrates it;
    `s3t migrate` upgrades it in place, erases the deleted records and keeps the run serving the same."""
    import sqlite3
    import subprocess
    import sys

    recs, held = records(24), records(3, "h")
    run = make_fake_run(tmp_path, recs)
    FakeTrainer(run).train_missing()
    routing_before = {s: (e or {}).get("name") for s, e in run.desired_routing().items()}
    victim_id = victim(run, 1, 0)
    # turn it into a schema-1 run, as the previous release wrote it
    con = sqlite3.connect(str(run.ledger_path), isolation_level=None)
    for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'").fetchall():
        con.execute(f"DROP TRIGGER {t}")
    con.execute("ALTER TABLE samples DROP COLUMN content_hmac")
    con.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    con.execute("INSERT INTO deletion_requests(request_id, dataset, sample_ids_json, received_at, applied_at, status) "
                "VALUES ('old-1', 'train', ?, '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:01+00:00', 'applied')",
                (json.dumps([victim_id]),))
    con.execute("INSERT INTO deletion_events(request_id, event, at) VALUES ('old-1', 'received', 'x'), "
                "('old-1', 'applied', 'y')")
    con.execute("UPDATE samples SET deleted_request='old-1' WHERE sample_id=?", (victim_id,))
    from s3t_llm.ledger import slice_content_hash

    live = [r[0] for r in con.execute("SELECT content_hash FROM samples WHERE shard=1 AND slice=0 AND "
                                      "deleted_request IS NULL AND dataset='train'")]
    con.execute("UPDATE slices SET n_live=?, content_hash=? WHERE dataset='train' AND shard=1 AND slice=0",
                (len(live), slice_content_hash(live)))
    con.close()
    (run.dir / "certificates").mkdir()
    (run.dir / "certificates" / "old-1.json").write_text(json.dumps(
        {"request_id": "old-1", "sample_ids": [victim_id], "newly_deleted": [victim_id], "served": []}))
    (run.dir / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held))
    for s, p in run.store.blocks():
        f = run.store.block_dir(s, p) / "manifest.json"
        man = json.loads(f.read_text())
        man.pop("parent_sha256", None)
        f.write_text(json.dumps(man))
    deleted_rec = next(r for r in recs if r["id"] == victim_id)
    assert bytes_hold_deleted(run.dir, [deleted_rec])  # the old release kept it
    with pytest.raises(LedgerError, match="s3t migrate"):
        run.slice_hashes()
    p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "migrate", str(run.dir)], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "1 deleted record(s) erased" in p.stdout and "3 record(s) moved" in p.stdout
    assert bytes_hold_deleted(run.dir, [deleted_rec]) == []
    assert not (run.dir / "heldout.jsonl").exists() and len(run.heldout()) == 3
    with run.ledger() as led:
        assert led.verify() == [] and led.tombstone_matches(DATASET, victim_id, deleted_rec)
    # lineage recorded: every block that was valid stays valid (the deleted sample's blocks are stale now)
    assert {s: (e or {}).get("name") for s, e in run.desired_routing().items()}.keys() == routing_before.keys()
    assert "stale artifacts destroyed" in p.stdout
    assert verify_run(run.dir)["problems"] == []


def test_delete_through_a_server_that_dies_says_the_request_is_journaled(served):
    """The server journals the request, then dies before answering: `s3t delete` must not say 'not serving';
    it says the request is journaled and completes on restart (and it does)."""
    import socket
    import subprocess
    import sys
    import threading

    from s3t_llm.locking import acquire

    run = served.run
    sid = victim(run, 0, 1)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def die_after_journaling():
        conn, _ = srv.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        head, body = data.split(b"\r\n\r\n", 1)
        n = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
        while len(body) < n:
            body += conn.recv(65536)
        req = json.loads(body)
        with run.ledger() as led:
            led.journal_deletion(DATASET, req["ids"], request_id=req["request_id"])
        conn.close()  # killed before answering

    t = threading.Thread(target=die_after_journaling, daemon=True)
    t.start()
    lock = acquire(run.dir, "serve", url=f"http://127.0.0.1:{port}")
    (run.dir / "serve.json").write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "token": "t"}))
    try:
        p = subprocess.run([sys.executable, "-m", "s3t_llm.cli", "delete", str(run.dir), "--ids", sid,
                            "--request-id", "dies-1"], capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
        srv.close()
    assert p.returncode == 3, p.stderr
    assert "journaled" in p.stderr and "not serving" not in p.stderr and "dies-1" in p.stderr
    served.restart()  # what the next `s3t serve` does
    with run.ledger() as led:
        assert led.request("dies-1").status == "applied"
    assert certificate_path(run, "dies-1").exists()


def test_background_retraining_finishes_picks_up_new_dead_shards_and_restarts_stale_stages(tmp_path, monkeypatch):
    """Issue-11 behaviour on the real Gateway loop with a stand-in trainer: a shard that dies while another
    retrains is retrained too; a deletion landing in the shard being retrained makes the stage stale, and the
    loop trains it again on the new data instead of stopping."""
    import threading

    import s3t_llm.training as training

    run = make_fake_run(tmp_path, records(36))
    trainer = FakeTrainer(run)
    trainer.train_missing()
    gw = Gateway(run, FakeVLLM(), retrain=True)
    gw.refresh("trained")
    gate, entered, calls = threading.Event(), threading.Event(), []

    def fake_train_run(r, shards=None, progress=False, **kw):
        calls.append(list(shards))
        n = 0
        from s3t_llm.training import stage_plan

        for shard, prefix in stage_plan(r, shards):
            valid = exactness.valid_blocks(r.block_manifests(), r.slice_hashes())
            if (shard, prefix) in valid or (len(prefix) > 1 and (shard, prefix[:-1]) not in valid):
                continue
            job = trainer.begin(shard, prefix)
            if len(calls) == 1 and n == 0:
                entered.set()
                gate.wait(30)  # the test lands deletions here, mid-stage
            trainer.finish(job)  # raises StaleStageError when a deletion landed meanwhile
            n += 1
        return {"stages_trained": n}

    monkeypatch.setattr(training, "train_run", fake_train_run)
    seq = run.sequences
    # kill shard 0: every sequence's first slice loses a sample
    gw.delete([victim(run, 0, s[0]) for s in seq])
    assert entered.wait(30)
    # while shard 0 retrains: kill shard 1 too, and land a deletion in shard 0 (its stage goes stale)
    gw.delete([victim(run, 1, s[0]) for s in seq])
    gw.delete([victim(run, 0, seq[0][0], 1)])
    gate.set()
    gw.retrain_thread.join(60)
    assert not gw.retrain_thread.is_alive()
    st = gw.retrain_status
    assert st["state"] == "idle" and st["restarts"] >= 1 and st["dead_shards"] == []
    assert any(1 in c for c in calls)
    assert all(e is not None for e in gw.routing.values())
    assert verify_run(run.dir)["problems"] == []


def test_a_record_in_training_and_held_out_data_is_deleted_from_both_under_a_secret_key(tmp_path):
    import stat

    recs = records(24)
    run = make_fake_run(tmp_path, recs, heldout=[recs[5]])  # the same record (same id) in both datasets
    h = Harness(run)
    h.trainer.train_missing()
    h.gw.refresh("t")
    h.gw.delete([recs[5]["id"]])
    with run.ledger() as led:
        assert led.is_deleted(DATASET, recs[5]["id"]) and led.is_deleted(HELDOUT, recs[5]["id"])
        key = led.tombstone_key
    assert bytes_hold_deleted(run.dir, [recs[5]]) == []
    kf = Path(str(run.ledger_path) + ".tombstone-key")
    assert kf.read_text().strip() == key and stat.S_IMODE(kf.stat().st_mode) == 0o600
    assert key.encode() not in run.ledger_path.read_bytes()  # a copy of the database alone confirms nothing


def test_a_trainer_thread_racing_deletions_never_stores_a_block_of_deleted_data(served):
    """Real threads: one trains stages in a loop (begin, then write through Run.write_block) while another
    deletes through the gateway; the writer lock makes every write see the ledger as of its own check."""
    import threading
    import time

    from s3t_llm.adapters import StoreError
    from s3t_llm.locking import writer_lock
    from s3t_llm.run import StaleStageError

    h, run = served, served.run
    stop, written, refused, bad = threading.Event(), [0], [0], []

    def trainer():
        t = FakeTrainer(run)
        t.trained = h.trainer.trained  # one lineage record
        while not stop.is_set():
            for shard, prefix in [(s, tuple(q[:k])) for s in range(run.shards) for q in run.sequences
                                  for k in range(1, len(q) + 1)]:
                if (shard, prefix) in exactness.valid_blocks(run.block_manifests(), run.slice_hashes()):
                    continue  # like train_run: only missing or stale stages are trained
                try:
                    job = t.begin(shard, prefix)
                    if not job or not job["ids"]:
                        continue
                    man = t.finish(job)
                    with run.ledger() as led:
                        gone = set(man["sample_ids"]) & led.deleted_ids(DATASET)
                    if gone and (shard, prefix) in exactness.valid_blocks(run.block_manifests(), run.slice_hashes()):
                        bad.append((shard, prefix, gone))
                    written[0] += 1
                except (StaleStageError, StoreError, FileNotFoundError):  # stale, or a parent destroyed meanwhile
                    refused[0] += 1

    th = threading.Thread(target=trainer)
    th.start()
    try:
        rng = random.Random(7)
        for i in range(12):
            with run.ledger() as led:
                pool = [sid for s in range(run.shards) for sl in range(run.config.s3t.slices)
                        for sid, _ in led.slice_samples(DATASET, s, sl)]
            h.gw.delete([rng.choice(pool)], request_id=f"race-{i}")
            with writer_lock(run.dir):  # a consistent view: no write in flight while the invariants are read
                check_invariants(h, {r["id"]: r for r in records(36)}, f"race {i}", reconciled=False)
        t_end = time.time() + 60  # let the trainer land writes of current data too (it may lose every race)
        while written[0] == 0 and time.time() < t_end:
            time.sleep(0.05)
    finally:
        stop.set()
        th.join(60)
    assert bad == [] and written[0] > 0
    h.gw.refresh("end")
    check_invariants(h, {r["id"]: r for r in records(36)}, "race end")
