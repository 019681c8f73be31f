"""The activation cache: the frozen part of a stage's forward, computed once per sample and reused.

With top-down blocks (block 1 nearest the output), stage k of a sequence trains block k; every LoRA layer below
block k's lowest layer ``lo`` belongs to a block > k, which is zero at stage k (a zero LoRA B adds exactly 0.0),
and the layers without LoRA are the frozen base. So the hidden state that enters layer ``lo`` is a function of
the base model and of token ids alone: the same at every stage whose boundary is ``lo``, in every sequence of
the shard and in every retraining. The cache holds it (key: layer, the (shard, slice, slice content hash) cell
the sample belongs to, sha256 of the token ids; the cache belongs to one base fingerprint and precision) and
the stage runs only layers ``lo..N-1``: the decoder is given the cached states as ``inputs_embeds`` (padded to
the batch like the token ids, right padding, zeros at pad positions) with the batch's own attention mask;
position ids are the decoder's default ``arange`` as in the uncached path.

Exactness (what may be reused, and when):

* entries are filled per (shard, slice) cell, in that cell's canonical batches: the cell's live samples that the
  stage trains on (TRL drops a sample by its own content only), in ledger order, duplicates of token ids kept
  once (first occurrence), cut into batches of a fixed size (``train.batch_size``), right-padded with the pad
  token and the attention mask exactly as TRL's collator pads the uncached path; eval mode, no grad, adapters
  zero below the boundary. An entry's value is therefore a function of its own slice's live samples only, the
  slice's data, which every stage using that entry trains on anyway (it is in the stage's prefix); batch-mates
  from other slices or shards never occur. It does not depend on which stage or sequence first needed it (the
  same slice content gives the same batches, so the same bits), so a stage's result stays a deterministic
  function of (seed, shard, prefix, the prefix's data, parent blocks) whether its entries were hits or fills;
* a stage looks entries up in the cells of its own prefix only, by the token ids of its own live samples (read
  from the ledger for that stage); if two cells of the prefix hold the same token ids, the first cell in prefix
  order answers (a choice from the stage's own data);
* a deletion changes the slice's content hash, so the slice's old entries can never answer again (the key
  carries the hash), and the trainer clears the whole cache anyway when the ledger's slice hashes change: the
  new canonical batches of the changed slice are filled afresh, and the other slices' entries, filled again,
  come out bit for bit the same (their batches did not change);
* ``boundary`` refuses a stage where any block below the boundary is not zero at that stage, and ``check_zero``
  verifies it on the tensors before every cached stage (a non-zero block below the boundary is an error);
* in memory up to ``limit_bytes``, then (``disk_limit_bytes`` > 0) on disk in the trainer's own scratch
  directory under the run (``.trainer-pid<PID>-*/act/``, mode 0700, safetensors in the training dtype), one
  directory per (layer, shard, slice, slice hash, lineage) group (lineage: ``base``, or the lower prefix and
  its block's manifest digest); a stage whose entries do not fit in both together runs uncached (a decision
  from the stage's own data, so deterministic); ``clear`` drops everything, files included (the trainer calls
  it when ``train_run`` returns and when the ledger's slice hashes change, i.e. a deletion landed). Erasure of
  the disk tier: a deletion destroys every group whose slice hash is no longer current or whose lower block is
  no longer valid (``stale_groups``, listed in the certificate like any other artifact; a live trainer that
  then misses an entry stops the stage as stale), a dead trainer's scratch is removed by every deletion, and
  ``s3t verify`` fails on a stale group or a dead trainer's scratch. The values are the same bits from either tier.

Cost: a cell is forwarded once, up to the highest boundary any stage of the plan needs it at (``fill_to``, a
hint from the plan: ``highest_boundary``), capturing every lower boundary on the way; the layers below a
boundary are identical computations whichever higher layer the forward stops at, so the hint changes the cost,
never the values. Memory: entries = samples x tokens x hidden x bytes, per boundary layer held.

Numerics: on CPU fp32 a state computed in its slice's canonical batch differs from the one the uncached path
computes inside a training batch (other batch-mates, other padded length: the matrix products see other
shapes) by float rounding (relative ~1e-7 on SmolLM2), so a cached stage matches an uncached one to ~1e-6 in
its losses, not bit for bit; cached runs reproduce each other bit for bit.

Bottom-up blocks (``s3t.block_order: bottom_up``, block 1 nearest the input): below block k's lowest layer lie
the trained, frozen blocks 1..k-1 (``lower_blocks``), so the state entering it is a function of the base, the
token ids and those blocks' tensors. An entry then carries their digest in its cell (``block_digest``: sha256 of
the loaded tensors, checked on every stage), is filled at that boundary only, in eval mode, and answers the
stages that have exactly those blocks below (the stage itself over its epochs, and its siblings in the
shared-prefix tree, which share the parent). In a bottom-up run the frozen blocks below the trained one run
without LoRA dropout in both paths (they are fixed features; dropout there would only add input noise to the
trained block and would make any cached state inexact); block k and the zero blocks above keep theirs. An
explicit layout (``lora.blocks``) of a top-down run with a trained block with dropout below block k trains that
stage uncached. Deletion: a deleted sample's slice hash changes, which clears the whole cache (see above), and
every entry computed through a block carries that block's digest, so it can answer only while that exact block
is loaded.

LoRA dropout: the uncached forward draws a dropout mask for every LoRA module of the zero blocks below the
boundary too. The cached path makes the same draws (``F.dropout`` on empty tensors of the same shapes, dtype
and device, in forward order) before the upper layers run, so both paths consume the same random stream and
the upper layers' masks are the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from .run import StaleStageError

logger = logging.getLogger(__name__)

# Forward order of the LoRA-adapted projections inside a Llama decoder layer (attention, then MLP:
# down_proj(act(gate_proj(x)) * up_proj(x))).
FORWARD_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Captured(Exception):
    """Raised by the capture hook: the forward has reached the boundary, the rest is not needed."""


def boundary(blocks: list[list[int]], k: int) -> int | None:
    """The layer from which stage ``k`` (1-based; block k trains, blocks > k are zero, blocks < k are frozen)
    can run on cached states: block k's lowest layer ``lo``; None when no layer would be skipped (``lo == 0``).
    The state entering ``lo`` is a function of the base and of the blocks < k that have layers below ``lo``
    (``lower_blocks``: none in a top-down layout, blocks 1..k-1 bottom-up), whose digest keys the entry."""
    lo = min(blocks[k - 1])
    return None if lo == 0 else lo


def base_boundary(blocks: list[list[int]], k: int) -> int | None:
    """``boundary`` where the state entering it is the frozen base's alone (no block <= k below it): an entry
    there is shared by every stage of the shard with that boundary, in every sequence and retraining."""
    lo = boundary(blocks, k)
    return None if lo is None or lower_blocks(blocks, k) else lo


def lower_blocks(blocks: list[list[int]], k: int) -> list[int]:
    """The blocks < k (trained and frozen at stage k) with a layer below block k's lowest layer."""
    lo = min(blocks[k - 1])
    return [b for b in range(1, k) if min(blocks[b - 1]) < lo]


def block_digest(block_params: dict, bs: list[int]) -> str:
    """sha256 over the named tensors of blocks ``bs`` as they are loaded now (dtype, shape and bytes, in
    name order); "base" for no block. Keys an entry computed through trained blocks."""
    import torch

    if not bs:
        return "base"
    h = hashlib.sha256()
    for b in sorted(bs):
        for name, p in sorted(block_params[b], key=lambda x: x[0]):
            t = p.detach().to("cpu").contiguous()
            h.update(f"{b}|{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def highest_boundary(blocks: list[list[int]], sequences, sl: int, layer: int | None = None) -> int | None:
    """The highest boundary layer at which any stage of ``sequences`` needs slice ``sl``'s entries (slice ``sl``
    at position p of a sequence is in the prefix of stages p+1..L), at least ``layer``. A cost hint for the
    fill (how far up to forward a cell once); it never changes an entry's value."""
    tops = [x for seq in sequences for p, s in enumerate(seq) if int(s) == int(sl)
            for x in (base_boundary(blocks, k) for k in range(p + 1, len(blocks) + 1)) if x is not None]
    if layer is not None:
        tops.append(layer)
    return max(tops) if tops else None


def zero_top(block_params: dict, blocks: list[list[int]]) -> int:
    """The highest layer whose entering state is, right now, the frozen base's: every LoRA layer below it has
    zero B matrices (read from the tensors). A fill may forward up to it, never above."""
    top = max(i for b in blocks for i in b) + 1
    for b, params in block_params.items():
        if any("lora_B" in name and bool(p.detach().abs().sum() != 0) for name, p in params):
            top = min(top, min(blocks[b - 1]))
    return top


def token_key(ids) -> str:
    import numpy as np

    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


_GROUP = re.compile(r"^L(\d+)-s(\d+)-x(\d+)-([0-9a-f]+)-(?:base|q([0-9-]+)-([0-9a-f]{16}))$")


def group_name(layer: int, cell, lineage: str) -> str:
    """The disk tier's directory of one (layer, cell, lineage) group; what ``stale_groups`` parses."""
    return f"L{int(layer)}-s{int(cell[0])}-x{int(cell[1])}-{cell[2]}-{lineage}"


def lineage_of(lower_prefix, parent_sha: str | None) -> str:
    """``base`` for a state of the frozen base; else the lower prefix and its block's manifest digest."""
    if not lower_prefix:
        return "base"
    return "q" + "-".join(str(int(x)) for x in lower_prefix) + "-" + str(parent_sha)[:16]


def group_problem(name: str, hashes, blocks, valid) -> str | None:
    """Why the disk-tier group ``name`` must not be used (None: it is current): its slice's hash is not
    ``hashes[(shard, slice)]``, or its lower block is not in ``valid`` with the recorded digest, or the name does
    not parse. ``blocks``: block manifests by (shard, prefix)."""
    m = _GROUP.match(name)
    if m is None:
        return "unknown entry group"
    shard, sl, h = int(m.group(2)), int(m.group(3)), m.group(4)
    if hashes.get((shard, sl)) != h:
        return "its slice changed"
    if m.group(5) is not None:
        q = tuple(int(x) for x in m.group(5).split("-"))
        man = blocks.get((shard, q))
        if (shard, q) not in valid or man is None or not str(man.get("sha256", "")).startswith(m.group(6)):
            return "computed through a block that is no longer valid"
    return None


def _listdir(p: Path) -> list[Path]:
    try:
        return sorted(p.iterdir())
    except (FileNotFoundError, NotADirectoryError):  # removed meanwhile (a trainer clearing its scratch)
        return []


def cache_groups(run_dir) -> list[Path]:
    """Every disk-tier group directory under ``run_dir``'s trainer scratch (tolerates directories that vanish
    while it lists: a live trainer clears its own)."""
    return [g for t in _listdir(Path(run_dir)) if t.name.startswith(".trainer-")
            for g in _listdir(t / "act") if not g.name.startswith(".trash-")]


def stale_groups(run_dir, hashes, blocks, valid) -> list[dict]:
    """Every disk-tier group under ``run_dir``'s trainer scratch that must not be used any more
    (``group_problem``)."""
    out = []
    for g in cache_groups(run_dir):
        problem = group_problem(g.name, hashes, blocks, valid)
        if problem:
            m = _GROUP.match(g.name)
            where = {"shard": int(m.group(2)), "slice": int(m.group(3))} if m else {}
            out.append({"kind": "activation-cache", **where, "path": str(g), "problem": problem})
    return out


class _Spilled:
    """An entry of the disk tier: its file and size (the tensor is read back on use)."""

    __slots__ = ("path", "nbytes")

    def __init__(self, path: Path, nbytes: int):
        self.path, self.nbytes = path, nbytes


class MissingEntry(StaleStageError):
    """A disk-tier entry is gone (a deletion destroyed its group while the stage ran): the stage is stale."""


class ActivationCache:
    """Hidden states entering a layer of one frozen base model, filled per (shard, slice) cell in that cell's
    canonical batches (see the module docstring); in memory up to ``limit_bytes``, then on disk up to
    ``disk_limit_bytes`` in a scratch directory under ``disk_root`` (the run directory)."""

    def __init__(self, base_id: str, limit_bytes: int, *, disk_limit_bytes: int = 0, disk_root=None,
                 lock=None, current=None):
        """``lock``: the run's in-process writer lock (a deletion holds it from its plan to its certificate), held
        for every write and removal of the disk tier, so a deletion's destroy and a spill never interleave;
        ``current(group name) -> bool``: read from the ledger and the store when a group is first created, so a
        group of a slice that a deletion has changed is never created after that deletion destroyed its kind."""
        self.base_id = base_id
        self._lock = lock if lock is not None else contextlib.nullcontext()
        self._current = current
        self.limit_bytes = int(limit_bytes)
        self.disk_limit_bytes = int(disk_limit_bytes) if disk_root is not None else 0
        self.disk_root = Path(disk_root) if disk_root is not None else None
        self._disk_dir: Path | None = None  # created on the first spill
        self._disk_bytes = 0
        self._groups: set[Path] = set()  # disk groups this cache created (a destroyed one is never recreated)
        self._lineage = "base"  # of the stage being prepared (names its disk groups)
        # (layer, cell, token key) -> tensor (n, hidden), CPU; cell = (shard, slice, slice content hash)
        self._entries: dict[tuple, object] = {}
        self._last_use: dict[tuple, int] = {}
        # layer -> token key -> entry key, for the stage being trained (set by ``prepare``)
        self._active: dict[int, dict[str, tuple]] = {}
        self._clock = 0
        self._nbytes = 0
        self.stats = {"fills": 0, "hits": 0, "fill_seconds": 0.0, "fill_batches": 0, "stages_cached": 0,
                      "stages_over_limit": 0, "clears": 0, "spilled": 0, "disk_reads": 0, "disk_read_seconds": 0.0,
                      "spill_seconds": 0.0, "peak_memory_bytes": 0, "peak_disk_bytes": 0}

    @property
    def nbytes(self) -> int:
        """Bytes held in memory."""
        return self._nbytes

    @property
    def disk_bytes(self) -> int:
        return self._disk_bytes

    @property
    def used(self) -> int:
        return self._nbytes + self._disk_bytes

    @property
    def capacity(self) -> int:
        return self.limit_bytes + self.disk_limit_bytes

    @property
    def disk_dir(self) -> Path | None:
        return self._disk_dir

    def _put(self, key, tensor) -> None:
        if key in self._entries:
            self._drop(key)
        n = tensor.numel() * tensor.element_size()
        # Memory first, then disk. The caller keeps memory + disk within both bounds together, so a tier
        # exceeds its own bound by less than one entry at most.
        if self._nbytes + n <= self.limit_bytes or self.disk_limit_bytes <= 0 or \
                self._disk_bytes + n > self.disk_limit_bytes:
            self._entries[key] = tensor
            self._nbytes += n
        else:
            t0 = time.perf_counter()
            self._entries[key] = self._spill(key, tensor, n)
            self.stats["spill_seconds"] += time.perf_counter() - t0
            self._disk_bytes += n
        self._last_use[key] = self._clock
        self.stats["peak_memory_bytes"] = max(self.stats["peak_memory_bytes"], self._nbytes)
        self.stats["peak_disk_bytes"] = max(self.stats["peak_disk_bytes"], self._disk_bytes)

    def _spill(self, key, tensor, n: int) -> _Spilled:
        from safetensors.torch import save_file

        layer, cell, tk = key
        with self._lock:  # never between a deletion's plan and its certificate (it destroys groups then)
            if self._disk_dir is None:
                # The trainer's scratch naming (``.trainer-pid<PID>-<8 chars>``): a dead owner's is removed by
                # every deletion and the next training, and reported by ``s3t verify``.
                self._disk_dir = Path(tempfile.mkdtemp(prefix=f".trainer-pid{os.getpid()}-", dir=self.disk_root))
                os.chmod(self._disk_dir, 0o700)
            name = group_name(layer, cell, self._lineage)
            g = self._disk_dir / "act" / name
            if g in self._groups:
                if not g.is_dir():
                    # A deletion destroyed this group while the stage ran: never recreate it (its entries are of
                    # the pre-deletion slice); the stage is stale and stops here.
                    raise MissingEntry(f"activation cache: group {name} was destroyed by a deletion while the "
                                       "stage ran")
            else:
                if self._current is not None and not self._current(name):
                    raise MissingEntry(f"activation cache: group {name} is no longer current (a deletion landed "
                                       "while the stage ran)")
                g.mkdir(parents=True, exist_ok=True)
                self._groups.add(g)
            f = g / (tk[:40] + ".safetensors")
            save_file({"h": tensor.contiguous()}, str(f))
        self.stats["spilled"] += 1
        return _Spilled(f, n)

    def _drop(self, key) -> None:
        t = self._entries.pop(key)
        self._last_use.pop(key, None)
        if isinstance(t, _Spilled):
            self._disk_bytes -= t.nbytes
            with self._lock, contextlib.suppress(FileNotFoundError):
                t.path.unlink()
        else:
            self._nbytes -= t.numel() * t.element_size()

    def _value(self, t):
        if not isinstance(t, _Spilled):
            return t
        from safetensors.torch import load_file

        t0 = time.perf_counter()
        try:
            h = load_file(str(t.path))["h"]
        except FileNotFoundError as e:
            raise MissingEntry(f"activation cache: entry {t.path.name} of group {t.path.parent.name} is gone "
                               "(a deletion destroyed it while the stage ran)") from e
        self.stats["disk_reads"] += 1
        self.stats["disk_read_seconds"] += time.perf_counter() - t0
        return h

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._last_use.clear()
        self._active.clear()
        self._nbytes = 0
        self._disk_bytes = 0
        if self._disk_dir is not None:
            with self._lock:
                shutil.rmtree(self._disk_dir, ignore_errors=True)
            self._disk_dir = None
        self._groups.clear()
        self.stats["clears"] += 1

    def entry(self, layer: int, cell, ids):
        """The entry of one sample (token ids) of ``cell`` at ``layer``, or None."""
        t = self._entries.get((layer, cell, token_key(ids)))
        return None if t is None else self._value(t)

    @staticmethod
    def entry_bytes(n_tokens: int, hidden: int, element_size: int) -> int:
        return int(n_tokens) * int(hidden) * int(element_size)

    @staticmethod
    def canonical_batches(rows: list[list[int]], batch_size: int) -> list[list[tuple[str, list[int]]]]:
        """A cell's fill batches: its rows in ledger order, duplicate token ids kept once (first occurrence), cut
        into batches of ``batch_size``; a function of the cell's content alone."""
        seen, uniq = set(), []
        for r in rows:
            tk = token_key(r)
            if tk not in seen:
                seen.add(tk)
                uniq.append((tk, list(r)))
        bs = max(1, int(batch_size))
        return [uniq[i:i + bs] for i in range(0, len(uniq), bs)]

    def prepare(self, model, layer: int, groups, also: tuple[int, ...] = (), *, batch_size: int = 4,
                pad_id: int = 0, fill_to: dict | None = None, lineage: str = "base") -> bool:
        """Make sure every sample of the stage has its entry at ``layer``. ``groups``: ``[(cell, rows)]``, one per
        slice of the stage's prefix in prefix order; ``cell`` = (shard, slice, slice content hash), ``rows`` = the
        token ids of the cell's samples the stage trains on, in ledger order. A cell with missing entries is
        forwarded in its canonical batches (``canonical_batches``; right padding with ``pad_id`` and the
        attention mask, as TRL's collator pads), up to ``fill_to[cell]`` (default ``layer``), capturing ``layer``
        and each of ``also`` (other stages' boundaries) on the way; entries other than ``layer``'s are kept only
        where they fit in the limit. False (nothing changed) when the stage's entries at ``layer`` together
        exceed the limit: the stage must run uncached. ``lineage`` (``lineage_of``) names the disk groups of the
        entries filled now."""
        import torch

        self._lineage = lineage

        inner = _decoder(model)
        hidden = inner.config.hidden_size
        dtype = _hidden_dtype(inner)
        esize = torch.empty((), dtype=dtype).element_size()
        fill_to = fill_to or {}
        batches = {cell: self.canonical_batches(rows, batch_size) for cell, rows in groups}
        keys, active = {}, {}  # entry key at `layer` -> token ids; token key -> entry key (first cell answers)
        for cell, _ in groups:
            for batch in batches[cell]:
                for tk, ids in batch:
                    keys[(layer, cell, tk)] = ids
                    active.setdefault(tk, (layer, cell, tk))
        need = sum(self.entry_bytes(len(r), hidden, esize) for r in keys.values())
        if need > self.capacity:
            self.stats["stages_over_limit"] += 1
            logger.info("activation cache: the stage needs %.1f MiB > limit %.1f MiB (memory %.1f + disk %.1f); "
                        "training it uncached", need / 2**20, self.capacity / 2**20, self.limit_bytes / 2**20,
                        self.disk_limit_bytes / 2**20)
            return False
        missing = [key for key in keys if key not in self._entries]
        # Evict the least recently used entries that this stage does not need until the missing ones fit.
        fill_bytes = sum(self.entry_bytes(len(keys[key]), hidden, esize) for key in missing)
        if self.used + fill_bytes > self.capacity:
            for old in sorted((x for x in self._entries if x not in keys), key=lambda x: self._last_use[x]):
                self._drop(old)
                if self.used + fill_bytes <= self.capacity:
                    break
        t0 = time.perf_counter()
        miss = set(missing)
        work = []  # (cell, top layer, the canonical batches holding a missing entry)
        for cell, _ in groups:
            todo = [b for b in batches[cell] if any((layer, cell, tk) in miss for tk, _ in b)]
            if todo:
                work.append((cell, max(layer, int(fill_to.get(cell) or layer)), todo))
        if work:
            self._fill(model, layer, work, tuple(sorted(set(also) | {layer})), hidden * esize, pad_id)
        self.stats["fill_seconds"] += time.perf_counter() - t0
        self.stats["fills"] += len(missing)
        self.stats["hits"] += len(keys) - len(missing)
        self._clock += 1
        for key in keys:
            self._last_use[key] = self._clock
        self._active[layer] = active
        self.stats["stages_cached"] += 1
        return True

    def _fill(self, model, layer: int, work, capture: tuple[int, ...], token_bytes: int, pad_id: int) -> None:
        """Forward each cell's canonical batches through the layers below its top layer, capturing the states
        entering each boundary of ``capture`` up to the top. ``layer``'s entries are always kept; the others
        where they fit in the limit (after what is still to be filled at ``layer``)."""
        import torch

        inner = _decoder(model)
        dev = next(inner.parameters()).device
        box, state = {}, {"top": layer}

        def capture_at(li):
            def hook(mod, args, kwargs):
                box[li] = args[0] if args else kwargs["hidden_states"]
                if li == state["top"]:
                    raise _Captured
            return hook

        tops = {top for _, top, _ in work}
        layers = sorted(set(capture) | tops)
        was_training = model.training
        model.eval()
        handles = [inner.layers[li].register_forward_pre_hook(capture_at(li), with_kwargs=True) for li in layers]
        # What `layer` still has to receive: reserved for it before any other layer's entry is kept.
        pending = sum(len(ids) for cell, _, bs in work for b in bs for tk, ids in b
                      if (layer, cell, tk) not in self._entries) * token_bytes
        try:
            with torch.no_grad():
                for cell, top, cell_batches in work:
                    state["top"] = top
                    here = [li for li in layers if li <= top]
                    for batch in cell_batches:
                        lengths = [len(ids) for _, ids in batch]
                        T = max(lengths)
                        t = torch.full((len(batch), T), int(pad_id), dtype=torch.long)
                        mask = torch.zeros((len(batch), T), dtype=torch.long)
                        for b, (_, ids) in enumerate(batch):
                            t[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                            mask[b, :len(ids)] = 1
                        box.clear()
                        try:
                            inner(input_ids=t.to(dev), attention_mask=mask.to(dev), use_cache=False)
                        except _Captured:
                            pass
                        else:  # pragma: no cover - the hook always fires
                            raise RuntimeError(f"activation cache: layer {top} was never reached")
                        self.stats["fill_batches"] += 1
                        for li in here:
                            h = box.pop(li).detach().to("cpu")
                            for b, (tk, ids) in enumerate(batch):
                                key = (li, cell, tk)
                                n = lengths[b]
                                if li == layer:
                                    if key not in self._entries:
                                        self._put(key, h[b, :n].clone())
                                        pending -= n * token_bytes
                                elif key not in self._entries and \
                                        self.used + max(pending, 0) + n * token_bytes <= self.capacity:
                                    # Another stage's boundary of the plan, on the way (``fill_to``): kept in
                                    # either tier (memory-only cost 2.3x the fill time in
                                    # benchmarks/results/cache_disk_tier.md's worst case; a spill is ~1 ms).
                                    self._put(key, h[b, :n].clone())
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)

    def batch_states(self, layer: int, input_ids, attention_mask):
        """The cached states for a right-padded batch of the prepared stage: (B, T, hidden), zeros at pad
        positions."""
        import torch

        B, T = input_ids.shape
        active = self._active.get(layer, {})
        rows = []
        lengths = attention_mask.sum(dim=1).tolist()
        for b in range(B):
            n = int(lengths[b])
            if n and not bool(attention_mask[b, :n].all()):
                raise RuntimeError("activation cache: the batch is not right-padded")
            key = active.get(token_key(input_ids[b, :n].tolist()))
            h = self._entries.get(key) if key is not None else None
            if h is not None:
                h = self._value(h)
            if h is None:
                raise RuntimeError("activation cache: a batch row has no entry (not one of the stage's samples)")
            rows.append(h)
        out = torch.zeros((B, T, rows[0].shape[-1]), dtype=rows[0].dtype)
        for b, h in enumerate(rows):
            out[b, :h.shape[0]] = h
        return out.to(input_ids.device)


def _decoder(model):
    """The LlamaModel (``.layers``, ``.embed_tokens``) inside a PEFT-wrapped or plain LlamaForCausalLM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _hidden_dtype(inner):
    return inner.embed_tokens.weight.dtype


def check_zero(block_params: dict, k: int, blocks: list[list[int]], lo: int) -> None:
    """Below ``lo``, every LoRA tensor must be of a block > k whose B matrices are zero, or of a block < k
    (trained, frozen, part of the entries' key: ``block_digest``); block k itself never lies below ``lo``."""
    for b, params in block_params.items():
        if min(blocks[b - 1]) >= lo or b < k:
            continue
        if b == k:
            raise RuntimeError(f"activation cache: block {b} lies below the boundary layer {lo} of stage {k}")
        for name, p in params:
            if "lora_B" in name and bool(p.detach().abs().sum() != 0):
                raise RuntimeError(f"activation cache: {name} below the boundary is not zero")


@contextlib.contextmanager
def cached_forward(model, cache: ActivationCache, layer: int, lora_modules: dict, blocks: list[list[int]],
                   gradient_checkpointing: bool):
    """While active, the decoder runs only layers ``layer..`` from the cache (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    inner = _decoder(model)
    full = inner.layers
    # The dropout draws the uncached forward makes below the boundary, in forward order: (layer, projection).
    below = []
    for b, mods in lora_modules.items():
        for name, mod in mods:
            li = _layer_index(name)
            if li is not None and li < layer:
                proj = name.rsplit(".", 1)[-1]
                drop = mod.lora_dropout["default"]
                p = getattr(drop, "p", 0.0)
                if p > 0:
                    below.append((li, FORWARD_ORDER.index(proj), p, mod))
    below.sort(key=lambda x: (x[0], x[1]))
    cfg = inner.config
    widths = {"o_proj": cfg.num_attention_heads * getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
              "down_proj": cfg.intermediate_size}

    def pre_hook(mod, args, kwargs):
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args:
            input_ids = args[0]
        mask = kwargs.get("attention_mask")
        if input_ids is None or mask is None:
            raise RuntimeError("activation cache: the decoder was called without input_ids and attention_mask")
        h = cache.batch_states(layer, input_ids, mask)
        if model.training and torch.is_grad_enabled():
            for _, oi, p, m in below:
                lora_a = m.lora_A["default"].weight
                width = widths.get(FORWARD_ORDER[oi], cfg.hidden_size)
                F.dropout(torch.empty((*input_ids.shape, width), dtype=lora_a.dtype, device=lora_a.device), p,
                          training=True)
            if gradient_checkpointing:
                h.requires_grad_(True)  # reentrant checkpointing needs an input that requires grad
        kwargs = dict(kwargs)
        kwargs["input_ids"] = None
        kwargs["inputs_embeds"] = h
        return (), kwargs

    inner.layers = torch.nn.ModuleList(list(full)[layer:])
    handle = inner.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        inner.layers = full


def _layer_index(name: str) -> int | None:
    from .adapters import layer_of

    return layer_of(name)
