"""The deletion module: from a list of sample ids to a served model that never saw them.

One request, in order (each step idempotent, so a process killed anywhere finishes the request on restart
and ends in the same state as an uninterrupted one):

1. journal   the request in the ledger (durable; the samples are marked deleted in the same transaction,
             so no later training can read them)
2. plan      per shard: which sequences are truncated where, the new longest surviving prefix, the adapter
             that will serve it, and every artifact whose training data held a deleted sample
3. materialise the new prefix adapters (fresh names: the name carries the blocks' content hashes)
4. switch    the serving backend: load the new adapters, route to them, retire the superseded ones from the
             engine itself, reset the prefix cache
5. destroy   on disk every artifact that depended on a deleted sample (blocks, prefix adapters, trainer scratch)
6. certify   write a JSON certificate, then mark the request applied

Which blocks depend on a deleted sample is derived from content hashes: a block stores the hashes (and the
sample ids) of the slices it was trained on; deleting a sample changes its slice's hash; a block is alive
only while all its hashes equal the ledger's. This module imports no torch and no vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

from .adapters import sha256_file
from .run import DATASET, Run

logger = logging.getLogger(__name__)

CERT_DIR = "certificates"
STEPS = ("journaled", "planned", "materialised", "switched", "destroyed", "certified")


def _crash_point(step: str) -> None:
    """Test hook: kill this process (SIGKILL, no clean-up) right after ``step`` when ``S3T_CRASH_AT=<step>``,
    or when the file named by ``S3T_CRASH_FILE`` holds ``<step>`` (for a long-running server)."""
    target = os.environ.get("S3T_CRASH_AT")
    crash_file = os.environ.get("S3T_CRASH_FILE")
    if not target and crash_file and os.path.exists(crash_file):
        target = Path(crash_file).read_text().strip()
    if target == step:
        logger.warning("S3T_CRASH_AT=%s: killing the process now", step)
        os.kill(os.getpid(), signal.SIGKILL)


class Backend(Protocol):
    """What the deletion module needs from a server (the gateway implements it)."""

    def apply_routing(self, routing: dict[int, dict | None], reason: str) -> dict:
        """Serve ``routing`` (shard -> {"name", "path"} or None): load new adapters, switch, retire the
        superseded ones from the engine, reset the prefix cache. Returns a report."""


def adapter_name(run: Run, shard: int, prefix) -> str:
    """Name of a prefix adapter: run, shard, prefix and a digest of its blocks' content hashes.

    Different weights never share a name (vLLM keys its prefix cache by adapter name)."""
    store = run.store
    digest = hashlib.sha256("".join(store.manifest(shard, prefix[:k])["sha256"]
                                    for k in range(1, len(prefix) + 1)).encode()).hexdigest()[:10]
    return f"{run.config.name}-s{shard}-p{'-'.join(map(str, prefix))}-{digest}"


def serving_plan(run: Run) -> dict[int, dict | None]:
    """For each shard, the adapter of its longest surviving sequence prefix (None for a dead shard)."""
    hashes = run.slice_hashes()
    out: dict[int, dict | None] = {}
    for shard in range(run.shards):
        lens = [run.surviving_prefix(shard, seq, hashes) for seq in run.sequences]
        best = max(range(len(lens)), key=lambda i: (lens[i], -i))
        if lens[best] == 0:
            out[shard] = None
            continue
        prefix = tuple(run.sequences[best][:lens[best]])
        out[shard] = {"name": adapter_name(run, shard, prefix), "shard": shard, "sequence": best,
                      "prefix": list(prefix), "depth": len(prefix), "sequence_prefixes": lens}
    return out


def stale_artifacts(run: Run) -> list[dict]:
    """Every artifact on disk that was trained on data that is no longer live."""
    hashes = run.slice_hashes()
    store = run.store
    out = []
    for shard, prefix in store.blocks():
        man = store.manifest(shard, prefix)
        if any(hashes[(shard, int(sl))] != h for sl, h in man["slice_hashes"].items()):
            out.append({"kind": "block", "shard": shard, "prefix": list(prefix), "sha256": man["sha256"],
                        "path": str(store.block_dir(shard, prefix)), "slices": man["slices"]})
    for name in store.adapters():
        man = store.adapter_manifest(name)
        if any(hashes[(man["shard"], int(sl))] != h for b in man["blocks"] for sl, h in b["slice_hashes"].items()):
            out.append({"kind": "adapter", "name": name, "shard": man["shard"], "prefix": man["prefix"],
                        "sha256": man["sha256"], "path": str(store.adapter_dir(name)), "slices": man["slices"]})
    # Approximately-unlearned adapters (s3t_llm.unlearn) derive from served blocks: they go with them.
    for mf in sorted((run.dir / "unlearned").glob("*/unlearn_manifest.json")):
        man = json.loads(mf.read_text())
        src = man.get("source_adapter", {})
        shard = man.get("shard", src.get("shard"))
        blocks = src.get("blocks", [])
        if shard is None or any(hashes[(int(shard), int(sl))] != h for b in blocks
                                for sl, h in b["slice_hashes"].items()):
            f = mf.parent / "adapter_model.safetensors"
            out.append({"kind": "unlearned-adapter", "name": mf.parent.name, "shard": shard,
                        "prefix": src.get("prefix"), "sha256": sha256_file(f) if f.exists() else None,
                        "path": str(mf.parent), "slices": src.get("prefix")})
    return out


def materialise_plan(run: Run, plan: dict[int, dict | None]) -> dict[int, dict | None]:
    """Write the plan's prefix adapters (if not already there); add their paths to the plan."""
    store = run.store
    routing: dict[int, dict | None] = {}
    for shard, entry in plan.items():
        if entry is None:
            routing[shard] = None
            continue
        name = entry["name"]
        if name not in store.adapters():
            store.materialise(name, shard, tuple(entry["prefix"]), base_model=run.model_path, lora=run.lora_dict())
        routing[shard] = {**entry, "path": str(store.adapter_dir(name).resolve())}
    return routing


def destroy(run: Run, artifacts: list[dict]) -> list[dict]:
    """Remove the listed artifacts from disk (already-missing ones are fine); returns those removed now."""
    done = []
    for a in artifacts:
        p = Path(a["path"])
        if p.exists():
            shutil.rmtree(p)
            done.append(a)
    # Trainer scratch directories (checkpoints / optimizer state of an interrupted stage) never survive.
    for scratch in run.dir.glob(".trainer-*"):
        shutil.rmtree(scratch, ignore_errors=True)
    return done


def certificate_path(run: Run, request_id: str) -> Path:
    return run.dir / CERT_DIR / f"{request_id}.json"


def _write_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def served_evidence(run: Run, routing: dict[int, dict | None], deleted_ids: set[str]) -> list[dict]:
    """For every adapter still served: the slices and samples it was trained on, checked against deletions."""
    hashes = run.slice_hashes()
    store = run.store
    out = []
    for shard, entry in sorted(routing.items()):
        if entry is None:
            out.append({"shard": shard, "adapter": None, "note": "dead shard: serves nothing until retrained"})
            continue
        man = store.adapter_manifest(entry["name"])
        trained: set[str] = set()
        slice_checks = []
        for k in range(1, len(man["prefix"]) + 1):
            bman = store.manifest(shard, tuple(man["prefix"][:k]))
            trained.update(bman["sample_ids"])
            for sl, h in bman["slice_hashes"].items():
                slice_checks.append({"block": k, "slice": int(sl), "trained_hash": h,
                                     "current_hash": hashes[(shard, int(sl))]})
        hit = sorted(trained & deleted_ids)
        out.append({
            "shard": shard, "adapter": entry["name"], "prefix": man["prefix"], "sha256": man["sha256"],
            "adapter_file_sha256": sha256_file(store.adapter_dir(entry["name"]) / "adapter_model.safetensors"),
            "trained_slices": [[shard, s] for s in man["prefix"]], "n_trained_samples": len(trained),
            "slice_hashes_match": all(c["trained_hash"] == c["current_hash"] for c in slice_checks),
            "deleted_samples_trained_on": hit,
        })
    return out


def complete_request(run: Run, request_id: str, backend: Backend | None = None) -> dict:
    """Carry a journaled request through plan .. certify. Safe to call again after a crash at any step."""
    led = run.ledger()
    try:
        req = led.request(request_id)
        cert_file = certificate_path(run, request_id)
        if req.status == "applied" and cert_file.exists():
            return json.loads(cert_file.read_text())
        cells = led.cell_of(DATASET, list(req.sample_ids))
        deleted_ids = led.deleted_ids(DATASET)
        t_received = datetime.fromisoformat(req.received_at).timestamp()
        if req.status == "received":
            plan = serving_plan(run)
            artifacts = stale_artifacts(run)
            served_before = _read_served(run)
            payload = {"serving": {str(k): v for k, v in plan.items()}, "destroy": artifacts,
                       "served_before": served_before}
            req = led.mark_planned(request_id, payload)
        plan_payload = req.plan
        _crash_point("planned")
        plan = {int(k): v for k, v in plan_payload["serving"].items()}
        routing = materialise_plan(run, plan)
        _crash_point("materialised")
        t_switch0 = time.time()
        switch_report = backend.apply_routing(routing, reason=f"deletion {request_id}") if backend else None
        _write_served(run, routing)
        t_effect = time.time()
        _crash_point("switched")
        # Stale artifacts: those planned, plus any that appeared since (e.g. superseded adapters).
        planned_destroy = list(plan_payload["destroy"])
        keep = {e["name"] for e in routing.values() if e}
        extra = [a for a in stale_artifacts(run) if a["path"] not in {p["path"] for p in planned_destroy}]
        for name in run.store.adapters():
            if name not in keep and not any(a.get("name") == name for a in planned_destroy + extra):
                man = run.store.adapter_manifest(name)
                extra.append({"kind": "adapter", "name": name, "shard": man["shard"], "prefix": man["prefix"],
                              "sha256": man["sha256"], "path": str(run.store.adapter_dir(name)),
                              "slices": man["slices"], "superseded": True})
        destroy(run, planned_destroy + extra)
        _crash_point("destroyed")
        evidence = served_evidence(run, routing, deleted_ids)
        bad = [e for e in evidence if e.get("adapter") and (e["deleted_samples_trained_on"] or not e["slice_hashes_match"])]
        if bad:  # never certify a served adapter that saw a deleted sample
            raise RuntimeError(f"served adapters still depend on deleted samples: {bad}")
        before = {int(k): v for k, v in (plan_payload.get("served_before") or {}).items()}
        changes = []
        for shard in sorted(routing):
            old, new = before.get(shard), routing[shard]
            if (old or {}).get("name") != (new or {}).get("name"):
                changes.append({"shard": shard, "from": old and old["name"], "to": new and new["name"],
                                "from_depth": old and old.get("depth"), "to_depth": new and new["depth"]})
        cert = {
            "request_id": request_id, "dataset": DATASET, "run": str(run.dir),
            "sample_ids": list(req.sample_ids), "newly_deleted": list(req.newly_deleted),
            "noop": not req.newly_deleted,
            "cells": {sid: list(c) for sid, c in cells.items()},
            "received_at": req.received_at, "planned_at": req.planned_at,
            "effective_at": datetime.fromtimestamp(t_effect, timezone.utc).isoformat(timespec="microseconds"),
            "deletion_to_effect_seconds": round(t_effect - t_received, 3),
            "switch_seconds": round(t_effect - t_switch0, 3),
            "served_changes": changes, "switch_report": switch_report,
            "destroyed": planned_destroy + extra, "served": evidence,
            "dead_shards": [s for s, e in routing.items() if e is None],
        }
        _write_atomic(cert_file, cert)
        _crash_point("certified")
        led.mark_applied(request_id, note=f"certificate {cert_file.name}")
        return cert
    finally:
        led.close()


def apply_deletion(run: Run, sample_ids: list[str], *, backend: Backend | None = None,
                   request_id: str | None = None) -> dict:
    """Journal and apply one deletion request; returns its certificate (see the module docstring)."""
    with run.ledger() as led:
        req = led.journal_deletion(DATASET, list(sample_ids), request_id=request_id)
    _crash_point("journaled")
    if not req.newly_deleted:
        logger.info("request %s: every sample was already deleted; nothing changes", req.request_id)
    return complete_request(run, req.request_id, backend)


def publish(run: Run, backend: Backend | None = None, reason: str = "publish") -> tuple[dict, dict | None]:
    """Serve (and record in served.json) the current longest surviving prefix of every shard."""
    routing = materialise_plan(run, serving_plan(run))
    report = backend.apply_routing(routing, reason) if backend else None
    _write_served(run, routing)
    return routing, report


def recover(run: Run, backend: Backend | None = None) -> list[dict]:
    """Finish every journaled request that a crash left unapplied, oldest first."""
    with run.ledger() as led:
        pending = [r.request_id for r in led.pending(DATASET)]
    certs = []
    for rid in pending:
        logger.info("recovering deletion request %s", rid)
        certs.append(complete_request(run, rid, backend))
    return certs


SERVED_FILE = "served.json"


def _read_served(run: Run) -> dict:
    p = run.dir / SERVED_FILE
    return json.loads(p.read_text()) if p.exists() else {}


def _write_served(run: Run, routing: dict[int, dict | None]) -> None:
    _write_atomic(run.dir / SERVED_FILE, {str(k): v for k, v in routing.items()})
