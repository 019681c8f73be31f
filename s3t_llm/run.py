"""A run: one config, one ledger, one plan of sequences, one adapter store, in one directory.

``runs/<name>/run.json`` freezes what must never change under a trained run (the base model and its
fingerprint, the block layout, the sequences per shard, the dataset registration); the ledger records
the samples' cells and deletions; the store holds the blocks. Everything the deletion module and the
server need is derived from these three.
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

from . import exactness
from .adapters import AdapterStore
from .config import ConfigError, RunConfig, load_config
from .ledger import Ledger
from .locking import writer_lock
from .paths import alpaca_path

logger = logging.getLogger(__name__)

DATASET = "train"
HELDOUT = "heldout"  # the run's held-out records: ledger samples too (deletable, erased like any other)
RUN_FILE = "run.json"


BLOCK_ORDERS = ("top_down", "bottom_up")


def split_blocks(layers: list[int], n_blocks: int, order: str = "top_down") -> list[list[int]]:
    """Split LoRA layers into ``n_blocks`` contiguous blocks. ``top_down``: block 1 is nearest the output;
    ``bottom_up``: block 1 is nearest the input. Blocks 1..r (r = layers mod n_blocks) get one layer more."""
    if order not in BLOCK_ORDERS:
        raise ConfigError(f"s3t.block_order={order!r}: expected one of {', '.join(BLOCK_ORDERS)}")
    if n_blocks > len(layers):
        raise ConfigError(f"s3t.slices={n_blocks} is larger than the {len(layers)} LoRA layers; "
                          "each slice needs its own block of at least one layer")
    ordered = sorted(layers, reverse=(order == "top_down"))
    q, r = divmod(len(ordered), n_blocks)
    out, i = [], 0
    for b in range(n_blocks):
        n = q + (1 if b < r else 0)
        out.append(sorted(ordered[i:i + n]))
        i += n
    return out


def block_layout(cfg: RunConfig, num_layers: int) -> list[list[int]]:
    L = cfg.s3t.slices
    if cfg.lora.blocks is not None:
        if cfg.s3t.block_order != "top_down":
            raise ConfigError(f"lora.blocks gives the block layout explicitly, so s3t.block_order="
                              f"{cfg.s3t.block_order!r} has nothing to order; set one of the two")
        blocks = [list(b) for b in cfg.lora.blocks]
        if len(blocks) != L:
            raise ConfigError(f"lora.blocks has {len(blocks)} blocks but s3t.slices={L}")
        flat = [i for b in blocks for i in b]
        if any(not b for b in blocks) or len(set(flat)) != len(flat):
            raise ConfigError(f"lora.blocks={blocks}: blocks must be non-empty and disjoint")
        bad = [i for i in flat if not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"lora.blocks names layers {bad} outside 0..{num_layers - 1}")
        return [sorted(b) for b in blocks]
    n = num_layers if cfg.lora.layers == "all" else int(cfg.lora.layers)
    if n > num_layers:
        raise ConfigError(f"lora.layers={n} but the model has {num_layers} layers")
    return split_blocks(list(range(num_layers - n, num_layers)), L, cfg.s3t.block_order)


def load_training_records(cfg: RunConfig) -> tuple[list[dict], list[dict], str]:
    """The records a run trains on and the held-out records, plus a description of the source."""
    from .records import load_records

    if cfg.data.path:
        records, source = load_records(cfg.data.path), str(cfg.data.path)
    elif alpaca_path().exists():
        records, source = load_records(alpaca_path()), str(alpaca_path())
    else:  # pragma: no cover - needs the hub
        from datasets import load_dataset

        ds = load_dataset("tatsu-lab/alpaca", split="train")
        records = [{"instruction": r["instruction"], "input": r["input"], "output": r["output"]} for r in ds]
        source = "hub:tatsu-lab/alpaca"
    idx = list(range(len(records)))
    rng = random.Random(cfg.s3t.seed)
    need = cfg.data.limit + cfg.data.heldout if cfg.data.limit else len(records)
    if need > len(records):
        raise ConfigError(f"data.limit + data.heldout = {need} exceeds the {len(records)} records of {source}")
    if need < len(records):
        idx = sorted(rng.sample(idx, need))
    if cfg.data.heldout >= len(idx):
        raise ConfigError(f"data.heldout={cfg.data.heldout} leaves no training records of {len(idx)}")
    shuffled = list(idx)
    rng.shuffle(shuffled)
    held = set(shuffled[:cfg.data.heldout])
    train = [records[i] for i in idx if i not in held]
    heldout = [records[i] for i in sorted(held)]
    return train, heldout, source


@dataclass
class Run:
    dir: Path
    config: RunConfig
    info: dict

    @property
    def ledger_path(self) -> Path:
        return self.dir / "ledger.sqlite"

    def ledger(self) -> Ledger:
        return Ledger(self.ledger_path)

    @property
    def store(self) -> AdapterStore:
        return AdapterStore(self.dir)

    @property
    def model_path(self) -> str:
        return self.info["model_path"]

    @property
    def blocks(self) -> list[list[int]]:
        return self.info["blocks"]

    @property
    def block_order(self) -> str:
        """"top_down", "bottom_up" or "explicit" (``lora.blocks``); runs from before the field: top_down."""
        return self.info.get("block_order", "top_down")

    @property
    def sequences(self) -> list[list[int]]:
        return [list(s) for s in self.info["sequences"]]

    @property
    def shards(self) -> int:
        return self.config.s3t.shards

    def lora_dict(self) -> dict:
        c = self.config.lora
        return {"r": c.r, "alpha": c.alpha, "rslora": c.rslora, "target_modules": list(c.target_modules),
                "dropout": c.dropout}

    def datasets(self) -> list[str]:
        """The ledger datasets of this run: the training data first, then the held-out records."""
        with self.ledger() as led:
            names = {d.name for d in led.datasets()}
        return [DATASET] + ([HELDOUT] if HELDOUT in names else [])

    def heldout(self) -> list[dict]:
        """The live held-out records (never trained on; deleted ones are gone), in the ledger's keyed order."""
        with self.ledger() as led:
            if HELDOUT not in {d.name for d in led.datasets()}:
                return []
            return [{"id": sid, **rec} for sid, rec in led.slice_samples(HELDOUT, 0, 0)]

    # ----- creation / opening ---------------------------------------------------------------------
    @classmethod
    def open(cls, run_dir: str | Path) -> "Run":
        d = Path(run_dir)
        f = d / RUN_FILE
        if not f.exists():
            raise FileNotFoundError(f"{d} is not an s3t run (no {RUN_FILE}); train one with `s3t train RECIPE`")
        info = json.loads(f.read_text())
        return cls(d, load_config(info["config"]), info)

    @classmethod
    def create(cls, cfg: RunConfig) -> "Run":
        """Create the run directory, or reopen it if the frozen parts agree with ``cfg``.

        Under a distributed launcher (``WORLD_SIZE`` > 1: ``accelerate launch``, ``torchrun``) this is a
        collective that every rank calls: rank 0 alone creates (or checks) the run, writing run.json and
        registering the ledger; the other ranks wait for it and then open what it made. An error on rank 0 is
        raised on every rank."""
        from .training import on_main_then_broadcast, world_size

        if world_size() == 1:
            return cls._create(cfg)
        made = []

        def create_on_main() -> dict:
            made.append(cls._create(cfg))
            return made[0].config.to_dict()

        conf = on_main_then_broadcast(create_on_main, f"creating run {cfg.run_dir}")
        if made:
            return made[0]
        run = cls.open(cfg.run_dir)  # rank 0's run.json exists now (it broadcast after writing it)
        run.config = load_config(conf)  # the config rank 0's Run carries (a reopened run keeps its original)
        return run

    @classmethod
    def _create(cls, cfg: RunConfig) -> "Run":
        from .models import check_llama, fingerprint, load_config as load_model_config, resolve_model
        from .planner import plan_sequences

        d = cfg.run_dir
        model_path = resolve_model(cfg.model.name)
        num_layers = check_llama(load_model_config(model_path))
        blocks = block_layout(cfg, num_layers)
        s = cfg.s3t
        seqs = [list(x) for x in plan_sequences(s.slices, s.budget, method=s.method, prior=s.prior, seed=s.seed)]
        info = {"config": cfg.to_dict(), "model_path": model_path, "base_fingerprint": fingerprint(model_path),
                "num_layers": num_layers, "blocks": blocks, "sequences": seqs, "dataset": DATASET,
                "block_order": cfg.s3t.block_order if cfg.lora.blocks is None else "explicit"}
        f = d / RUN_FILE
        if f.exists():
            old = json.loads(f.read_text())
            frozen = ("base_fingerprint", "blocks", "sequences")
            changed = [k for k in frozen if old.get(k) != info[k]]
            oc, nc = old["config"], info["config"]
            # A run.json from before s3t.block_order existed was laid out top-down.
            oc = {**oc, "s3t": {"block_order": "top_down", **oc.get("s3t", {})}}
            for sec in ("s3t", "lora", "data", "model"):
                if oc.get(sec) != nc.get(sec):
                    changed.append(sec)
            if changed:
                raise ConfigError(f"run {d} exists with a different {', '.join(changed)}; "
                                  "choose a new name= or output_dir= for a new run")
            # train.* may change between resumptions only if nothing was trained; keep the original.
            return cls.open(d)
        d.mkdir(parents=True, exist_ok=True)
        train, heldout, source = load_training_records(cfg)
        with Ledger(d / "ledger.sqlite") as led:
            res = led.register(DATASET, train, m=s.shards, L=s.slices, seed=s.seed, source=source)
            if heldout:
                led.register(HELDOUT, heldout, m=1, L=1, seed=s.seed, source=source)
        logger.info("registered %d samples (%d duplicates collapsed) from %s in %.1fs",
                    res.n_new, res.n_duplicates_collapsed, source, res.seconds)
        info["source"] = source
        tmpf = d / (RUN_FILE + ".tmp")
        tmpf.write_text(json.dumps(info, indent=2))
        tmpf.replace(f)  # run.json last: its presence means the run is fully set up
        return cls(d, cfg, info)

    # ----- state: everything below decides through s3t_llm.exactness --------------------------------
    def slice_hashes(self) -> dict[tuple[int, int], str]:
        with self.ledger() as led:
            return led.slice_hashes(DATASET)

    def block_manifests(self) -> dict:
        """Every stored block's manifest (a block removed while this reads is simply absent: writers hold the
        writer lock, readers without it may race a removal)."""
        from .adapters import StoreError

        store, out = self.store, {}
        for s, p in store.blocks():
            try:
                out[(s, p)] = store.manifest(s, p)
            except (StoreError, FileNotFoundError):
                pass
        return out

    def snapshot(self) -> "Snapshot":
        """The inputs of the exactness rule, read now: slice hashes (ledger), block, adapter and derived
        (approximately unlearned) manifests (store)."""
        store = self.store
        adapters = {}
        for n in store.adapters():
            try:
                adapters[n] = store.adapter_manifest(n)
            except FileNotFoundError:  # removed while this reads
                pass
        derived = {}
        for mf in sorted((self.dir / "unlearned").glob("*/unlearn_manifest.json")):
            man = json.loads(mf.read_text())
            src = man.get("source_adapter", {})
            derived[mf.parent.name] = {"shard": man.get("shard", src.get("shard")), "path": str(mf.parent),
                                       "source_blocks": src.get("blocks", []), "sha256": man.get("sha256")}
        return Snapshot(self.slice_hashes(), self.block_manifests(), adapters, derived)

    def desired_routing(self, snap: "Snapshot | None" = None) -> dict[int, dict | None]:
        snap = snap or self.snapshot()
        return exactness.desired_routing(self.config.name, self.shards, self.sequences, snap.blocks, snap.hashes)

    def block_is_valid(self, shard: int, prefix, hashes: dict | None = None) -> bool:
        """A block is valid iff it exists, its slices are unchanged since it was trained, and its parent is
        valid with the digest it was trained on (``exactness.valid_blocks``)."""
        hashes = hashes if hashes is not None else self.slice_hashes()
        return (int(shard), tuple(int(x) for x in prefix)) in exactness.valid_blocks(self.block_manifests(), hashes)

    def best_prefixes(self) -> dict[int, tuple[int, int]]:
        """For each shard: (index of the sequence with the longest valid prefix, its length)."""
        routing = self.desired_routing()
        return {s: ((e["sequence"], e["depth"]) if e else (0, 0)) for s, e in routing.items()}

    def write_block(self, shard: int, prefix, tensors: dict, manifest: dict) -> dict:
        """Store a trained block only if what it was trained on is still current: every slice hash in its
        manifest equals the ledger's, and its parent is valid with ``manifest["parent_sha256"]``. The check
        and the write hold the run's writer lock, so no deletion can land between them."""
        prefix = tuple(int(x) for x in prefix)
        with writer_lock(self.dir):
            hashes = self.slice_hashes()
            blocks = self.block_manifests()
            now = {str(sl): hashes[(int(shard), int(sl))] for sl in prefix}
            if manifest.get("slice_hashes") != now:
                raise StaleStageError(f"slices of shard {shard} prefix {prefix} changed while it trained")
            if len(prefix) > 1:
                parent = (int(shard), prefix[:-1])
                if parent not in exactness.valid_blocks(blocks, hashes) or \
                        blocks[parent]["sha256"] != manifest.get("parent_sha256"):
                    raise StaleStageError(f"the parent block of shard {shard} prefix {prefix} changed while it trained")
            return self.store.write_block(shard, prefix, tensors, manifest)


class StaleStageError(RuntimeError):
    """What a stage trained on is no longer current (a deletion landed, or its parent was replaced)."""


@dataclass
class Snapshot:
    hashes: dict
    blocks: dict
    adapters: dict
    derived: dict

    def stale(self) -> dict[str, list]:
        return exactness.stale(self.blocks, self.hashes, self.adapters, self.derived)


def migrate_run(run_dir: str | Path) -> list[str]:
    """Upgrade a run made by an older s3t in place (exclusively: refuses while anything else holds the run):
    ledger schema 1 -> 2 (deleted records erased, tombstones kept), ``heldout.jsonl`` -> the ledger's
    ``heldout`` dataset (the file is removed), and block manifests without ``parent_sha256`` get their
    parent's digest when the parent was written before them (otherwise they stay invalid and are retrained)."""
    from .ledger import migrate
    from .locking import hold

    d = Path(run_dir)
    out = []
    with hold(d, "delete"):
        res = migrate(d / "ledger.sqlite")
        out.append(f"ledger: schema {res['from']} -> {res['to']}, {res['erased']} deleted record(s) erased")
        run = Run.open(d)
        legacy = d / "heldout.jsonl"
        if legacy.exists():
            recs = [json.loads(line) for line in legacy.read_text().splitlines() if line.strip()]
            with run.ledger() as led:
                if recs:
                    led.register(HELDOUT, recs, m=1, L=1, seed=run.config.s3t.seed, source=run.info.get("source"))
                led.erase()
            legacy.unlink()
            out.append(f"held-out: {len(recs)} record(s) moved into the ledger; heldout.jsonl removed")
        store, fixed, left = run.store, 0, 0
        for shard, prefix in store.blocks():
            if len(prefix) < 2:
                continue
            man = store.manifest(shard, prefix)
            if "parent_sha256" in man:
                continue
            parent = store.manifest(shard, prefix[:-1]) if store.has_block(shard, prefix[:-1]) else None
            if parent and parent.get("written_at", 0) <= man.get("written_at", 0):
                man["parent_sha256"] = parent["sha256"]
                p = store.block_dir(shard, prefix) / "manifest.json"
                tmp = p.with_suffix(".tmp")
                tmp.write_text(json.dumps(man, indent=2, sort_keys=True))
                os.replace(tmp, p)
                fixed += 1
            else:
                left += 1
        out.append(f"blocks: parent digest recorded for {fixed}, {left} left invalid (parent newer or missing)")
        from .deletion import destroy, stale_artifacts

        gone = destroy(run, stale_artifacts(run))
        out.append(f"stale artifacts destroyed: {len(gone)} (the exactness rule applied to the migrated run)")
    return out
