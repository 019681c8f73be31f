"""The adapter store: trained LoRA blocks and the prefix adapters materialised from them.

A block is identified by its shard and the *prefix* of slices it was trained after: the block of stage k
of sequence pi is ``(shard, pi[:k])``. Sequences of a shard that share a prefix therefore share blocks
(a prefix tree), and a deletion in slice j destroys exactly the blocks whose prefix contains j.

Layout under the run directory::

    blocks/shard{s}/p{i}-{j}-{k}/   adapter_block.safetensors + manifest.json   (one block: its layers' LoRA tensors)
    adapters/{name}/                adapter_config.json + adapter_model.safetensors + s3t_manifest.json

Writes are atomic (staging directory + ``os.replace``): a killed process never leaves a block that a
later run would mistake for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path

logger = logging.getLogger(__name__)

BLOCK_FILE = "adapter_block.safetensors"
MANIFEST = "manifest.json"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_MANIFEST = "s3t_manifest.json"

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class StoreError(RuntimeError):
    pass


def staging_dir(parent: Path, name: str) -> Path:
    """A fresh staging directory owned by this process (its pid is in the name: only a dead owner's
    leftovers are ever cleaned, never another live job's write in progress)."""
    parent.mkdir(parents=True, exist_ok=True)
    d = parent / f".staging-{name}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    return d


_STAGING_PID = re.compile(r"-pid(\d+)-[0-9A-Za-z_]{8}$")


def staging_owner_alive(path: Path) -> bool:
    from .locking import pid_alive

    m = _STAGING_PID.search(path.name)
    return bool(m) and pid_alive(int(m.group(1)))


def layer_of(name: str) -> int | None:
    """Decoder layer index parsed from a parameter name (never by substring: "layers.1." != "layers.10.")."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def prefix_key(prefix: tuple[int, ...] | list[int]) -> str:
    if not prefix:
        raise StoreError("a block needs a non-empty prefix")
    return "p" + "-".join(str(int(i)) for i in prefix)


def parse_prefix_key(key: str) -> tuple[int, ...]:
    if not re.fullmatch(r"p\d+(-\d+)*", key):
        raise StoreError(f"not a block key: {key!r}")
    return tuple(int(x) for x in key[1:].split("-"))


def check_adapter_name(name: str) -> str:
    """Adapter names become directory names and vLLM model names: no path characters."""
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise StoreError(f"invalid adapter name {name!r}: use letters, digits, '.', '_' or '-' (no path characters)")
    return name


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def peft_lora_config(lora: dict, layers: list[int], base_model: str) -> dict:
    """A standard PEFT ``adapter_config.json`` for LoRA on ``layers`` (read by PEFT and vLLM alike)."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora["r"], "lora_alpha": lora["alpha"], "lora_dropout": 0.0, "use_rslora": lora["rslora"],
        "target_modules": sorted(lora["target_modules"]), "layers_to_transform": list(layers),
        "layers_pattern": "layers", "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "modules_to_save": None, "use_dora": False,
    }


class AdapterStore:
    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir)
        self.blocks_dir = self.root / "blocks"
        self.adapters_dir = self.root / "adapters"

    # ----- blocks ---------------------------------------------------------------------------------
    def block_dir(self, shard: int, prefix) -> Path:
        return self.blocks_dir / f"shard{int(shard)}" / prefix_key(prefix)

    def has_block(self, shard: int, prefix) -> bool:
        return (self.block_dir(shard, prefix) / MANIFEST).exists()

    def manifest(self, shard: int, prefix) -> dict:
        p = self.block_dir(shard, prefix) / MANIFEST
        if not p.exists():
            raise StoreError(f"no block for shard {shard} prefix {tuple(prefix)}")
        return json.loads(p.read_text())

    def blocks(self, shard: int | None = None) -> list[tuple[int, tuple[int, ...]]]:
        out = []
        if not self.blocks_dir.exists():
            return out
        for sd in sorted(self.blocks_dir.glob("shard*")):
            s = int(sd.name[5:])
            if shard is not None and s != shard:
                continue
            for bd in sorted(sd.iterdir()):
                if bd.is_dir() and (bd / MANIFEST).exists() and bd.name.startswith("p"):
                    out.append((s, parse_prefix_key(bd.name)))
        return out

    def write_block(self, shard: int, prefix, tensors: dict, manifest: dict) -> dict:
        """Atomically store one block's tensors (torch or numpy) with its manifest; returns the manifest
        written. Callers go through :meth:`s3t_llm.run.Run.write_block`, which checks the data is current."""
        final = self.block_dir(shard, prefix)
        staging = staging_dir(final.parent, final.name)
        try:
            if tensors and all(hasattr(v, "detach") for v in tensors.values()):
                from safetensors.torch import save_file

                save_file({k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())},
                          str(staging / BLOCK_FILE))
            else:
                from safetensors.numpy import save_file

                save_file(dict(sorted(tensors.items())), str(staging / BLOCK_FILE))
            manifest = dict(manifest)
            manifest.update(shard=int(shard), prefix=list(prefix), depth=len(prefix),
                            tensor_file=BLOCK_FILE, sha256=sha256_file(staging / BLOCK_FILE),
                            n_tensors=len(tensors), written_at=time.time())
            _write_json(staging / MANIFEST, manifest)
            _fsync_dir(staging)
            if final.exists():  # a stale block being retrained: out of the way atomically, then removed
                trash = final.parent / f".trash-{final.name}-{os.getpid()}-{time.time_ns()}"
                os.replace(final, trash)
                shutil.rmtree(trash)
            os.replace(staging, final)
            _fsync_dir(final.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return manifest

    def load_block(self, shard: int, prefix) -> dict:
        from safetensors.torch import load_file

        d = self.block_dir(shard, prefix)
        man = self.manifest(shard, prefix)
        f = d / BLOCK_FILE
        if sha256_file(f) != man["sha256"]:
            raise StoreError(f"block {d} is corrupt: content hash does not match its manifest")
        return load_file(str(f))

    def destroy_block(self, shard: int, prefix) -> dict:
        """Delete a block from disk; returns what was destroyed (path, content hash, trained slices)."""
        d = self.block_dir(shard, prefix)
        man = self.manifest(shard, prefix)
        shutil.rmtree(d)
        _fsync_dir(d.parent)
        return {"kind": "block", "path": str(d), "sha256": man["sha256"], "shard": shard,
                "prefix": list(prefix), "slices": man.get("slices")}

    def clean_staging(self) -> int:
        """Remove staging directories whose owner process is dead (never a live job's); returns how many."""
        n = 0
        # ``.trainer-*``: a dead trainer's stage checkpoints and activation-cache disk tier (data derived from samples).
        for pattern in ("blocks/shard*/.staging-*", "adapters/.staging-*", "unlearned/.staging-*", ".trainer-*"):
            for p in list(self.root.glob(pattern)):
                if not staging_owner_alive(p):
                    shutil.rmtree(p, ignore_errors=True)
                    n += 1
        for pattern in ("blocks/shard*/.trash-*", "adapters/.trash-*", "unlearned/.trash-*"):
            for p in list(self.root.glob(pattern)):  # what a killed removal left (never in use)
                shutil.rmtree(p, ignore_errors=True)
                n += 1
        return n

    # ----- prefix adapters ------------------------------------------------------------------------
    def adapter_dir(self, name: str) -> Path:
        return self.adapters_dir / check_adapter_name(name)

    def materialise(self, name: str, shard: int, prefix, *, base_model: str, lora: dict) -> Path:
        """Write blocks ``prefix[:1] .. prefix[:len(prefix)]`` of ``shard`` as ONE standard PEFT adapter.

        The adapter is the union of the blocks' tensors (blocks cover disjoint layers), no numeric merge:
        base + this adapter computes exactly base + blocks 1..a.
        """
        # numpy, not torch/peft: the deletion path must not pay for importing them (seconds).
        from safetensors.numpy import load_file, save_file

        prefix = tuple(prefix)
        final = self.adapter_dir(name)
        if final.exists():
            raise StoreError(f"adapter {name} already exists; adapter names are never reused")
        tensors: dict = {}
        layers: list[int] = []
        blocks = []
        for k in range(1, len(prefix) + 1):
            man = self.manifest(shard, prefix[:k])
            f = self.block_dir(shard, prefix[:k]) / BLOCK_FILE
            if sha256_file(f) != man["sha256"]:
                raise StoreError(f"block {f.parent} is corrupt: content hash does not match its manifest")
            t = load_file(str(f))
            overlap = set(t) & set(tensors)
            if overlap:
                raise StoreError(f"blocks overlap on {sorted(overlap)[:3]}")
            tensors.update(t)
            layers.extend(man["layers"])
            blocks.append({"prefix": list(prefix[:k]), "sha256": man["sha256"], "layers": man["layers"],
                           "slices": man["slices"], "slice_hashes": man["slice_hashes"]})
        staging = staging_dir(final.parent, name)
        try:
            _write_json(staging / ADAPTER_CONFIG, peft_lora_config(lora, sorted(layers), base_model))
            save_file(tensors, str(staging / ADAPTER_FILE))
            _write_json(staging / ADAPTER_MANIFEST, {
                "name": name, "shard": int(shard), "prefix": list(prefix), "depth": len(prefix),
                "layers": sorted(layers), "blocks": blocks,
                "slices": sorted({s for b in blocks for s in b["slices"]}),
                "sha256": sha256_file(staging / ADAPTER_FILE), "created_at": time.time(),
            })
            _fsync_dir(staging)
            try:
                os.replace(staging, final)
            except OSError:
                if not (final / ADAPTER_MANIFEST).exists():
                    raise
                # Another job materialised the same name (same blocks, hence the same bytes) first.
            _fsync_dir(final.parent)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        return final

    def adapter_manifest(self, name: str) -> dict:
        return json.loads((self.adapter_dir(name) / ADAPTER_MANIFEST).read_text())

    def adapters(self) -> list[str]:
        if not self.adapters_dir.exists():
            return []
        return sorted(p.name for p in self.adapters_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / ADAPTER_MANIFEST).exists())

    def destroy_adapter(self, name: str) -> dict:
        d = self.adapter_dir(name)
        man = self.adapter_manifest(name)
        shutil.rmtree(d)
        _fsync_dir(d.parent)
        return {"kind": "adapter", "path": str(d), "sha256": man["sha256"], "shard": man["shard"],
                "prefix": man["prefix"], "slices": man["slices"]}
