"""The deletion module: from a list of sample ids to a served model that never saw them.

Design: the desired state is always DERIVED FROM THE LEDGER AS IT IS NOW (``s3t_llm.exactness``); nothing
stored is ever replayed. One request, in order, under the run's writer lock (``s3t_llm.locking``: one
writer per run between processes, one between threads):

1. journal   the request in the ledger: its samples are marked deleted and their content erased in the same
             transaction (a keyed-HMAC tombstone stays), so no later training can read them
2. plan      derive the desired routing (each shard's longest surviving prefix) and the stale artifacts from
             the ledger and the manifests now; the plan is recorded in the journal as history only
3. materialise the desired prefix adapters (fresh names: a name carries its blocks' digests), each block
             checked against the ledger's current slice hashes first
4. switch    the backend to the desired routing (load new adapters, route, retire superseded ones from the
             engine itself); a retried or recovered request re-derives this step, it never replays it
5. destroy   every artifact that is stale NOW (blocks, prefix adapters, derived adapters, trainer scratch)
             and every adapter no longer served
6. erase     the ledger file (WAL checkpoint + VACUUM): no byte of a deleted record remains
7. certify   what the backend really serves before and after (asked from it, not read from a file), the
             evidence that no served adapter was trained on a deleted sample; then mark the request applied

A request that fails at any step stays journaled; the next request, a retry or ``recover`` (at every start
of ``s3t serve``) re-derives everything, so a stale plan can never be served. This module imports no torch
and no vLLM.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from . import exactness
from .adapters import sha256_file
from .ledger import check_request_id
from .locking import hold, writer_lock
from .run import DATASET, Run

logger = logging.getLogger(__name__)

CERT_DIR = "certificates"
STEPS = ("journaled", "planned", "materialised", "switched", "destroyed", "erased", "certified")


class CrashPoint(BaseException):
    """Raised instead of SIGKILL when ``S3T_CRASH_MODE=raise`` (in-process fault injection in tests)."""


_steps = threading.local()  # per thread: when the request being applied passed each step (the certificate's "steps")


def _start_steps() -> None:
    _steps.t0, _steps.marks = time.time(), {}


def _crash_point(step: str) -> None:
    """Every step of a request passes here: its time since the request reached this process is kept for the
    certificate (``steps``, seconds) and logged. Test hook: kill this process (SIGKILL, no clean-up) right after
    ``step`` when ``S3T_CRASH_AT=<step>``, or when the file named by ``S3T_CRASH_FILE`` holds ``<step>``."""
    if getattr(_steps, "marks", None) is not None:
        _steps.marks[step] = round(time.time() - _steps.t0, 4)
        logger.info("deletion step %s at +%.3f s", step, _steps.marks[step])
    target = os.environ.get("S3T_CRASH_AT")
    crash_file = os.environ.get("S3T_CRASH_FILE")
    if not target and crash_file and os.path.exists(crash_file):
        target = Path(crash_file).read_text().strip()
    if target == step:
        if os.environ.get("S3T_CRASH_MODE") == "raise":
            raise CrashPoint(step)
        logger.warning("S3T_CRASH_AT=%s: killing the process now", step)
        os.kill(os.getpid(), signal.SIGKILL)


class Backend(Protocol):
    """What the deletion module needs from a server (the gateway implements it)."""

    def apply_routing(self, routing: dict[int, dict | None], reason: str) -> dict:
        """Serve ``routing`` (shard -> {"name", "path"} or None): load new adapters, switch, retire the
        superseded ones from the engine, reset the prefix cache. Returns a report."""

    def served(self) -> dict:
        """What is really served now, from the backend's own state: ``{"routing": {shard: name or None},
        "engine_adapters": {name: engine id} (every adapter the engine holds)}``."""


def adapter_name(run: Run, shard: int, prefix) -> str:
    """Name of a prefix adapter: run, shard, prefix and a digest of its blocks' tensor digests."""
    store = run.store
    shas = [store.manifest(shard, prefix[:k])["sha256"] for k in range(1, len(prefix) + 1)]
    return exactness.adapter_name(run.config.name, shard, tuple(prefix), shas)


def serving_plan(run: Run) -> dict[int, dict | None]:
    """For each shard, the adapter of its longest surviving sequence prefix (None for a dead shard)."""
    return run.desired_routing()


def stale_artifacts(run: Run, snap=None, *, served: set[str] | None = None) -> list[dict]:
    """Every stored artifact that must not be used any more (``exactness.stale``), and, when ``served`` is
    given, every prefix adapter outside it (superseded)."""
    snap = snap or run.snapshot()
    st = snap.stale()
    store = run.store
    out = []
    for shard, prefix in st["blocks"]:
        man = snap.blocks[(shard, prefix)]
        out.append({"kind": "block", "shard": shard, "prefix": list(prefix), "sha256": man["sha256"],
                    "path": str(store.block_dir(shard, prefix)), "slices": man.get("slices")})
    for name in sorted(snap.adapters):
        superseded = served is not None and name not in served
        if name in st["adapters"] or superseded:
            man = snap.adapters[name]
            out.append({"kind": "adapter", "name": name, "shard": man.get("shard"), "prefix": man.get("prefix"),
                        "sha256": man.get("sha256"), "path": str(store.adapter_dir(name)),
                        "slices": man.get("slices"), **({"superseded": True} if name not in st["adapters"] else {})})
    for name in st["derived"]:
        man = snap.derived[name]
        out.append({"kind": "unlearned-adapter", "name": name, "shard": man.get("shard"),
                    "sha256": man.get("sha256"), "path": man["path"]})
    # The activation cache's disk tier (a live trainer's scratch): groups of a changed slice or a lower block
    # that is no longer valid; the trainer, missing one mid-stage, stops that stage as stale.
    from .activation_cache import stale_groups

    out += stale_groups(run.dir, snap.hashes, snap.blocks, exactness.valid_blocks(snap.blocks, snap.hashes))
    return out


def materialise_plan(run: Run, plan: dict[int, dict | None], snap=None) -> dict[int, dict | None]:
    """Write the plan's prefix adapters (if not already there), each block checked against the ledger's
    current slice hashes and the digests the plan was derived from; add their paths to the plan."""
    store = run.store
    snap = snap or run.snapshot()
    valid = exactness.valid_blocks(snap.blocks, snap.hashes)
    routing: dict[int, dict | None] = {}
    for shard, entry in plan.items():
        if entry is None:
            routing[shard] = None
            continue
        prefix = tuple(entry["prefix"])
        chain = [{"prefix": list(prefix[:k]), "sha256": sha} for k, sha in enumerate(entry["block_sha256"], 1)]
        if not exactness.chain_current(shard, chain, snap.blocks, valid):
            raise RuntimeError(f"shard {shard}: the blocks of prefix {list(prefix)} are not current; refusing "
                               "to materialise them (the plan must be derived again)")
        name = entry["name"]
        if name not in snap.adapters:
            store.materialise(name, shard, prefix, base_model=run.model_path, lora=run.lora_dict())
        man = store.adapter_manifest(name)
        if [b["sha256"] for b in man["blocks"]] != entry["block_sha256"]:
            raise RuntimeError(f"adapter {name} on disk was not built from the blocks its name says")
        routing[shard] = {**entry, "path": str(store.adapter_dir(name).resolve()), "sha256": man["sha256"]}
    return routing


def destroy(run: Run, artifacts: list[dict]) -> list[dict]:
    """Remove the listed artifacts from disk (already-missing ones are fine); returns those removed now."""
    done = []
    for a in artifacts:
        p = Path(a["path"])
        if p.exists():
            # Atomic rename first: a kill during the removal leaves a `.trash-*` directory (swept below and by
            # every later deletion), never a half-removed artifact that has lost its manifest but kept its weights.
            trash = p.parent / f".trash-{p.name}-{os.getpid()}-{time.time_ns()}"
            try:
                os.replace(p, trash)
            except FileNotFoundError:  # removed meanwhile (a live trainer clearing its activation cache)
                continue
            shutil.rmtree(trash, onerror=_gone_is_fine)
            done.append(a)
    sweep_trash(run)
    # Trainer scratch (checkpoints / optimizer state of an interrupted stage) of dead trainers never survives; a
    # live trainer removes its own when its stage ends (a stage made stale by this deletion is never stored).
    from .adapters import staging_owner_alive

    for scratch in run.dir.glob(".trainer-*"):
        if not staging_owner_alive(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
    return done


def _gone_is_fine(func, path, exc_info) -> None:
    """rmtree's error handler: what vanished meanwhile is removed; any other error is raised."""
    if not issubclass(exc_info[0], FileNotFoundError):
        raise exc_info[1]


def sweep_trash(run: Run) -> int:
    """Remove what a killed destroy left in `.trash-*` directories; returns how many."""
    n = 0
    # Known depths only (no recursive walk: other threads rename directories under it concurrently).
    for pattern in ("blocks/shard*/.trash-*", "adapters/.trash-*", "unlearned/.trash-*", ".trainer-*/act/.trash-*"):
        for t in list(run.dir.glob(pattern)):
            shutil.rmtree(t, ignore_errors=True)
            n += 1
    return n


def certificate_path(run: Run, request_id: str) -> Path:
    """The certificate file of a request: always inside ``RUN/certificates`` (the id is checked)."""
    check_request_id(request_id)
    base = (run.dir / CERT_DIR).resolve()
    p = (base / f"{request_id}.json").resolve()
    if p.parent != base:
        raise ValueError(f"request id {request_id!r} would leave {base}")
    return p


def _write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)  # the rename itself must survive a power loss
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _jsonable(obj):
    return json.loads(json.dumps(obj))


def served_evidence(run: Run, served: dict, deleted_ids: set[str], snap=None) -> list[dict]:
    """For every shard: the adapter the backend really routes it to, the slices and samples it was trained
    on (from its blocks' manifests), checked against the deletions and the exactness rule."""
    snap = snap or run.snapshot()
    valid = exactness.valid_blocks(snap.blocks, snap.hashes)
    store = run.store
    out = []
    for shard in range(run.shards):
        name = served["routing"].get(shard)
        if name is None:
            out.append({"shard": shard, "adapter": None, "note": "dead shard: serves nothing until retrained"})
            continue
        man = snap.adapters.get(name)
        if man is None:
            out.append({"shard": shard, "adapter": name, "current": False, "deleted_samples_trained_on": [],
                        "note": "no manifest: not an adapter of this run's store"})
            continue
        current = exactness.chain_current(shard, man["blocks"], snap.blocks, valid)
        trained = exactness.trained_sample_ids(shard, man["prefix"], snap.blocks) if current else set()
        out.append({
            "shard": shard, "adapter": name, "prefix": man["prefix"], "sha256": man["sha256"],
            "adapter_file_sha256": sha256_file(store.adapter_dir(name) / "adapter_model.safetensors"),
            "blocks": [{"prefix": b["prefix"], "sha256": b["sha256"]} for b in man["blocks"]],
            "trained_slices": [[shard, s] for s in man["prefix"]], "n_trained_samples": len(trained),
            "current": current, "slice_hashes_match": current,
            "engine_id": served.get("engine_adapters", {}).get(name),
            "deleted_samples_trained_on": sorted(trained & deleted_ids),
        })
    return out


def _offline_served(routing: dict[int, dict | None]) -> dict:
    return {"backend": None, "routing": {s: (e or {}).get("name") for s, e in routing.items()},
            "engine_adapters": {}, "note": "no server: the run lock proved none was running; this is what the "
                                           "next `s3t serve` serves"}


def _problems(run: Run, served: dict, evidence: list[dict], desired: dict) -> list[str]:
    bad = []
    for e in evidence:
        if e.get("adapter") and (e["deleted_samples_trained_on"] or not e["current"]):
            bad.append(f"shard {e['shard']}: {e['adapter']} is not current or saw deleted samples")
    want = {s: (d or {}).get("name") for s, d in desired.items()}
    if served["routing"] != want:
        bad.append(f"backend routes {served['routing']}, the ledger says {want}")
    # Several replicas: every replica that receives traffic must hold exactly the routed adapters (a fenced
    # one receives none until it is reconciled to the ledger's routing); one replica: the top-level view.
    views = [v for v in served.get("replicas") or [served] if v.get("receives_traffic", True)]
    if served.get("backend") and not views:
        bad.append("no replica receives traffic")
    for v in views:
        where = f"replica {v['replica']}: " if "replica" in v else ""
        extra = set(v.get("engine_adapters", {})) - {n for n in want.values() if n}
        if extra:
            bad.append(f"{where}the engine still holds adapters that are not routed: {sorted(extra)}")
        missing = {n for n in want.values() if n} - set(v.get("engine_adapters", {}))
        if served.get("backend") and missing:
            bad.append(f"{where}the engine lacks routed adapters: {sorted(missing)}")
        if v.get("engine_unknown_ids"):
            bad.append(f"{where}the engine holds adapter ids the gateway does not know: {v['engine_unknown_ids']}")
    return bad


def complete_request(run: Run, request_id: str, backend: Backend | None = None) -> dict:
    """Carry a journaled request through plan .. certify by reconciling with the ledger as it is now.
    Safe to call again after a failure or a crash at any step, and after later requests."""
    with writer_lock(run.dir):
        led = run.ledger()
        try:
            return _complete(run, led, request_id, backend)
        finally:
            led.close()


def _complete(run: Run, led, request_id: str, backend: Backend | None) -> dict:
    req = led.request(request_id)
    cert_file = certificate_path(run, request_id)
    if req.status == "applied" and cert_file.exists():
        return json.loads(cert_file.read_text())
    t_received = datetime.fromisoformat(req.received_at).timestamp()
    events = led.events(request_id)
    first_plan = next((e["payload"] for e in events if e["event"] == "planned"), None)
    at_receipt = (events[0]["payload"] or {}).get("context", {}).get("served_at_receipt") if events else None
    if backend and at_receipt:  # what the backend really served when the request arrived (journaled with it)
        served_before = {**at_receipt, "routing": {int(k): v for k, v in at_receipt["routing"].items()},
                         "note": "reported by the server when the request was received"}
    elif backend:
        served_before = {**backend.served(), "note": "reported by this server before it applied the request (the "
                                                     "server that received it stopped first)"}
    else:
        recorded = first_plan["served_before"] if first_plan else \
            {k: (v or {}).get("name") for k, v in _read_served(run).items()}
        served_before = {"backend": None, "engine_adapters": {},
                         "routing": {int(k): v for k, v in recorded.items()},
                         "note": "no server was running (the run lock proved it): the routing published for the "
                                 "stored run when this request was first planned"}
    snap = run.snapshot()
    desired = run.desired_routing(snap)
    stale_now = stale_artifacts(run, snap)
    if req.status != "applied":
        led.mark_planned(request_id, {
            "serving": {str(k): v for k, v in desired.items()}, "stale": stale_now,
            "served_before": {str(k): v for k, v in served_before["routing"].items()},
            "note": "history: every step derives its state from the ledger again"})
    _crash_point("planned")
    routing = materialise_plan(run, desired)
    _crash_point("materialised")
    t_switch0 = time.time()
    switch_report = backend.apply_routing(routing, reason=f"deletion {request_id}") if backend else None
    t_effect = time.time()
    _write_served(run, routing)
    _crash_point("switched")
    keep = {e["name"] for e in routing.values() if e}
    destroyed = destroy(run, stale_artifacts(run, served=keep))
    _crash_point("destroyed")
    erase_report = led.erase()
    _crash_point("erased")
    deleted_ids = set().union(*(led.deleted_ids(d) for d in run.datasets()))
    snap = run.snapshot()
    desired_now = run.desired_routing(snap)
    served_after = backend.served() if backend else _offline_served(routing)
    evidence = served_evidence(run, served_after, deleted_ids, snap)
    bad = _problems(run, served_after, evidence, desired_now)
    if bad:  # never certify: the request stays journaled and the next step reconciles again
        raise RuntimeError(f"request {request_id}: not certified: " + "; ".join(bad))
    changes = []
    for shard in range(run.shards):
        old, new = served_before["routing"].get(shard), served_after["routing"].get(shard)
        if old != new:
            changes.append({"shard": shard, "from": old, "to": new, "to_depth": (routing.get(shard) or {}).get("depth"),
                            "from_depth": _name_depth(run, shard, old)})
    # Everything this request destroyed, over all its attempts (the plans are history), confirmed gone now.
    seen, gone = set(), []
    for a in [a for e in led.events(request_id) if e["event"] in ("planned", "replanned")
              for a in e["payload"].get("stale", [])] + destroyed:
        if a["path"] not in seen and not Path(a["path"]).exists():
            seen.add(a["path"])
            gone.append(a)
    cells = led.cells_known(DATASET, req.sample_ids)
    cert = {
        "request_id": request_id, "dataset": DATASET, "run": str(run.dir),
        "sample_ids": list(req.sample_ids), "newly_deleted": list(req.newly_deleted),
        "noop": not req.newly_deleted,
        "cells": {sid: list(c) for sid, c in cells.items()},
        "received_at": req.received_at, "planned_at": led.request(request_id).planned_at,
        "effective_at": datetime.fromtimestamp(t_effect, timezone.utc).isoformat(timespec="microseconds"),
        "deletion_to_effect_seconds": round(t_effect - t_received, 3),
        "switch_seconds": round(t_effect - t_switch0, 3),
        "served_before": served_before, "served_after": served_after,
        "served_when_first_planned": first_plan["served_before"] if first_plan else None,
        "served_changes": changes, "switch_report": switch_report,
        "destroyed": gone, "served": evidence, "erasure": {
            "ledger": erase_report,
            "content": "the ledger keeps a tombstone per deleted sample (id, cell, request, keyed HMAC of the "
                       "record); the record's text is in no file of the run directory",
            "outside_s3t_control": [x for x in [run.info.get("source")] if x],
            "outside_note": "the user's own source file(s) above are not modified by s3t: remove the records "
                            "there too, or re-registering them keeps them deleted (tombstones) but the file "
                            "still holds them"},
        "dead_shards": [s for s, e in routing.items() if e is None],
        # Seconds since this process took up the request, per step (this attempt only; empty in a recovery).
        "steps": dict(getattr(_steps, "marks", None) or {}),
    }
    cert = json.loads(json.dumps(cert))  # exactly what the file holds (string keys), for every caller
    _write_atomic(cert_file, cert)
    _crash_point("certified")
    if req.status != "applied":
        led.mark_applied(request_id, note=f"certificate {cert_file.name}")
    return cert


def _name_depth(run: Run, shard: int, name: str | None) -> int | None:
    """The depth of a prefix adapter from its name (``exactness.adapter_name``: run-s<shard>-p<prefix>-<digest>)."""
    head = f"{run.config.name}-s{shard}-p"
    if not name or not name.startswith(head):
        return None
    return len(name[len(head):].rsplit("-", 1)[0].split("-"))


def apply_deletion(run: Run, sample_ids: list[str], *, backend: Backend | None = None,
                   request_id: str | None = None) -> dict:
    """Journal and apply one deletion request; returns its certificate (see the module docstring).

    Without a backend this is an offline deletion: it takes the run lock exclusively, so it refuses (naming
    the server) while ``s3t serve`` runs; with one, the caller is the server that holds the run."""
    if request_id is not None:
        check_request_id(request_id)
    # Journaling holds the writer lock too: nothing moves the ledger between a request's plan and certificate.
    _start_steps()
    try:
        with hold(run.dir, "delete") if backend is None else contextlib.nullcontext(), writer_lock(run.dir):
            _crash_point("locked")
            context = {"served_at_receipt": _jsonable(backend.served())} if backend else None
            with run.ledger() as led:
                req = led.journal_deletion(DATASET, list(sample_ids), request_id=request_id, also=run.datasets()[1:],
                                           context=context)
                _crash_point("recorded")
                # The erased record's old page leaves the WAL now if no reader holds an old snapshot; never wait for
                # one here (the deletion's effect would wait with it): erase() after the switch must succeed.
                led.checkpoint(wait=False)
            _crash_point("journaled")
            if not req.newly_deleted:
                logger.info("request %s: every sample was already deleted; nothing changes", req.request_id)
            return complete_request(run, req.request_id, backend)
    finally:
        _steps.marks = None  # a later recovery in this thread reports no steps of its own


def publish(run: Run, backend: Backend | None = None, reason: str = "publish") -> tuple[dict, dict | None]:
    """Serve (and record in served.json) the current longest surviving prefix of every shard."""
    with hold(run.dir, "train") if backend is None else contextlib.nullcontext(), writer_lock(run.dir):
        routing = materialise_plan(run, serving_plan(run))
        report = backend.apply_routing(routing, reason) if backend else None
        _write_served(run, routing)
    return routing, report


def recover(run: Run, backend: Backend | None = None) -> list[dict]:
    """Finish every journaled request that a crash or a failure left unapplied, oldest first (each one
    reconciles with the ledger as it is now). Offline (no backend) it takes the run lock like a deletion."""
    with hold(run.dir, "delete") if backend is None else contextlib.nullcontext(), writer_lock(run.dir):
        with run.ledger() as led:
            pending = [r.request_id for r in led.pending(DATASET)]
        certs = []
        for rid in pending:
            logger.info("completing deletion request %s", rid)
            certs.append(complete_request(run, rid, backend))
        return certs


SERVED_FILE = "served.json"


def _read_served(run: Run) -> dict:
    """The routing last published by this run's writer (a record for offline use, never the truth about
    what a server serves: certificates ask the backend)."""
    p = run.dir / SERVED_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def _write_served(run: Run, routing: dict[int, dict | None]) -> None:
    _write_atomic(run.dir / SERVED_FILE, {str(k): v for k, v in routing.items()})
