"""Test doubles that stand in for a vLLM server (and nothing else): the real Gateway and the real deletion
module run against them. Keep the interface in step with ``s3t_llm.serving.VLLMServer`` (whatever
``Gateway`` calls on its server must exist here too)."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path


def files_digest(files: dict[str, bytes]) -> str:
    """The fake's canonical digest of an adapter: its files' bytes, by file name."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


class BackendFault(RuntimeError):
    """An injected failure of the fake engine (stands for a transient vLLM error)."""


class FakeVLLM:
    """An in-memory engine: adapters loaded by path (their bytes read at load time, like vLLM does),
    integer ids never reused, and fault injection per operation (``fail_next = {"load": 1}``)."""

    def __init__(self, model_path: str = "/fake/base"):
        self.model_path = model_path
        self.url = "http://127.0.0.1:1"
        self.ids: dict[str, int] = {}
        self.engine: dict[int, dict] = {}  # engine id -> {"name", "path", "files"}
        self._next = 1
        self.fail_next: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        self.prefix_cache_resets = 0
        self._lock = threading.Lock()
        self.expected: dict[str, str] = {}  # adapter name -> digest of its files at load time

    def _maybe_fail(self, op: str) -> None:
        if self.fail_next.get(op, 0) > 0:
            self.fail_next[op] -= 1
            raise BackendFault(f"injected {op} failure")

    # ----- the VLLMServer interface ----------------------------------------------------------------
    def engine_loras(self) -> set[int]:
        return set(self.engine)

    def front_end_models(self) -> set[str]:
        return set(self.ids)

    def load(self, name: str, path: str) -> int:
        with self._lock:
            self.calls.append(("load", name))
            self._maybe_fail("load")
            if name in self.ids:
                raise RuntimeError(f"adapter {name} is already loaded")
            p = Path(path)
            files = {f.name: f.read_bytes() for f in p.iterdir() if f.is_file()}
            i = self._next
            self._next += 1
            self.engine[i] = {"name": name, "path": str(p), "files": files}
            self.ids[name] = i
            self.expected[name] = files_digest(files)
            return i

    def remove(self, name: str) -> dict:
        with self._lock:
            self.calls.append(("remove", name))
            self._maybe_fail("remove")
            i = self.ids[name]
            self.engine.pop(i, None)
            del self.ids[name]
            return {"name": name, "engine_id": i, "engine_ids_after": sorted(self.engine)}

    def reset_prefix_cache(self) -> None:
        self.calls.append(("reset_prefix_cache", ""))
        self._maybe_fail("reset_prefix_cache")
        self.prefix_cache_resets += 1

    def digests(self, ids=None) -> dict[int, str]:
        """{engine id: digest of the bytes the engine holds} (tests may tamper with ``engine[i]["files"]``)."""
        return {i: files_digest(e["files"]) for i, e in self.engine.items() if not ids or i in ids}

    def remove_engine_id(self, lora_id: int) -> list[int]:
        self.calls.append(("remove_engine_id", str(lora_id)))
        self.engine.pop(lora_id, None)
        return sorted(self.engine)

    def quiesce(self, flights, names, timeout: float = 10.0) -> dict:
        """The fake engine runs no requests: nothing to wait for."""
        return {"ok": True, "seconds": 0.0, "polls": 0}

    def stop(self) -> None:
        pass


# ----- a run without torch: real config, ledger, store, deletion module; a deterministic stand-in trainer ---------
def make_fake_run(root: Path, records: list[dict], *, m: int = 2, L: int = 3, B: int = 2, heldout: list[dict] = (),
                  name: str = "fake"):
    """A real run directory (run.json, ledger with train + held-out datasets, empty store) whose 'base model'
    is a path that is never loaded: blocks come from :class:`FakeTrainer`."""
    import json

    from s3t_llm.config import load_config
    from s3t_llm.ledger import Ledger
    from s3t_llm.planner import plan_sequences
    from s3t_llm.run import DATASET, HELDOUT, Run

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    data = root / f"{name}-source.json"
    data.write_text(json.dumps(records))
    cfg = load_config(None, [f"name={name}", f"output_dir={root / 'runs'}", "model.name=/fake/base",
                             f"data.path={data}", f"s3t.shards={m}", f"s3t.slices={L}", f"s3t.budget={B}",
                             "data.heldout=0"])
    d = cfg.run_dir
    d.mkdir(parents=True)
    with Ledger(d / "ledger.sqlite") as led:
        led.register(DATASET, records, m=m, L=L, seed=0, source=str(data))
        if heldout:
            led.register(HELDOUT, list(heldout), m=1, L=1, seed=0, source=str(data))
    info = {"config": cfg.to_dict(), "model_path": "/fake/base", "base_fingerprint": "fake", "num_layers": L,
            "blocks": [[L - 1 - b] for b in range(L)], "dataset": DATASET, "source": str(data),
            "sequences": [list(x) for x in plan_sequences(L, B, method="cyclic", seed=0)]}
    (d / "run.json").write_text(json.dumps(info))
    return Run.open(d)


class FakeTrainer:
    """Trains a stage in two halves (``begin`` reads the data, ``finish`` writes the block through the real
    ``Run.write_block`` check), so that a test can land deletions in between. A block's tensor is a
    deterministic function of its parent's digest and the text of its live training samples (like a real
    stage: a function of seed, prefix data and parent), and never contains the text itself.
    ``trained`` maps every block digest ever written to the sample ids it was trained on."""

    def __init__(self, run):
        self.run = run
        self.trained: dict[str, set[str]] = {}

    def begin(self, shard: int, prefix: tuple[int, ...]) -> dict | None:
        import hashlib

        from s3t_llm.run import DATASET

        run, prefix = self.run, tuple(prefix)
        store = run.store
        parent_sha = None
        if len(prefix) > 1:
            if not store.has_block(shard, prefix[:-1]):
                return None
            parent_sha = store.manifest(shard, prefix[:-1])["sha256"]
        ids, h = [], hashlib.sha256(f"{parent_sha}|{shard}|{prefix}".encode())
        with run.ledger() as led:
            hashes = {str(sl): led.slice_hash(DATASET, shard, sl) for sl in prefix}
            for sl in prefix:
                for sid, rec in led.slice_samples(DATASET, shard, sl):
                    ids.append(sid)
                    h.update(json.dumps(rec, sort_keys=True).encode())
        return {"shard": shard, "prefix": prefix, "ids": ids, "digest": h.digest(), "hashes": hashes,
                "parent_sha256": parent_sha}

    def finish(self, job: dict) -> dict:
        import numpy as np

        run, shard, prefix = self.run, job["shard"], job["prefix"]
        layer = run.blocks[len(prefix) - 1][0]
        vals = np.frombuffer(job["digest"], dtype=np.uint8).astype(np.float32)
        tensors = {f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight": vals.reshape(4, 8),
                   f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_B.weight": vals.reshape(8, 4)}
        man = run.write_block(shard, prefix, tensors, {
            "block": len(prefix), "layers": run.blocks[len(prefix) - 1], "slices": list(prefix),
            "slice_hashes": job["hashes"], "sample_ids": job["ids"], "n_samples": len(job["ids"]),
            "parent_sha256": job["parent_sha256"]})
        self.trained[man["sha256"]] = set(job["ids"])
        return man

    def train_missing(self, shards=None) -> int:
        """Train every stage of the plan that is not valid (parents first), like ``train_run``."""
        from s3t_llm import exactness
        from s3t_llm.training import stage_plan

        n = 0
        for shard, prefix in stage_plan(self.run, shards):
            valid = exactness.valid_blocks(self.run.block_manifests(), self.run.slice_hashes())
            if (shard, prefix) in valid or (len(prefix) > 1 and (shard, prefix[:-1]) not in valid):
                continue
            job = self.begin(shard, prefix)
            if job and job["ids"]:
                self.finish(job)
                n += 1
        return n


import json  # noqa: E402  (used by FakeTrainer)
