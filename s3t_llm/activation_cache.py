"""The activation cache: the frozen part of a stage's forward, computed once per sample and reused.

With top-down blocks (block 1 nearest the output), stage k of a sequence trains block k; every LoRA layer below
block k's lowest layer ``lo`` belongs to a block > k, which is zero at stage k (a zero LoRA B adds exactly 0.0),
and the layers without LoRA are the frozen base. So the hidden state that enters layer ``lo`` is, for a sample,
a function of the base model and the sample's token ids alone: the same at every stage whose boundary is
``lo``, in every sequence of the shard and in every retraining. The cache holds it (key: base fingerprint,
precision, layer, sha256 of the token ids) and the stage runs only layers ``lo..N-1``: the decoder is given the
cached states as ``inputs_embeds`` (padded to the batch like the token ids, right padding, zeros at pad
positions) with the batch's own attention mask; position ids are the decoder's default ``arange`` as in the
uncached path.

Exactness (what may be reused, and when):

* an entry is computed from ONE sample (batch of one, unpadded, adapters zero below the boundary, eval mode,
  no grad), so its value never depends on which stage or batch first needed it: a stage's result stays a
  deterministic function of (seed, shard, prefix, data, parent blocks) whether entries were hits or fills;
* a stage looks entries up by the token ids of its own live samples only (read from the ledger for that stage);
* ``boundary`` refuses a stage where any block below the boundary is not zero at that stage, and ``check_zero``
  verifies it on the tensors before every cached stage (a non-zero block below the boundary is an error);
* in memory only (never written anywhere), bounded by ``limit_bytes``; a stage whose entries do not fit runs
  uncached (a decision from the stage's own data, so deterministic); ``clear`` drops everything (the trainer
  calls it when ``train_run`` returns and when the ledger's slice hashes change, i.e. a deletion landed).

Numerics: on CPU fp32 the per-sample state differs from the one computed inside a padded batch of several
samples by float rounding (relative ~5e-7 on SmolLM2: the matrix products see other shapes), so a cached stage
matches an uncached one to ~1e-6 in its losses, not bit for bit; cached runs reproduce each other bit for bit.

LoRA dropout: the uncached forward draws a dropout mask for every LoRA module of the zero blocks below the
boundary too. The cached path makes the same draws (``F.dropout`` on empty tensors of the same shapes, dtype
and device, in forward order) before the upper layers run, so both paths consume the same random stream and
the upper layers' masks are the same.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time

logger = logging.getLogger(__name__)

# Forward order of the LoRA-adapted projections inside a Llama decoder layer (attention, then MLP:
# down_proj(act(gate_proj(x)) * up_proj(x))).
FORWARD_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class _Captured(Exception):
    """Raised by the capture hook: the forward has reached the boundary, the rest is not needed."""


def boundary(blocks: list[list[int]], k: int) -> int | None:
    """The layer from which stage ``k`` (1-based; block k trains, blocks > k are zero) can run on cached states:
    block k's lowest layer ``lo``, provided every LoRA layer below ``lo`` is in a block > k. None when no layer
    would be skipped (``lo == 0``) or the layout puts a trained (< k) block below block k."""
    lo = min(blocks[k - 1])
    below = [b for b, layers in enumerate(blocks, start=1) for i in layers if i < lo]
    if lo == 0 or any(b <= k for b in below):
        return None
    return lo


def token_key(ids) -> str:
    import numpy as np

    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


class ActivationCache:
    """Per-sample hidden states entering a layer of one frozen base model; in memory, bounded."""

    def __init__(self, base_id: str, limit_bytes: int):
        self.base_id = base_id
        self.limit_bytes = int(limit_bytes)
        self._entries: dict[tuple[int, str], object] = {}  # (layer, token key) -> tensor (n, hidden), CPU
        self._last_use: dict[tuple[int, str], int] = {}
        self._clock = 0
        self._nbytes = 0
        self.stats = {"fills": 0, "hits": 0, "fill_seconds": 0.0, "stages_cached": 0, "stages_over_limit": 0,
                      "clears": 0}

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def _put(self, key, tensor) -> None:
        self._entries[key] = tensor
        self._last_use[key] = self._clock
        self._nbytes += tensor.numel() * tensor.element_size()

    def _drop(self, key) -> None:
        t = self._entries.pop(key)
        self._last_use.pop(key, None)
        self._nbytes -= t.numel() * t.element_size()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._last_use.clear()
        self._nbytes = 0
        self.stats["clears"] += 1

    @staticmethod
    def entry_bytes(n_tokens: int, hidden: int, element_size: int) -> int:
        return int(n_tokens) * int(hidden) * int(element_size)

    def prepare(self, model, layer: int, rows: list[list[int]], also: tuple[int, ...] = ()) -> bool:
        """Make sure every row (a sample's token ids) has its entry at ``layer``; False (nothing changed) when the
        rows' entries together exceed the limit, so the stage must run uncached. ``also``: lower layers (other
        stages' boundaries) captured on the way by the same forward, kept only where they fit in the limit."""
        import torch

        inner = _decoder(model)
        hidden = inner.config.hidden_size
        dtype = _hidden_dtype(inner)
        esize = torch.empty((), dtype=dtype).element_size()
        keys = {}
        for r in rows:
            keys.setdefault((layer, token_key(r)), r)
        need = sum(self.entry_bytes(len(r), hidden, esize) for r in keys.values())
        if need > self.limit_bytes:
            self.stats["stages_over_limit"] += 1
            logger.info("activation cache: the stage needs %.1f MiB > limit %.1f MiB; training it uncached",
                        need / 2**20, self.limit_bytes / 2**20)
            return False
        missing = [key for key in keys if key not in self._entries]
        # Evict the least recently used entries that this stage does not need until the missing ones fit.
        fill_bytes = sum(self.entry_bytes(len(keys[key]), hidden, esize) for key in missing)
        if self.nbytes + fill_bytes > self.limit_bytes:
            for old in sorted((x for x in self._entries if x not in keys), key=lambda x: self._last_use[x]):
                self._drop(old)
                if self.nbytes + fill_bytes <= self.limit_bytes:
                    break
        t0 = time.perf_counter()
        if missing:
            self._fill(model, layer, [(key, keys[key]) for key in missing],
                       tuple(sorted(x for x in set(also) if x < layer)), hidden * esize)
        self.stats["fill_seconds"] += time.perf_counter() - t0
        self.stats["fills"] += len(missing)
        self.stats["hits"] += len(keys) - len(missing)
        self._clock += 1
        for key in keys:
            self._last_use[key] = self._clock
        return True

    def _fill(self, model, layer: int, items, also: tuple[int, ...] = (), token_bytes: int = 0) -> None:
        """One forward per sample (batch of one, no padding) through the layers below ``layer``, capturing the
        states entering ``layer`` (and entering each of ``also`` on the way, where they fit in the limit)."""
        import torch

        inner = _decoder(model)
        dev = next(inner.parameters()).device
        box = {}

        def capture_at(li):
            def capture(mod, args, kwargs):
                box[li] = args[0] if args else kwargs["hidden_states"]
                if li == layer:
                    raise _Captured
            return capture

        was_training = model.training
        model.eval()
        handles = [inner.layers[li].register_forward_pre_hook(capture_at(li), with_kwargs=True)
                   for li in (*also, layer)]
        pending = sum(len(ids) for _, ids in items) * token_bytes  # still to fill: reserved for them
        try:
            with torch.no_grad():
                for key, ids in items:
                    t = torch.tensor([ids], dtype=torch.long, device=dev)
                    try:
                        inner(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False)
                    except _Captured:
                        pass
                    else:  # pragma: no cover - the hook always fires
                        raise RuntimeError(f"activation cache: layer {layer} was never reached")
                    self._put(key, box.pop(layer)[0].detach().to("cpu", copy=True))
                    pending -= len(ids) * token_bytes
                    for li in also:
                        h = box.pop(li)
                        extra = len(ids) * token_bytes
                        if (li, key[1]) not in self._entries and \
                                self._nbytes + pending + extra <= self.limit_bytes:
                            self._put((li, key[1]), h[0].detach().to("cpu", copy=True))
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)

    def batch_states(self, layer: int, input_ids, attention_mask):
        """The cached states for a right-padded batch: (B, T, hidden), zeros at pad positions."""
        import torch

        B, T = input_ids.shape
        rows = []
        lengths = attention_mask.sum(dim=1).tolist()
        for b in range(B):
            n = int(lengths[b])
            if n and not bool(attention_mask[b, :n].all()):
                raise RuntimeError("activation cache: the batch is not right-padded")
            h = self._entries.get((layer, token_key(input_ids[b, :n].tolist())))
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
    """Every LoRA tensor of a block with layers below ``lo`` must be a block > k whose B matrices are zero."""
    for b, params in block_params.items():
        if min(blocks[b - 1]) >= lo:
            continue
        if b <= k:
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
