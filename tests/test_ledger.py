"""ledger.py: registration, stable keyed assignment, slice hashes, the deletion journal, crash safety."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from s3t_llm import paths
from s3t_llm.ledger import (
    SCHEMA_VERSION,
    DeletionRequest,
    Ledger,
    LedgerError,
    UnknownSampleError,
    default_key,
    slice_content_hash,
)
from s3t_llm.records import content_hash, normalise, sample_id

REPO_ROOT = Path(__file__).resolve().parents[1]
TABLES = ("meta", "datasets", "samples", "slices", "deletion_requests", "deletion_events")


def synth(n: int, start: int = 0, with_id: bool = False) -> list[dict]:
    out = []
    for i in range(start, start + n):
        r = {"instruction": f"Do task {i}.", "input": "" if i % 3 else f"context {i}", "output": f"Answer {i}."}
        if with_id:
            r["id"] = f"s{i}"
        out.append(r)
    return out


def dump(db: Path) -> dict[str, list]:
    """Every row of every table, in a stable order (a separate connection: sees committed state)."""
    con = sqlite3.connect(str(db))
    try:
        return {t: sorted(con.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES}
    finally:
        con.close()


def all_cells(led: Ledger, name: str) -> dict[str, tuple[int, int]]:
    info = led.dataset(name)
    out = {}
    for s in range(info.m):
        for l in range(info.L):
            for sid, _ in led.slice_samples(name, s, l, include_deleted=True):
                out[sid] = (s, l)
    return out


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "sub" / "ledger.sqlite"


@pytest.fixture
def led(db):
    with Ledger(db) as ledger:
        yield ledger


# -- opening ---------------------------------------------------------------------------------------


def test_open_creates_wal_db_with_schema(db):
    with Ledger(db) as led:
        assert led.datasets() == []
    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert con.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == str(SCHEMA_VERSION)
    names = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='trigger'")}
    assert {"deletion_requests_no_delete", "deletion_events_no_delete", "deletion_requests_status_forward"} <= names
    con.close()
    with Ledger(db):  # reopening an existing ledger is fine
        pass


def test_a_checkpoint_that_must_not_wait_returns_at_once_while_a_reader_holds_an_old_snapshot(db):
    """A deletion checkpoints right after journaling with wait=False: a reader holding an old snapshot must not
    make it wait (a TRUNCATE checkpoint otherwise waits the busy timeout, 30 s); erase() later must succeed."""
    with Ledger(db) as led:
        led._con.execute("CREATE TABLE IF NOT EXISTS t (x)")
        reader = sqlite3.connect(str(db), isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM meta").fetchone()  # holds its snapshot until COMMIT
        led._con.execute("INSERT INTO t VALUES (1)")
        t0 = time.perf_counter()
        assert led.checkpoint(wait=False) is False
        assert time.perf_counter() - t0 < 2.0
        assert led._con.execute("PRAGMA busy_timeout").fetchone()[0] == 30000  # restored
        reader.execute("COMMIT")
        reader.close()
        assert led.checkpoint(wait=False) is True


def test_open_non_database_is_ledger_error(tmp_path):
    p = tmp_path / "junk.sqlite"
    p.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LedgerError, match="not a usable ledger database"):
        Ledger(p)


# -- registration ----------------------------------------------------------------------------------


def test_register_balanced_cells_and_lookups(led):
    recs = synth(1000)
    res = led.register("toy", recs, m=3, L=4, seed=0, source="synthetic")
    assert (res.dataset, res.n_new, res.n_existing, res.n_duplicates_collapsed) == ("toy", 1000, 0, 0)
    info = led.dataset("toy")
    assert (info.m, info.L, info.seed, info.n_samples, info.n_live, info.source) == (3, 4, 0, 1000, 1000, "synthetic")
    assert led.datasets() == [info]

    cells = all_cells(led, "toy")
    counts = Counter(cells.values())
    assert len(counts) == 12
    assert set(counts.values()) == {83, 84}  # 1000 / 12 = 83.33: exactly balanced, +-1
    assert sum(counts.values()) == 1000

    ids = [sample_id(r) for r in recs]
    assert led.cell_of("toy", ids) == {s: cells[s] for s in ids}
    by_id = {sample_id(r): normalise(r) for r in recs}
    for s in range(3):
        for l in range(4):
            rows = led.slice_samples("toy", s, l)
            assert all(by_id[sid] == rec for sid, rec in rows)
            assert led.slice_hash("toy", s, l) == slice_content_hash(content_hash(r) for _, r in rows)
    assert led.deleted_cells("toy") == {} and led.deleted_ids("toy") == set()
    assert led.is_deleted("toy", ids[0]) is False
    assert led.verify() == []


def test_assignment_follows_documented_rule(led):
    recs = synth(250)
    led.register("toy", recs, m=5, L=4, seed=7)
    key = hashlib.sha256(b"s3t-ledger:7").digest()
    assert key == default_key(7)
    order = sorted((sample_id(r) for r in recs), key=lambda s: hmac.new(key, s.encode(), hashlib.sha256).hexdigest())
    cells = led.cell_of("toy", order)
    assert [cells[s] for s in order] == [(i % 5, (i // 5) % 4) for i in range(250)]
    # idx order inside a cell is the HMAC order
    assert [sid for sid, _ in led.slice_samples("toy", 2, 3)] == [s for i, s in enumerate(order) if (i % 5, (i // 5) % 4) == (2, 3)]


def test_user_key_replaces_seed_key(tmp_path):
    recs = synth(200)
    with Ledger(tmp_path / "a.sqlite") as a, Ledger(tmp_path / "b.sqlite") as b:
        a.register("d", recs, m=4, L=2, seed=0, key=b"secret")
        b.register("d", recs, m=4, L=2, seed=0, key=b"secret".hex())
        assert all_cells(a, "d") == all_cells(b, "d")
        with pytest.raises(LedgerError, match="different key"):
            a.register("d", recs, m=4, L=2, seed=0)


def test_reregister_is_idempotent(led, db):
    recs = synth(1000)
    led.register("toy", recs, m=3, L=4)
    before = dump(db)
    res = led.register("toy", list(reversed(recs)), m=3, L=4)
    assert (res.n_new, res.n_existing, res.n_duplicates_collapsed) == (0, 1000, 0)
    assert dump(db) == before
    # a subset is fine too and changes nothing
    res = led.register("toy", recs[:10], m=3, L=4)
    assert (res.n_new, res.n_existing) == (0, 10)
    assert dump(db) == before


def test_changed_record_under_same_id_is_rejected_and_ledger_unchanged(led, db):
    recs = synth(300, with_id=True)
    led.register("toy", recs, m=3, L=4)
    before = dump(db)
    changed = [dict(r) for r in recs]
    changed[42]["output"] = "A different answer."
    with pytest.raises(LedgerError, match=r"record 's42' changed since registration"):
        led.register("toy", changed + synth(5, start=1000, with_id=True), m=3, L=4)
    assert dump(db) == before
    # whitespace-only differences are not a change
    same = [dict(r) for r in recs]
    same[42]["output"] = "  " + same[42]["output"] + "\r\n"
    assert led.register("toy", same, m=3, L=4).n_existing == 300
    assert dump(db) == before


def test_reregister_with_other_parameters_is_rejected(led, db):
    recs = synth(100)
    led.register("toy", recs, m=3, L=4, seed=1)
    before = dump(db)
    for kw in ({"m": 2, "L": 4, "seed": 1}, {"m": 3, "L": 5, "seed": 1}, {"m": 3, "L": 4, "seed": 2}):
        with pytest.raises(LedgerError, match=r"registered with m=3, L=4, seed=1"):
            led.register("toy", recs, **kw)
    assert dump(db) == before


def test_duplicates_collapse_and_conflicting_ids_fail(led, db):
    recs = synth(50)
    dup_ws = {**recs[3], "output": recs[3]["output"] + "\n"}  # same content after normalisation
    res = led.register("toy", recs + [recs[3], dup_ws, recs[7]], m=2, L=2)
    assert (res.n_new, res.n_duplicates_collapsed) == (50, 3)
    assert led.dataset("toy").n_samples == 50
    # deleting the content deletes every copy: nothing with that content stays live anywhere
    led.journal_deletion("toy", [sample_id(recs[3])])
    live = [rec for s in range(2) for l in range(2) for _, rec in led.slice_samples("toy", s, l)]
    assert len(live) == 49 and normalise(recs[3]) not in live

    before = dump(db)
    bad = synth(5, with_id=True) + [{"id": "s2", "instruction": "other", "output": "content"}]
    with pytest.raises(LedgerError, match=r"sample id 's2' appears with different content \(records 2 and 5\)"):
        led.register("other", bad, m=2, L=2)
    assert dump(db) == before


def test_new_ids_are_appended_without_moving_old_ones(led):
    led.register("toy", synth(100), m=3, L=4)
    old = all_cells(led, "toy")
    res = led.register("toy", synth(110), m=3, L=4)
    assert (res.n_new, res.n_existing) == (10, 100)
    new = all_cells(led, "toy")
    assert {s: new[s] for s in old} == old
    assert led.dataset("toy").n_samples == 110
    counts = Counter(new.values())
    assert max(counts.values()) - min(counts.values()) <= 1
    assert led.verify() == []  # idx 100..109 follow the same round-robin formula


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"name": "", "m": 2, "L": 2}, "dataset name"),
        ({"name": "a/b", "m": 2, "L": 2}, "dataset name"),
        ({"name": "ok", "m": 0, "L": 2}, "m must be >= 1"),
        ({"name": "ok", "m": True, "L": 2}, "m must be an integer, got bool"),
        ({"name": "ok", "m": 2, "L": 1.5}, "L must be an integer, got float"),
        ({"name": "ok", "m": 2, "L": 2, "seed": "0"}, "seed must be an integer"),
    ],
)
def test_register_bad_parameters(led, db, kwargs, match):
    before = dump(db)
    name = kwargs.pop("name")
    with pytest.raises(LedgerError, match=match):
        led.register(name, synth(10), **kwargs)
    assert dump(db) == before


def test_register_bad_record_names_index_and_writes_nothing(led, db):
    before = dump(db)
    recs = synth(20)
    recs[13] = {"instruction": "x", "output": 5}
    with pytest.raises(LedgerError, match=r"dataset 'toy': record 13: field 'output' must be a string, got int"):
        led.register("toy", recs, m=2, L=2)
    with pytest.raises(LedgerError, match="no records"):
        led.register("toy", [], m=2, L=2)
    assert dump(db) == before
    assert led.datasets() == []
    with pytest.raises(LedgerError, match="unknown dataset 'toy'"):
        led.dataset("toy")


def test_register_file(led, tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in synth(30)))
    res = led.register_file("f", p, m=2, L=3)
    assert res.n_new == 30 and led.dataset("f").source == str(p)
    p.write_text('{"instruction": "a", "output": }\n')
    with pytest.raises(LedgerError, match="malformed JSONL at line 1"):
        led.register_file("g", p, m=2, L=3)


# -- stability -------------------------------------------------------------------------------------


def test_deletions_never_move_samples(led):
    recs = synth(1000)
    led.register("toy", recs, m=3, L=4)
    before = all_cells(led, "toy")
    ids = sorted(before)
    victims = ids[::37]
    led.journal_deletion("toy", victims[:10])
    led.journal_deletion("toy", victims[10:])
    after = all_cells(led, "toy")
    assert after == before  # every sample, deleted or not, is where it was
    assert led.cell_of("toy", ids) == before
    assert led.deleted_ids("toy") == set(victims)
    assert led.dataset("toy").n_live == 1000 - len(victims)
    assert sum(led.deleted_cells("toy").values()) == len(victims)
    assert led.deleted_cells("toy") == dict(Counter(before[v] for v in victims))
    with pytest.raises(sqlite3.DatabaseError, match="never change"):
        led._con.execute("UPDATE samples SET shard = shard + 1 WHERE dataset='toy'")


def test_same_seed_same_assignment_other_seed_differs(tmp_path):
    recs = synth(600)
    cells = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        with Ledger(tmp_path / f"{name}.sqlite") as led:
            led.register("toy", list(reversed(recs)) if name == "b" else recs, m=3, L=4, seed=seed)
            cells[name] = all_cells(led, "toy")
    assert cells["a"] == cells["b"]  # input order does not matter either
    differ = sum(cells["a"][s] != cells["c"][s] for s in cells["a"])
    assert differ > 400  # ~11/12 of 600 expected to move under another key


# -- slice hashes ----------------------------------------------------------------------------------


def test_slice_hashes_change_only_for_touched_slices(led):
    recs = synth(1000)
    led.register("toy", recs, m=3, L=4)
    h0 = led.slice_hashes("toy")
    assert len(h0) == 12 and len(set(h0.values())) == 12
    cell_a = led.slice_samples("toy", 0, 1)
    cell_b = led.slice_samples("toy", 2, 3)
    victims = [cell_a[0][0], cell_a[5][0], cell_b[-1][0]]
    req = led.journal_deletion("toy", victims)
    h1 = led.slice_hashes("toy")
    assert {c for c in h0 if h0[c] != h1[c]} == {(0, 1), (2, 3)}
    for cell in ((0, 1), (2, 3)):
        live = led.slice_samples("toy", *cell)
        assert h1[cell] == slice_content_hash(content_hash(r) for _, r in live)
        assert led.slice_hash("toy", *cell) == h1[cell]
    assert len(led.slice_samples("toy", 0, 1)) == len(cell_a) - 2
    assert len(led.slice_samples("toy", 0, 1, include_deleted=True)) == len(cell_a)
    assert req.newly_deleted == tuple(victims)
    # re-deleting already deleted samples touches nothing
    again = led.journal_deletion("toy", victims[:2])
    assert again.newly_deleted == () and again.status == "received"
    assert led.slice_hashes("toy") == h1
    with pytest.raises(LedgerError, match=r"cell \(3, 0\) out of range"):
        led.slice_hash("toy", 3, 0)


def test_empty_cells_have_the_empty_hash(led):
    led.register("tiny", synth(3), m=2, L=3)
    hashes = led.slice_hashes("tiny")
    assert len(hashes) == 6
    assert Counter(hashes.values())[hashlib.sha256(b"").hexdigest()] == 3


# -- deletion journal ------------------------------------------------------------------------------


def test_journal_status_progression_and_events(led):
    recs = synth(100)
    led.register("toy", recs, m=2, L=2)
    ids = [sample_id(r) for r in recs[:4]]
    req = led.journal_deletion("toy", ids, request_id="req-1")
    assert isinstance(req, DeletionRequest)
    assert (req.request_id, req.status, req.sample_ids, req.newly_deleted) == ("req-1", "received", tuple(ids), tuple(ids))
    assert req.planned_at is None and req.applied_at is None and req.plan is None
    assert [r.request_id for r in led.pending("toy")] == ["req-1"]

    plan = {"retrain": [[0, 1]], "cost": 3}
    req = led.mark_planned("req-1", plan)
    assert req.status == "planned" and req.plan == plan and req.planned_at is not None
    assert [r.request_id for r in led.requests("toy", status="planned")] == ["req-1"]
    req = led.mark_planned("req-1", {"retrain": [], "cost": 0})  # re-planning before applying is allowed
    assert req.plan == {"retrain": [], "cost": 0}

    req = led.mark_applied("req-1", note="shard 0 retrained")
    assert req.status == "applied" and req.applied_at is not None and req.note == "shard 0 retrained"
    assert led.pending("toy") == []
    assert led.mark_applied("req-1") == req  # idempotent, nothing appended
    with pytest.raises(LedgerError, match="already applied"):
        led.mark_planned("req-1", plan)

    events = led.events("req-1")
    assert [e["event"] for e in events] == ["received", "planned", "replanned", "applied"]
    assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    assert events[0]["payload"]["newly_deleted"] == ids
    assert events[1]["payload"] == plan
    assert events[3]["payload"] == {"note": "shard 0 retrained"}

    led.journal_deletion("toy", [sample_id(recs[10])], request_id="req-2")
    led.journal_deletion("toy", [sample_id(recs[11])], request_id="req-0")
    assert [r.request_id for r in led.pending("toy")] == ["req-2", "req-0"]  # received order
    assert [r.request_id for r in led.requests("toy")] == ["req-1", "req-2", "req-0"]
    assert led.request("req-2").newly_deleted == (sample_id(recs[10]),)
    assert led.verify() == []
    with pytest.raises(LedgerError, match="unknown deletion request 'nope'"):
        led.request("nope")
    with pytest.raises(LedgerError, match="status must be one of"):
        led.requests("toy", status="done")
    with pytest.raises(LedgerError, match="not JSON-serialisable"):
        led.mark_planned("req-2", {"x": object()})


def test_journal_triggers_forbid_rewriting_history(led, db):
    led.register("toy", synth(20), m=2, L=2)
    ids = sorted(all_cells(led, "toy"))
    led.journal_deletion("toy", ids[:2], request_id="r1")
    led.mark_planned("r1", {"p": 1})
    led.journal_deletion("toy", ids[2:3], request_id="r2")
    led.mark_applied("r2")
    before = dump(db)
    con = sqlite3.connect(str(db))
    bad = [
        ("DELETE FROM deletion_requests WHERE request_id='r1'", "append-only"),
        ("DELETE FROM deletion_events", "append-only"),
        ("UPDATE deletion_events SET event='x'", "append-only"),
        ("UPDATE deletion_requests SET status='received' WHERE request_id='r1'", "only move forward"),
        ("UPDATE deletion_requests SET status='planned' WHERE request_id='r2'", "only move forward|final"),
        ("UPDATE deletion_requests SET sample_ids_json='[]' WHERE request_id='r1'", "immutable"),
        ("UPDATE deletion_requests SET request_id='r9' WHERE request_id='r1'", "immutable"),
        ("UPDATE deletion_requests SET received_at='2000' WHERE request_id='r1'", "immutable"),
        ("UPDATE deletion_requests SET note='rewritten' WHERE request_id='r2'", "final"),
        (f"UPDATE samples SET deleted_request=NULL WHERE sample_id='{ids[0]}'", "stays deleted"),
    ]
    for sql, match in bad:
        with pytest.raises(sqlite3.DatabaseError, match=match):
            con.execute(sql)
        con.rollback()
    # moving forward by hand is allowed by the triggers
    con.execute("UPDATE deletion_requests SET status='applied' WHERE request_id='r1'")
    con.rollback()
    con.close()
    assert dump(db) == before


def test_journal_idempotent_request_id(led, db):
    led.register("toy", synth(50), m=2, L=2)
    ids = sorted(all_cells(led, "toy"))[:5]
    first = led.journal_deletion("toy", ids, request_id="gdpr-7")
    before = dump(db)
    again = led.journal_deletion("toy", list(reversed(ids)), request_id="gdpr-7")
    assert again == first
    assert dump(db) == before
    assert len(led.events("gdpr-7")) == 1
    with pytest.raises(LedgerError, match="'gdpr-7' already exists with different sample ids"):
        led.journal_deletion("toy", ids[:4], request_id="gdpr-7")
    led.register("other", synth(5), m=1, L=1)
    before = dump(db)
    with pytest.raises(LedgerError, match="already exists with dataset 'toy'"):
        led.journal_deletion("other", [sample_id(synth(1)[0])], request_id="gdpr-7")
    assert dump(db) == before
    auto = led.journal_deletion("toy", [ids[0]])
    assert len(auto.request_id) == 32 and auto.newly_deleted == ()


def test_journal_bad_input_leaves_tables_unchanged(led, db):
    led.register("toy", synth(50), m=2, L=2)
    ids = sorted(all_cells(led, "toy"))
    before = dump(db)
    unknown = [f"nope{i}" for i in range(12)]
    with pytest.raises(UnknownSampleError) as ei:
        led.journal_deletion("toy", ids[:3] + unknown)
    assert ei.value.unknown == unknown
    assert "12 unknown sample id(s): 'nope0'" in str(ei.value) and "and 2 more" in str(ei.value)
    with pytest.raises(LedgerError, match=r"duplicate ids in deletion request: '.*'"):
        led.journal_deletion("toy", [ids[0], ids[1], ids[0]])
    with pytest.raises(LedgerError, match="empty deletion list"):
        led.journal_deletion("toy", [])
    with pytest.raises(LedgerError, match="not a single str"):
        led.journal_deletion("toy", ids[0])
    with pytest.raises(LedgerError, match="unknown dataset 'nope'"):
        led.journal_deletion("nope", ids[:1])
    with pytest.raises(UnknownSampleError):
        led.cell_of("toy", ["nope"])
    with pytest.raises(UnknownSampleError):
        led.is_deleted("toy", "nope")
    assert dump(db) == before


def test_verify_detects_tampering(led, db):
    led.register("toy", synth(40), m=2, L=2)
    assert led.verify("toy") == []
    con = sqlite3.connect(str(db))
    con.execute("UPDATE slices SET n_live = n_live - 1 WHERE shard=0 AND slice=0")
    con.commit()
    con.close()
    problems = led.verify("toy")
    assert len(problems) == 1 and "slice (0, 0)" in problems[0]


# -- crash safety: real SIGKILL ------------------------------------------------------------------

REGISTER_SCRIPT = textwrap.dedent(
    """
    import sys
    from s3t_llm.ledger import Ledger
    n = int(sys.argv[2])
    recs = [{"instruction": f"Task number {i}.", "input": "", "output": "answer " * 10 + str(i)}
            for i in range(n)]
    led = Ledger(sys.argv[1])
    print("started", flush=True)
    led.register("big", recs, m=4, L=3)
    print("done", flush=True)
    """
)

JOURNAL_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from s3t_llm.ledger import Ledger
    led = Ledger(sys.argv[1])
    recs = [{"instruction": f"Task {i}.", "output": f"Answer {i}."} for i in range(20000)]
    led.register("j", recs, m=4, L=3)
    ids = sorted(s for c in range(12) for s, _ in led.slice_samples("j", c // 3, c % 3))
    print("started", flush=True)
    t0 = time.time()
    k = 0
    while time.time() - t0 < 60:
        batch = ids[(k * 37) % 19000:(k * 37) % 19000 + 300]   # overlapping batches
        led.journal_deletion("j", batch, request_id=f"r{k}")
        if k % 2 == 0:
            led.mark_planned(f"r{k}", {"k": k, "cells": []})
        if k % 3 == 0:
            led.mark_applied(f"r{k}", note=f"done {k}")
        print(f"committed r{k}", flush=True)
        k += 1
    print("finished", flush=True)
    """
)


def _spawn(script: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    line = p.stdout.readline().strip()
    assert line == "started", (line, p.stderr.read() if p.poll() is not None else "")
    return p


def _kill(p: subprocess.Popen) -> bool:
    """SIGKILL the child; True if it was still running."""
    running = p.poll() is None
    if running:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=30)
    p.stdout.close()
    p.stderr.close()
    return running


def _integrity(db: Path) -> str:
    con = sqlite3.connect(str(db))
    try:
        return con.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        con.close()


def test_sigkill_during_register_is_all_or_nothing(tmp_path):
    n = 200_000
    outcomes = []
    for attempt in range(3):
        db = tmp_path / f"kill{attempt}.sqlite"
        wal = Path(str(db) + "-wal")
        p = _spawn(REGISTER_SCRIPT, str(db), str(n))
        # Wait until the big transaction is visibly writing (WAL past 4 MB), then kill.
        deadline = time.time() + 60
        while p.poll() is None and time.time() < deadline:
            if wal.exists() and wal.stat().st_size > 4_000_000:
                break
            time.sleep(0.005)
        was_running = _kill(p)
        assert _integrity(db) == "ok"
        with Ledger(db) as led:
            con = led._con
            n_ds = con.execute("SELECT COUNT(*) FROM datasets WHERE name='big'").fetchone()[0]
            n_rows = con.execute("SELECT COUNT(*) FROM samples WHERE dataset='big'").fetchone()[0]
            n_slices = con.execute("SELECT COUNT(*) FROM slices WHERE dataset='big'").fetchone()[0]
            assert (n_ds, n_rows, n_slices) in {(0, 0, 0), (1, n, 12)}, "partial registration after SIGKILL"
            assert led.verify() == []
            outcomes.append("absent" if n_rows == 0 else "complete")
            if n_rows == 0:
                assert was_running
                # the ledger is usable after the crash: a fresh registration completes
                res = led.register("small", synth(100), m=4, L=3)
                assert res.n_new == 100 and led.verify() == []
                break
    print(f"register kill outcomes: {outcomes}")
    assert "absent" in outcomes, f"never killed mid-transaction in 3 tries: {outcomes}"


@pytest.mark.parametrize("n_before, delay", [(5, 0.0), (20, 0.011)])
def test_sigkill_during_journaling_leaves_no_half_applied_request(tmp_path, n_before, delay):
    db = tmp_path / "journal.sqlite"
    p = _spawn(JOURNAL_SCRIPT, str(db))
    # Let it commit n_before requests (however slow the machine), then kill it while it loops:
    # it is almost always inside a transaction (each one fsyncs), sometimes between two.
    for _ in range(n_before):
        assert p.stdout.readline().startswith("committed r"), p.stderr.read() if p.poll() is not None else ""
    time.sleep(delay)
    assert _kill(p), "the journaling loop ended before it was killed"
    assert _integrity(db) == "ok"
    with Ledger(db) as led:
        reqs = led.requests("j")
        assert len(reqs) >= n_before
        deleted = led.deleted_ids("j")
        attributed = Counter()
        for r in reqs:
            assert set(r.sample_ids) <= deleted, f"request {r.request_id} half-applied"
            attributed.update(r.newly_deleted)
            kinds = [e["event"] for e in led.events(r.request_id)]
            expected = ["received"] + (["planned"] if r.planned_at else []) + (["applied"] if r.status == "applied" else [])
            assert kinds == expected, (r.request_id, r.status, kinds)
        # every deleted sample was deleted by exactly one journaled request
        assert set(attributed) == deleted and max(attributed.values()) == 1
        assert led.verify() == []
        # the journal continues from where it was
        k = len(reqs)
        assert led.request(f"r{k - 1}").request_id == f"r{k - 1}"
        live = sorted(set(all_cells(led, "j")) - deleted)[:3]
        assert led.journal_deletion("j", live, request_id=f"r{k}").newly_deleted == tuple(live)
        print(f"killed after {len(reqs)} requests, {len(deleted)} samples deleted")


# -- the real Alpaca file --------------------------------------------------------------------------


@pytest.mark.skipif(not paths.alpaca_path().exists(), reason=f"Alpaca file not found at {paths.alpaca_path()}")
def test_register_real_alpaca(tmp_path):
    db = tmp_path / "alpaca.sqlite"
    with Ledger(db) as led:
        t0 = time.perf_counter()
        res = led.register_file("alpaca", paths.alpaca_path(), m=5, L=4)
        dt = time.perf_counter() - t0
        print(f"registered {res.n_new} Alpaca samples in {dt:.2f} s (register: {res.seconds:.2f} s)")
        assert dt < 30
        assert res.n_new + res.n_duplicates_collapsed == 52002
        assert res.n_existing == 0
        info = led.dataset("alpaca")
        assert info.n_samples == info.n_live == res.n_new
        counts = [len(led.slice_samples("alpaca", s, l)) for s in range(5) for l in range(4)]
        assert sum(counts) == res.n_new and max(counts) - min(counts) <= 1
        before = dump(db)
        again = led.register_file("alpaca", paths.alpaca_path(), m=5, L=4)
        print(f"re-registration (idempotent) took {again.seconds:.2f} s")
        assert (again.n_new, again.n_existing) == (0, res.n_new)
        assert dump(db) == before
