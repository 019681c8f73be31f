"""``s3t verify RUN``: an auditor's independent check of a run, from its files, its ledger and its server.

Every check re-derives what it needs (``s3t_llm.exactness`` for the rule, the ledger for the data); nothing
trusts a certificate, ``served.json`` or a manifest's own claims without recomputing them:

* the ledger's own consistency (``Ledger.verify``: cells, slice hashes, journal, tombstones hold no content),
  and no free pages left in the database file (``PRAGMA freelist_count``);
* every block: its tensor file's digest, its validity under the rule (stale artifacts must not exist), no
  deleted sample among the ids it was trained on; every prefix adapter and derived (unlearned) adapter: file
  digest, built from current blocks, never trained on a deleted id;
* no deleted content in the run directory: every JSON/JSONL file is parsed and each record-like object is
  checked against the tombstones (keyed HMAC); with ``--source FILE`` the deleted records are recovered from
  the user's file (matched by HMAC) and their text is searched for in every byte of every file (raw UTF-8,
  JSON-escaped, ASCII-escaped, and as token ids: text and little-endian int32/int64);
* when a server holds the run: the engine's own adapter list equals the routing, and the routing equals what
  the ledger says must be served;
* every certificate against the journal (ids, status, newly deleted samples, served evidence), and every
  applied request has its certificate;
* ``--replay``: one served prefix is retrained from the ledger's live data in a scratch directory (outside the
  run, removed afterwards) and its blocks compared with the stored digests bit for bit; where the recorded
  training environment differs from this one, the comparison uses a stated tolerance and says so.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from pathlib import Path

from . import exactness
from .adapters import ADAPTER_FILE, BLOCK_FILE, sha256_file, staging_owner_alive
from .ledger import content_hmac
from .run import DATASET, Run

REPLAY_TOLERANCE = 1e-4  # max |a - b| / (max |b| + 1e-12) when the training environment differs
_MAX_SCAN = 256 << 20


class Report:
    def __init__(self, echo):
        self.checks = 0
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.echo = echo or (lambda *_: None)

    def check(self, ok: bool, problem: str) -> bool:
        self.checks += 1
        if not ok:
            self.problems.append(problem)
        return ok


def _files(root: Path):
    for p in sorted(root.rglob("*")):
        try:
            if p.is_file() and not p.is_symlink() and p.stat().st_size <= _MAX_SCAN:
                yield p
        except FileNotFoundError:  # removed while we walked (a live server's work)
            continue


def _records_in(obj):
    """Record-like objects (Alpaca fields) anywhere in a parsed JSON value."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            if "instruction" in x and "output" in x:
                yield x
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)


def _parsed_json(p: Path):
    try:
        text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return []
    if p.suffix == ".jsonl":
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out
    try:
        return [json.loads(text)]
    except ValueError:
        return []


def _needles(rec: dict, tokenizer=None) -> list[tuple[str, bytes]]:
    out = []
    for field in ("instruction", "input", "output"):
        t = rec.get(field) or ""
        if len(t.strip()) < 12:  # short fields ("", "Yes") are everywhere; they prove nothing
            continue
        forms = {t.encode("utf-8"), json.dumps(t)[1:-1].encode(), json.dumps(t, ensure_ascii=False)[1:-1].encode()}
        out += [(f"{field} ({len(t)} chars)", f) for f in forms]
        if tokenizer is not None:
            ids = tokenizer(t, add_special_tokens=False)["input_ids"][1:-1]  # inner tokens: context-free
            if len(ids) >= 4:
                import numpy as np

                out.append((f"{field} as token ids (text)", ", ".join(map(str, ids)).encode()))
                out.append((f"{field} as token ids (text)", ",".join(map(str, ids)).encode()))
                out.append((f"{field} as token ids (int32)", np.asarray(ids, dtype="<i4").tobytes()))
                out.append((f"{field} as token ids (int64)", np.asarray(ids, dtype="<i8").tobytes()))
    return out


def verify_run(run_dir: str | Path, *, certificate: str | None = None, replay: bool = False,
               source: str | None = None, echo=None) -> dict:
    run = Run.open(run_dir)
    rep = Report(echo)
    datasets = run.datasets()
    with run.ledger() as led:
        for p in led.verify():
            rep.check(False, f"ledger: {p}")
        rep.checks += 1
        deleted = set().union(*(led.deleted_ids(d) for d in datasets))
        tomb = {}
        tkey = led.tombstone_key
        for d in datasets:
            tomb.update({h: (d, sid) for sid, h in led.tombstones(d).items()})
        requests = led.requests(DATASET)
        applied = [r for r in requests if r.status == "applied"]
        pending = [r.request_id for r in requests if r.status != "applied"]
    con = sqlite3.connect(f"file:{run.ledger_path}?mode=ro", uri=True)
    try:
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        con.close()
    rep.check(free == 0 or not deleted, f"ledger: {free} free pages (erased content could survive in them)")
    rep.echo(f"ledger: {len(deleted)} deleted sample(s), {len(applied)} applied and {len(pending)} pending request(s)")

    # ----- artifacts, against the rule --------------------------------------------------------------------
    snap = run.snapshot()
    valid = exactness.valid_blocks(snap.blocks, snap.hashes)
    store = run.store
    for (shard, prefix), man in sorted(snap.blocks.items()):
        where = f"block shard {shard} prefix {list(prefix)}"
        rep.check(sha256_file(store.block_dir(shard, prefix) / BLOCK_FILE) == man["sha256"], f"{where}: corrupt")
        rep.check((shard, prefix) in valid, f"{where}: stale (trained on data that is no longer live, or over "
                                            "another parent) but still stored")
        hit = sorted(set(man.get("sample_ids") or []) & deleted)
        rep.check(not hit, f"{where}: trained on deleted samples {hit[:5]}")
    for name, man in sorted(snap.adapters.items()):
        rep.check(sha256_file(store.adapter_dir(name) / ADAPTER_FILE) == man["sha256"], f"adapter {name}: corrupt")
        cur = exactness.chain_current(man["shard"], man["blocks"], snap.blocks, valid)
        rep.check(cur, f"adapter {name}: not built from current blocks (stale) but still stored")
        if cur:
            hit = sorted(exactness.trained_sample_ids(man["shard"], man["prefix"], snap.blocks) & deleted)
            rep.check(not hit, f"adapter {name}: trained on deleted samples {hit[:5]}")
    for name, man in sorted(snap.derived.items()):
        rep.check(exactness.chain_current(man["shard"], man["source_blocks"], snap.blocks, valid),
                  f"unlearned adapter {name}: derived from blocks that are no longer current")
    # A directory without its manifest is invisible to the store: weights could hide there.
    for pattern, man_name in (("blocks/shard*/*", "manifest.json"), ("adapters/*", "s3t_manifest.json"),
                              ("unlearned/*", "unlearn_manifest.json")):
        for p in sorted(run.dir.glob(pattern)):
            if not p.is_dir() or (p.name.startswith(".staging-") and staging_owner_alive(p)):
                continue  # a live writer's work in progress
            rep.check((p / man_name).exists(), f"{p.relative_to(run.dir)}: a directory without its manifest "
                                               "(leftover of an interrupted write or removal)")
    # The activation cache's disk tier: no group of a changed slice or of an invalid lower block, and no dead
    # trainer's (live trainers clear theirs when training returns; a deletion removes dead ones).
    from .activation_cache import stale_groups

    for g in stale_groups(run.dir, snap.hashes, snap.blocks, valid):
        rep.check(False, f"{Path(g['path']).relative_to(run.dir)}: activation cache entries that must not exist "
                         f"({g['problem']})")
    for p in sorted(run.dir.glob(".trainer-*/act")):
        rep.check(staging_owner_alive(p.parent), f"{p.relative_to(run.dir)}: activation cache of a dead trainer "
                                                 "(data derived from samples)")
    desired = run.desired_routing(snap)
    rep.echo(f"artifacts: {len(snap.blocks)} blocks, {len(snap.adapters)} adapters, {len(snap.derived)} derived; "
             f"serves {[(s, e and e['depth']) for s, e in desired.items()]}")

    # ----- deleted content --------------------------------------------------------------------------------
    scanned = 0
    for p in _files(run.dir):
        if p.suffix not in (".json", ".jsonl"):
            continue
        for obj in _parsed_json(p):
            for rec in _records_in(obj):
                from .records import RecordError, identify

                try:
                    _, _, text = identify(rec)
                except RecordError:
                    continue
                h = content_hmac(tkey, text)
                rep.check(h not in tomb, f"{p.relative_to(run.dir)}: holds the record of deleted sample "
                                         f"{tomb.get(h, ('', ''))[1]!r}")
        scanned += 1
    if source:
        from .records import identify, load_records

        found = {}
        for rec in load_records(source):
            _, _, text = identify(rec)
            hit = tomb.get(content_hmac(tkey, text))
            if hit:
                found[hit[1]] = rec
        found = sorted(found.items())
        tok = None
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(run.model_path)
        except Exception as e:  # noqa: BLE001 - the byte search still runs without token forms
            rep.notes.append(f"token-id forms not searched: tokenizer did not load ({type(e).__name__})")
        needles = [(sid, what, b) for sid, rec in found for what, b in _needles(rec, tok)]
        for p in _files(run.dir):
            data = p.read_bytes()
            for sid, what, b in needles:
                rep.check(b not in data, f"{p.relative_to(run.dir)}: holds the {what} of deleted sample {sid!r}")
        rep.echo(f"erasure: {len(found)} deleted record(s) recovered from {source} by their keyed HMAC; "
                 f"{len(needles)} byte patterns searched in every file")
    rep.echo(f"erasure: {scanned} text files parsed for records of deleted samples")

    # ----- serving ----------------------------------------------------------------------------------------
    from .locking import exclusively_held, holders

    server = next((h for h in holders(run.dir) if h.get("role") == "serve"), None)
    if server:
        _check_server(run, rep, desired)
    elif exclusively_held(run.dir):
        rep.check(False, "the run lock is held exclusively but no live server describes itself: serving could not "
                         "be checked (an offline deletion in progress, or a server without its description file)")
    else:
        rep.notes.append("no server holds the run: serving not checked")

    # ----- certificates -----------------------------------------------------------------------------------
    with run.ledger() as led:
        order = {r.request_id: i for i, r in enumerate(requests)}
        by_req = {r.request_id: r for r in requests}
        cert_dir = run.dir / "certificates"
        files = sorted(cert_dir.glob("*.json")) if cert_dir.exists() else []
        if certificate:
            files = [Path(certificate)]
        for f in files:
            _check_certificate(run, rep, f, by_req, order, led, snap)
        if not certificate:
            have = {f.stem for f in files}
            for r in applied:
                rep.check(r.request_id in have, f"request {r.request_id}: applied without a certificate")
    if pending:
        rep.notes.append(f"pending requests (journaled; their samples are deleted in the ledger): {pending}")

    if replay:
        _replay(run, rep, desired)
    return {"run": str(run.dir), "checks": rep.checks, "problems": rep.problems, "notes": rep.notes}


def _check_server(run: Run, rep: Report, desired: dict) -> None:
    import httpx

    info = json.loads((run.dir / "serve.json").read_text())
    try:
        r = httpx.get(info["url"] + "/s3t/served", headers={"Authorization": f"Bearer {info['token']}"}, timeout=30)
        served = r.json()
    except (httpx.HTTPError, ValueError) as e:
        rep.check(False, f"serving: the gateway at {info['url']} did not answer /s3t/served ({e})")
        return
    routing = {int(k): v for k, v in served["routing"].items()}
    want = {s: (e or {}).get("name") for s, e in desired.items()}
    rep.check(routing == want, f"serving: the gateway routes {routing}, the ledger says {want}")
    # Every replica that receives traffic (one replica: the top-level view) holds exactly the routed adapters.
    views = [v for v in served.get("replicas") or [served] if v.get("receives_traffic", True)]
    rep.check(bool(views), "serving: no replica receives traffic")
    for v in views:
        where = f"replica {v['replica']}: " if "replica" in v else ""
        engine = v.get("engine_adapters", {})
        rep.check(set(engine) == {n for n in want.values() if n} and not v.get("engine_unknown_ids"),
                  f"serving: {where}the engine holds {sorted(engine)} (+ unknown ids {v.get('engine_unknown_ids')}), "
                  f"the routing serves {sorted(n for n in want.values() if n)}")
    fenced = [v["replica"] for v in served.get("replicas") or [] if not v.get("receives_traffic", True)]
    rep.echo(f"serving: gateway {info['url']} routes {routing}; engine list {served.get('engine_adapters', {})}"
             + (f"; replicas fenced (no traffic): {fenced}" if fenced else ""))


def _check_certificate(run, rep, f: Path, by_req, order, led, snap) -> None:
    try:
        cert = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        rep.check(False, f"certificate {f.name}: unreadable ({e})")
        return
    rid = cert.get("request_id")
    where = f"certificate {f.name}"
    if not rep.check(rid in by_req and f.stem == rid, f"{where}: names request {rid!r}, which the journal lacks"):
        return
    req = by_req[rid]
    rep.check(req.status == "applied", f"{where}: the journal says request {rid} is {req.status}")
    rep.check(list(cert.get("sample_ids", [])) == list(req.sample_ids), f"{where}: sample ids differ from the journal")
    rep.check(sorted(cert.get("newly_deleted", [])) == sorted(req.newly_deleted),
              f"{where}: newly deleted samples differ from the journal")
    upto = set()
    for r in by_req.values():
        if order[r.request_id] <= order[rid]:
            upto |= set(r.newly_deleted)
    for e in cert.get("served", []):
        if not e.get("adapter"):
            continue
        rep.check(not e.get("deleted_samples_trained_on") and e.get("current", e.get("slice_hashes_match")),
                  f"{where}: certifies shard {e['shard']} serving {e['adapter']}, which it says saw deleted samples")
        man = snap.adapters.get(e["adapter"])
        if man is not None:  # still stored: check its lineage independently of the certificate's claim
            ids = set()
            for b in man["blocks"]:
                bm = snap.blocks.get((man["shard"], tuple(b["prefix"])))
                if bm is not None and bm["sha256"] == b["sha256"]:
                    ids |= set(bm.get("sample_ids") or [])
            hit = sorted(ids & upto)
            rep.check(not hit, f"{where}: {e['adapter']} was trained on samples deleted by then: {hit[:5]}")


def _replay(run: Run, rep: Report, desired: dict) -> None:
    """Retrain the shallowest served prefix from the ledger's live data; compare block by block."""
    import torch
    from safetensors.torch import load_file

    from .training import StageTrainer, training_env

    live = [e for e in desired.values() if e]
    if not live:
        rep.notes.append("replay: nothing is served (every shard is dead)")
        return
    entry = min(live, key=lambda e: (e["depth"], e["shard"]))
    shard, prefix = entry["shard"], tuple(entry["prefix"])
    stored = {k: run.store.manifest(shard, prefix[:k]) for k in range(1, len(prefix) + 1)}
    env_then = stored[1].get("env")
    threads = (env_then or {}).get("threads")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    scratch = Path(tempfile.mkdtemp(prefix="s3t-replay-"))
    try:
        (scratch / "run.json").write_text((run.dir / "run.json").read_text())
        src = sqlite3.connect(str(run.ledger_path))
        dst = sqlite3.connect(str(scratch / "ledger.sqlite"))
        src.backup(dst)
        src.close()
        dst.close()
        twin = Run.open(scratch)
        env_now = training_env()
        same_env = env_then is not None and {k: env_then.get(k) for k in env_now} == env_now
        trainer = StageTrainer(twin, stored[1].get("precision"))
        for k in range(1, len(prefix) + 1):
            man = trainer.train_stage(shard, prefix[:k])
            where = f"replay: shard {shard} block {k} (prefix {list(prefix[:k])})"
            if same_env:
                rep.check(man["sha256"] == stored[k]["sha256"],
                          f"{where}: retrained digest {man['sha256'][:12]} != stored {stored[k]['sha256'][:12]}")
            else:
                a = load_file(str(twin.store.block_dir(shard, prefix[:k]) / BLOCK_FILE))
                b = load_file(str(run.store.block_dir(shard, prefix[:k]) / BLOCK_FILE))
                rel = max(float((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-12)) for n in b)
                rep.check(set(a) == set(b) and rel <= REPLAY_TOLERANCE,
                          f"{where}: differs by {rel:.2e} (relative), tolerance {REPLAY_TOLERANCE}")
                rep.notes.append(f"{where}: environment differs ({env_then} then, {env_now} now): compared "
                                 f"with tolerance {REPLAY_TOLERANCE}, max relative difference {rel:.2e}")
        rep.echo(f"replay: shard {shard} prefix {list(prefix)} retrained from the ledger's live data; "
                 + ("bit for bit" if same_env else f"tolerance {REPLAY_TOLERANCE}"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        torch.set_num_threads(old_threads)
