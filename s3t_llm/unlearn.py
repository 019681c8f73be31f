"""Approximate unlearning on a served S3T adapter: DEL (localized reset + fine-tune) and the usual baselines.

**No guarantee.** Everything here is *approximate* unlearning: the result is a model that was trained on the
forget set and then edited. Nothing bounds how much of the forget set it still encodes. The exact path is
:func:`s3t_llm.deletion.apply_deletion`. These methods exist to be compared with it (``benchmarks/
unlearning_comparison.py``) and as a stop-gap on a shard whose exact retraining is pending.

DEL, after Torkzadehmahani et al., "Improved Localized Machine Unlearning Through the Lens of Memorization"
(TMLR 2025; github.com/reihaneh-torkzadehmahani/DEL-Unlearning), moved from conv/ViT channels to LoRA:

1. **Criticality.** Over the forget set, accumulate ``theta * grad(loss)`` for every candidate parameter (the
   gradient of each batch's mean completion NLL, summed over batches), then take the absolute value.
2. **Channels.** A channel is one row of a LoRA ``B`` matrix (shape ``out x r``): the ``r`` coefficients that map
   the rank-``r`` bottleneck to ONE output unit of the adapted projection (a q/k/v/o/gate/up/down output feature).
   A row is scored by the mean of its criticality (``variant="mean"``, the authors' ViT rule) or by the mean of its
   top-``h`` entries (``variant="topk"``, their ResNet rule; ``h = max(1, int(topk_frac * r))``; the authors' code
   takes ``h`` as 10% of the number of *rows*, which for a rank-8 row would exceed the row: we use the row
   length). Every entry of a row gets the row's score; rows are taken best first until the next one would
   exceed ``alpha`` x (number of candidate parameters). ``variant="random"`` takes random rows under the same
   budget (the control).
3. **Reset + fine-tune.** Selected rows are reset to their PEFT initialisation, which for ``B`` is zero, and only
   they are fine-tuned on the retain set (TRL ``SFTTrainer``; a gradient hook zeroes every other entry, weight
   decay is 0, so Adam never moves them: checked bit for bit after training).

Why only ``B`` rows are candidates: zeroing ``B[i]`` returns output unit ``i`` of that projection *exactly* to the
base model, i.e. the reset state is both PEFT's init and a well-defined "never learned" state for that unit.
A row of ``A`` (shape ``r x in``) is one rank component feeding *every* output unit through ``B[:, j]``; PEFT
initialises ``A`` with Kaiming-uniform noise, which is harmless at init only because ``B = 0``. Re-drawing
``A[j]`` under a trained ``B`` injects fresh noise into all outputs of the projection rather than removing
anything, and zeroing ``A[j]`` kills the component for good (its gradient through ``A`` and ``B`` vanishes).
A side benefit: all candidate rows have ``r`` entries, so the budget is an exact row count and the random
control selects exactly as many parameters. ``alpha`` is a fraction of the ``B`` parameters (half of all LoRA
parameters for square projections); the manifest records both fractions.

Baselines, with the loss definitions of open-unlearning (locuslab/open-unlearning, ``src/trainer``):
``ga`` (GradAscent: ``-NLL(forget)``), ``graddiff`` (``-NLL(forget) + NLL(retain)``), ``npo``
(``-(2/beta) * logsigmoid(-beta * (logp_theta - logp_ref))`` on the forget set, ``logp`` summed over a sequence's
completion tokens, the reference = the adapter before unlearning) and ``npo_rt`` (``npo`` + ``NLL(retain)``, which
is open-unlearning's NPO with its default alpha=gamma=1). Only the adapter's LoRA tensors train, the base never.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from .adapters import ADAPTER_CONFIG, ADAPTER_FILE, check_adapter_name, peft_lora_config, sha256_file, staging_dir
from .prompts import to_example
from .run import DATASET, Run

logger = logging.getLogger(__name__)

METHODS = ("del", "del_random", "ga", "graddiff", "npo", "npo_rt")
VARIANTS = ("mean", "topk", "random")
UNLEARNED_DIR = "unlearned"
MANIFEST = "unlearn_manifest.json"

# Mask: PEFT parameter name (".default." kept) of every candidate lora_B matrix -> bool tensor [out] of selected rows.
Mask = dict


def saved_key(param_name: str) -> str:
    """PEFT's saved-adapter key for an in-memory parameter name (the adapter name is dropped)."""
    return param_name.replace(".default.", ".")


def _check_params(alpha: float, variant: str) -> None:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha={alpha!r}: must be in (0, 1]")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS}")


# ----- tokenisation and losses ---------------------------------------------------------------------------
def tokenize_examples(examples: list[dict], tokenizer, max_length: int) -> list[dict]:
    """``input_ids`` + ``labels`` (-100 on the prompt) for prompt/completion examples, as TRL's SFTTrainer makes them.

    The same steps as ``trl.SFTTrainer`` (1.x) with ``completion_only_loss=True``: EOS appended to a plain-text
    completion, the completion starting where the tokenised prompt and prompt+completion diverge, truncation
    keeping the start, examples without a completion token left dropped (``None`` in their place, so callers
    keep the alignment with sample ids). A test checks equality with TRL's own output.
    """
    out = []
    for ex in examples:
        prompt, completion = ex["prompt"], ex["completion"]
        if isinstance(prompt, str):
            if not completion.endswith(tokenizer.eos_token):
                completion = completion + tokenizer.eos_token
            p_ids = tokenizer(text=prompt)["input_ids"]
            pc_ids = tokenizer(text=prompt + completion)["input_ids"]
        else:
            p_ids = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True,
                                                  add_generation_prompt=True)["input_ids"]
            pc_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
        n = 0
        while n < min(len(p_ids), len(pc_ids)) and p_ids[n] == pc_ids[n]:
            n += 1
        labels = [-100] * n + list(pc_ids[n:])
        ids, labels = list(pc_ids[:max_length]), labels[:max_length]
        out.append({"input_ids": ids, "labels": labels} if any(x != -100 for x in labels) else None)
    return out


def _pad(rows: list[dict], pad_id: int) -> dict:
    import torch

    T = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        attn[i, :n] = 1
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def sequence_nll(model, batch: dict):
    """Per-sequence summed NLL of the label tokens and their count: ``(nll [B], n_tokens [B])``."""
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll.sum(1), (labels != -100).sum(1)


def example_losses(model, tokenizer, examples: list[dict], *, max_length: int, batch_size: int = 8) -> list[float]:
    """Mean completion-token NLL of each example (``nan`` for one whose completion is truncated away)."""
    import torch

    toks = tokenize_examples(examples, tokenizer, max_length)
    keep = sorted((i for i, t in enumerate(toks) if t is not None), key=lambda i: len(toks[i]["input_ids"]))  # less padding
    out = [float("nan")] * len(examples)
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, len(keep), batch_size):
            idx = keep[s:s + batch_size]
            batch = {k: v.to(dev) for k, v in _pad([toks[i] for i in idx], tokenizer.pad_token_id).items()}
            nll, n = sequence_nll(model, batch)
            for i, a, b in zip(idx, nll.tolist(), n.tolist()):
                out[i] = a / b
    model.train(was_training)
    return out


def membership_auc(member_losses: list[float], nonmember_losses: list[float]) -> float:
    """Loss-threshold membership inference AUC (Mann-Whitney): P(a member's loss < a non-member's), ties 1/2.

    0.5: the losses do not tell the forget set from unseen data; 1.0: every forget sample is recognisable.
    """
    m = [x for x in member_losses if not math.isnan(x)]
    h = [x for x in nonmember_losses if not math.isnan(x)]
    if not m or not h:
        raise ValueError("membership_auc needs at least one loss on each side")
    wins = sum((a < b) + 0.5 * (a == b) for a in m for b in h)
    return wins / (len(m) * len(h))


# ----- localisation ---------------------------------------------------------------------------------------
def lora_b_params(model) -> dict:
    """The candidate tensors: every ``lora_B`` weight of the model, by parameter name."""
    return {n: p for n, p in model.named_parameters() if "lora_B" in n}


def criticality(model, forget_examples: list[dict], tokenizer, *, max_length: int, batch_size: int = 4) -> dict:
    """``G = |sum over forget batches of theta * d(mean NLL)/d(theta)|`` for every ``lora_B`` tensor (fp32, CPU)."""
    import torch

    params = lora_b_params(model)
    if not params:
        raise ValueError("the model has no lora_B parameters")
    toks = [t for t in tokenize_examples(forget_examples, tokenizer, max_length) if t is not None]
    if not toks:
        raise ValueError("no forget example has a completion token within max_length")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
        p.grad = None
    was_training = model.training
    model.eval()  # as the authors: no dropout while scoring
    dev = next(iter(params.values())).device
    try:
        for s in range(0, len(toks), batch_size):
            batch = {k: v.to(dev) for k, v in _pad(toks[s:s + batch_size], tokenizer.pad_token_id).items()}
            nll, n = sequence_nll(model, batch)
            (nll.sum() / n.sum()).backward()  # grads accumulate over batches: sum of per-batch gradients
        with torch.no_grad():
            G = {n: (p.detach().float() * p.grad.float()).abs().cpu() for n, p in params.items()}
    finally:
        for n, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(flags[n])
        model.train(was_training)
    return G


def row_scores(G: dict, variant: str = "mean", topk_frac: float = 0.1) -> dict:
    """One score per row of each criticality tensor: its mean, or the mean of its top-h entries."""
    import torch

    out = {}
    for n, g in G.items():
        g = g.reshape(g.shape[0], -1).float()
        if variant == "mean":
            out[n] = g.mean(dim=1)
        elif variant == "topk":
            h = max(1, int(topk_frac * g.shape[1]))
            out[n] = torch.topk(g, h, dim=1).values.mean(dim=1)
        else:
            raise ValueError(f"row_scores: variant={variant!r}, use 'mean' or 'topk'")
    return out


def _take_rows(sizes: dict, order, budget: int) -> Mask:
    """Rows in ``order`` (indices into the rows of ``sorted(sizes)`` laid end to end) until the next one would
    exceed ``budget`` parameters. ``sizes``: name -> (rows, entries per row)."""
    import torch

    names = sorted(sizes)
    row_len = torch.cat([torch.full((sizes[n][0],), sizes[n][1], dtype=torch.long) for n in names])
    take = order[torch.cumsum(row_len[order], 0) <= budget]  # a prefix of ``order``: the cumsum only grows
    flat = torch.zeros(len(row_len), dtype=torch.bool)
    flat[take] = True
    return {n: t.clone() for n, t in zip(names, flat.split([sizes[n][0] for n in names]))}


def _budget(sizes: dict, alpha: float) -> int:
    return int(alpha * sum(o * i for o, i in sizes.values()))


def select_rows(G: dict, alpha: float, variant: str = "mean", *, topk_frac: float = 0.1) -> Mask:
    """The global top-``alpha`` (by parameter count) of rows by their score. Ties: name order, then row index."""
    import torch

    _check_params(alpha, variant)
    sizes = {n: (int(g.shape[0]), int(g[0].numel())) for n, g in G.items()}
    scores = row_scores(G, variant, topk_frac)
    flat = torch.cat([scores[n] for n in sorted(sizes)])
    order = torch.sort(-flat, stable=True).indices  # stable: equal scores keep (name, row) order
    return _take_rows(sizes, order, _budget(sizes, alpha))


def random_rows(shapes: dict, alpha: float, seed: int = 0) -> Mask:
    """Random rows under the same budget as :func:`select_rows` (``shapes``: name -> (rows, entries per row))."""
    import torch

    _check_params(alpha, "random")
    sizes = {n: (int(s[0]), int(s[1])) for n, s in shapes.items()}
    order = torch.randperm(sum(o for o, _ in sizes.values()), generator=torch.Generator().manual_seed(seed))
    return _take_rows(sizes, order, _budget(sizes, alpha))


def localize(model, forget_examples: list[dict], tokenizer, alpha: float = 0.3, variant: str = "mean", *,
             max_length: int = 256, batch_size: int = 4, topk_frac: float = 0.1, seed: int = 0) -> Mask:
    """DEL's localisation over the model's ``lora_B`` rows (see the module docstring). Returns a :data:`Mask`."""
    _check_params(alpha, variant)
    if variant == "random":
        return random_rows({n: tuple(p.shape) for n, p in lora_b_params(model).items()}, alpha, seed)
    G = criticality(model, forget_examples, tokenizer, max_length=max_length, batch_size=batch_size)
    return select_rows(G, alpha, variant, topk_frac=topk_frac)


def mask_stats(model, mask: Mask) -> dict:
    """How much a mask selects: rows, parameters, and fractions of the B and of all LoRA parameters."""
    params = dict(model.named_parameters())
    n_b = sum(params[n].numel() for n in mask)
    n_lora = sum(p.numel() for n, p in params.items() if "lora_" in n)
    rows = sum(int(m.sum()) for m in mask.values())
    n_sel = sum(int(m.sum()) * params[n].shape[1] for n, m in mask.items())
    return {"rows": rows, "params": n_sel, "frac_of_B": n_sel / n_b if n_b else 0.0,
            "frac_of_lora": n_sel / n_lora if n_lora else 0.0,
            "modules_touched": sum(1 for m in mask.values() if m.any()), "modules": len(mask)}


def reset(model, mask: Mask) -> int:
    """Reset the selected ``lora_B`` rows to PEFT's init (zero): those output units become the base's exactly.

    Returns the number of parameters reset."""
    import torch

    params = dict(model.named_parameters())
    n = 0
    with torch.no_grad():
        for name, m in mask.items():
            if "lora_B" not in name:
                raise ValueError(f"{name}: only lora_B rows are reset (see the module docstring)")
            if m.any():
                params[name][m.to(params[name].device)] = 0.0
                n += int(m.sum()) * params[name].shape[1]
    return n


# ----- training -------------------------------------------------------------------------------------------
def _args(out_dir: str, *, epochs: float, lr: float, batch_size: int, seed: int, max_length: int | None,
          sft: bool, gradient_checkpointing: bool = False):
    import torch

    common = dict(output_dir=out_dir, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
                  learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
                  # weight decay would shrink the rows that must not move: it is 0, and the check after training
                  # enforces it bit for bit
                  weight_decay=0.0, seed=seed, data_seed=seed, logging_steps=10**6, save_strategy="no",
                  report_to=[], disable_tqdm=True, bf16=False, fp16=False, use_cpu=not torch.cuda.is_available(),
                  dataloader_num_workers=0, gradient_checkpointing=gradient_checkpointing)
    if sft:
        from trl import SFTConfig

        return SFTConfig(**common, max_length=max_length, completion_only_loss=True, packing=False)
    from transformers import TrainingArguments

    return TrainingArguments(**common, remove_unused_columns=False)


def _train_quietly(trainer):
    """Run ``trainer`` without transformers' per-step printing; the trainer (and its optimizer) is dropped after.
    Returns (train output, seconds)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    out = trainer.train()
    return out, time.perf_counter() - t0


def finetune_masked(model, mask: Mask, retain_examples: list[dict], tokenizer, *, epochs: float = 1.0,
                    lr: float = 2e-4, batch_size: int = 4, max_length: int = 256, seed: int = 0,
                    gradient_checkpointing: bool = False) -> dict:
    """Fine-tune ONLY the selected rows on the retain examples with TRL's SFTTrainer; everything else stays bit-identical.

    Every parameter is frozen except the ``lora_B`` tensors with a selected row; a gradient hook multiplies their
    gradient by the row mask, weight decay is 0, so Adam's moments and step stay exactly 0 on unselected entries.
    Raises ``RuntimeError`` if any unselected entry moved anyway.
    """
    import datasets
    import torch
    from datasets import Dataset
    from trl import SFTTrainer

    datasets.disable_progress_bars()
    if not retain_examples:
        raise ValueError("no retain examples to fine-tune on")
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items() if "lora_" in n}
    hooks = []
    for n, p in params.items():
        train = n in mask and bool(mask[n].any())
        p.requires_grad_(train)
        if train:
            m = mask[n].to(device=p.device, dtype=p.dtype).unsqueeze(1)
            hooks.append(p.register_hook(lambda g, m=m: g * m))
    tmp = tempfile.mkdtemp(prefix=".unlearn-")
    try:
        args = _args(tmp, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, max_length=max_length, sft=True,
                     gradient_checkpointing=gradient_checkpointing)
        out, seconds = _train_quietly(SFTTrainer(model=model, args=args,
                                                 train_dataset=Dataset.from_list(retain_examples),
                                                 processing_class=tokenizer))
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
        shutil.rmtree(tmp, ignore_errors=True)
    moved = []
    for n, old in before.items():
        new = params[n].detach()
        keep = ~mask[n].to(new.device) if n in mask else None
        if (keep is None and not torch.equal(new, old)) or (keep is not None and not torch.equal(new[keep], old[keep])):
            moved.append(n)
    if moved:
        raise RuntimeError(f"masked fine-tuning changed unselected LoRA entries: {moved[:3]}")
    return {"train_loss": float(out.training_loss), "steps": int(out.global_step), "seconds": seconds}


class _ForgetRetain:
    """Each forget example paired with a retain example drawn afresh per access (open-unlearning's anchoring)."""

    def __init__(self, forget: list[dict], retain: list[dict], ref_nll: list[float] | None, seed: int):
        self.forget, self.retain, self.ref_nll = forget, retain, ref_nll
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict:
        item = {"forget": self.forget[i], "ref_nll": self.ref_nll[i] if self.ref_nll else 0.0}
        if self.retain:
            item["retain"] = self.retain[self.rng.randrange(len(self.retain))]
        return item


def _make_trainer_class():
    import torch
    import torch.nn.functional as F
    from transformers import Trainer

    class UnlearnTrainer(Trainer):
        """``compute_loss`` of GA / GradDiff / NPO / NPO+RT (open-unlearning's definitions)."""

        def __init__(self, *a, method: str, beta: float, **kw):
            super().__init__(*a, **kw)
            self.method, self.beta = method, beta

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            nll_f, n_f = sequence_nll(model, inputs["forget"])
            if self.method == "ga" or self.method == "graddiff":
                loss = -(nll_f.sum() / n_f.sum())
            else:  # npo / npo_rt: logp = -summed NLL of a sequence; the reference's was computed up front
                log_ratio = -(nll_f - inputs["ref_nll"].to(nll_f))
                loss = -2.0 / self.beta * F.logsigmoid(-self.beta * log_ratio).mean()
            if self.method in ("graddiff", "npo_rt"):
                nll_r, n_r = sequence_nll(model, inputs["retain"])
                loss = loss + nll_r.sum() / n_r.sum()
            return (loss, None) if return_outputs else loss

    def collate(items: list[dict]) -> dict:
        pad_id = collate.pad_id
        out = {"forget": _pad([x["forget"] for x in items], pad_id),
               "ref_nll": torch.tensor([x["ref_nll"] for x in items], dtype=torch.float32)}
        if "retain" in items[0]:
            out["retain"] = _pad([x["retain"] for x in items], pad_id)
        return out

    return UnlearnTrainer, collate


def gradient_baseline(model, method: str, forget_examples: list[dict], retain_examples: list[dict], tokenizer, *,
                      epochs: float = 1.0, lr: float = 2e-4, batch_size: int = 4, max_length: int = 256,
                      beta: float = 0.1, seed: int = 0) -> dict:
    """Run GA / GradDiff / NPO / NPO+RT on every LoRA tensor of ``model`` (base frozen). One epoch = one pass
    over the forget set (each forget batch paired with a random retain batch where the method uses one)."""
    import torch

    if method not in ("ga", "graddiff", "npo", "npo_rt"):
        raise ValueError(f"gradient_baseline: method={method!r}")
    forget = [t for t in tokenize_examples(forget_examples, tokenizer, max_length) if t is not None]
    retain = [t for t in tokenize_examples(retain_examples, tokenizer, max_length) if t is not None]
    if not forget:
        raise ValueError("no forget example has a completion token within max_length")
    if method in ("graddiff", "npo_rt") and not retain:
        raise ValueError(f"{method} needs retain examples")
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    ref = None
    if method in ("npo", "npo_rt"):  # the reference model is this model before unlearning: fixed, so precomputed
        model.eval()
        dev = next(model.parameters()).device
        ref = []
        with torch.no_grad():
            for s in range(0, len(forget), batch_size):
                b = {k: v.to(dev) for k, v in _pad(forget[s:s + batch_size], tokenizer.pad_token_id).items()}
                ref.extend(sequence_nll(model, b)[0].tolist())
    for n, p in params.items():
        p.requires_grad_("lora_" in n)
    UnlearnTrainer, collate = _make_trainer_class()
    collate.pad_id = tokenizer.pad_token_id
    tmp = tempfile.mkdtemp(prefix=".unlearn-")
    try:
        args = _args(tmp, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, max_length=None, sft=False)
        out, seconds = _train_quietly(UnlearnTrainer(model=model, args=args, data_collator=collate, method=method,
                                                     train_dataset=_ForgetRetain(forget, retain, ref, seed), beta=beta))
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
        shutil.rmtree(tmp, ignore_errors=True)
    return {"train_loss": float(out.training_loss), "steps": int(out.global_step), "seconds": seconds}


# ----- the run-level entry point --------------------------------------------------------------------------
def served_adapter(run: Run, shard: int) -> dict:
    """The prefix adapter ``serving_plan`` serves for ``shard``, its tensors (from the block store) and its data."""
    from .deletion import serving_plan

    entry = serving_plan(run).get(shard)
    if entry is None:
        raise ValueError(f"shard {shard} serves no adapter (no surviving prefix); nothing to unlearn")
    prefix = tuple(entry["prefix"])
    store = run.store
    tensors, layers, trained, blocks = {}, [], set(), []
    for k in range(1, len(prefix) + 1):
        man = store.manifest(shard, prefix[:k])
        tensors.update(store.load_block(shard, prefix[:k]))
        layers.extend(man["layers"])
        trained.update(man["sample_ids"])
        blocks.append({"prefix": list(prefix[:k]), "sha256": man["sha256"], "slice_hashes": man["slice_hashes"]})
    return {**entry, "tensors": tensors, "layers": sorted(layers), "trained_ids": trained, "blocks": blocks}


def load_adapter_model(run: Run, tensors: dict, layers: list[int], precision: str | None = None):
    """The run's base with a trainable LoRA on ``layers`` holding ``tensors`` (PEFT saved key names)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from .models import load_base

    lc = run.config.lora
    base, tok = load_base(run.model_path, precision or run.config.model.precision, for_training=True)
    cfg = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, use_rslora=lc.rslora,
                     target_modules=list(lc.target_modules), layers_to_transform=list(layers),
                     layers_pattern="layers", bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    params = {saved_key(n): p for n, p in model.named_parameters() if "lora_" in n}
    if set(params) != set(tensors):
        raise RuntimeError("the adapter's tensors do not match the model's LoRA layout")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t.to(params[k].dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def write_adapter(run: Run, name: str, model, layers: list[int], manifest: dict) -> Path:
    """Save the model's LoRA tensors as a standard PEFT adapter under ``run_dir/unlearned/<name>/`` (atomic)."""
    from safetensors.torch import save_file

    final = run.dir / UNLEARNED_DIR / check_adapter_name(name)
    if final.exists():
        raise FileExistsError(f"{final} exists; adapter names are never reused")
    staging = staging_dir(final.parent, name)
    try:
        tensors = {saved_key(n): p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if "lora_" in n}
        save_file(dict(sorted(tensors.items())), str(staging / ADAPTER_FILE))
        (staging / ADAPTER_CONFIG).write_text(json.dumps(peft_lora_config(run.lora_dict(), layers, run.model_path),
                                                         indent=2, sort_keys=True))
        manifest = {**manifest, "name": name, "sha256": sha256_file(staging / ADAPTER_FILE)}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def commit_derived(run: Run, shard: int, source_blocks: list[dict], write):
    """Write an artifact derived from a served adapter (``write()``) only if its source blocks are still
    current; the check and the write hold the run's writer lock, so no deletion lands in between."""
    from . import exactness
    from .locking import writer_lock

    with writer_lock(run.dir):
        snap = run.snapshot()
        valid = exactness.valid_blocks(snap.blocks, snap.hashes)
        if not exactness.chain_current(shard, source_blocks, snap.blocks, valid):
            raise StaleSourceError(f"shard {shard}: the adapter it was derived from was superseded while it ran "
                                   "(a deletion landed); nothing written")
        return write()


class StaleSourceError(RuntimeError):
    pass


def unlearn(run_dir: str | Path, sample_ids: list[str], method: str, **kwargs) -> Path:
    """See :func:`_unlearn`. Holds the run lock as a writer: refuses while ``s3t serve`` serves the run."""
    from .locking import hold

    with hold(Run.open(run_dir).dir, "train"):
        return _unlearn(run_dir, sample_ids, method, **kwargs)


def _unlearn(run_dir: str | Path, sample_ids: list[str], method: str, *, shard: int | None = None,
             alpha: float = 0.3, variant: str = "mean", epochs: float = 1.0, lr: float | None = None,
             batch_size: int | None = None, beta: float = 0.1, topk_frac: float = 0.1, seed: int = 0,
             out_name: str | None = None, precision: str | None = None) -> Path:
    """Approximately unlearn ``sample_ids`` from the adapter a shard serves; save the result as a PEFT adapter.

    **This gives NO guarantee** that the samples' influence is gone (see the module docstring); use
    :func:`s3t_llm.deletion.apply_deletion` for exact unlearning. Nothing in the run (ledger, blocks, served
    adapters) is modified: the result is a new adapter under ``run_dir/unlearned/<name>/`` (``adapter_config.json``
    + ``adapter_model.safetensors`` with PEFT's key names + ``unlearn_manifest.json``), servable like any other
    (vLLM ``load_lora_adapter``).

    ``method``: ``del`` (localize + reset + fine-tune the reset rows on the retain set), ``del_random`` (the same
    with random rows), ``ga``, ``graddiff``, ``npo``, ``npo_rt``. ``shard`` defaults to the first id's shard; all
    ids must be in it and in the served adapter's training data. Retain set = the live samples of the adapter's
    slices minus the forget ids. ``lr``/``batch_size`` default to the run's ``train.*``; ``epochs`` counts passes
    over the retain set (DEL) or over the forget set (the gradient baselines).
    Raises ``UnknownSampleError`` for ids the ledger does not know. An id that is already deleted (exactly) is no
    longer in any served adapter, so there is nothing to unlearn for it (and its text is erased).
    """
    t_start = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"method={method!r}: use one of {METHODS}")
    if method.startswith("del"):
        _check_params(alpha, "random" if method == "del_random" else variant)
    run = Run.open(run_dir)
    if isinstance(sample_ids, (str, bytes)):
        raise ValueError("sample_ids must be a list of ids, not a single string")
    ids = [str(s) for s in sample_ids]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError("sample_ids must be a non-empty list without duplicates")
    with run.ledger() as led:
        cells = led.cell_of(DATASET, ids)  # UnknownSampleError for unknown ids
    shard = cells[ids[0]][0] if shard is None else int(shard)
    other = sorted(s for s, c in cells.items() if c[0] != shard)
    if other:
        raise ValueError(f"samples {other[:5]} are not in shard {shard}; unlearn one shard at a time")
    src = served_adapter(run, shard)
    unseen = sorted(set(ids) - src["trained_ids"])
    if unseen:
        raise ValueError(f"the adapter served for shard {shard} ({src['name']}) was not trained on {unseen[:5]}; "
                         "nothing to unlearn for them")
    cfg = run.config
    tpl = cfg.data.template
    forget_set, retain = set(ids), []
    forget_by_id = {}
    with run.ledger() as led:
        for sl in src["prefix"]:
            for sid, rec in led.slice_samples(DATASET, shard, sl):  # live: the served adapter trained on them
                if sid in forget_set:
                    forget_by_id[sid] = rec
            retain.extend(rec for sid, rec in led.slice_samples(DATASET, shard, sl) if sid not in forget_set)
    model, tok = load_adapter_model(run, src["tensors"], src["layers"], precision)
    forget_ex = [to_example(forget_by_id[s], tpl, tok) for s in ids]
    retain_ex = [to_example(r, tpl, tok) for r in retain]
    lr = lr if lr is not None else cfg.train.learning_rate
    bs = batch_size or cfg.train.batch_size
    ml = cfg.data.max_length
    report: dict = {}
    if method.startswith("del"):
        t0 = time.perf_counter()
        v = "random" if method == "del_random" else variant
        mask = localize(model, forget_ex, tok, alpha, v, max_length=ml, batch_size=bs, topk_frac=topk_frac,
                        seed=seed)
        report["localize_seconds"] = time.perf_counter() - t0
        report["reset"] = {**mask_stats(model, mask), "params_reset": reset(model, mask),
                           "to": "zero (PEFT init of lora_B)", "candidates": "lora_B rows"}
        report["reset"]["rows_per_module"] = {saved_key(n): int(m.sum()) for n, m in mask.items() if m.any()}
        report["train"] = finetune_masked(model, mask, retain_ex, tok, epochs=epochs, lr=lr, batch_size=bs,
                                          max_length=ml, seed=seed,
                                          gradient_checkpointing=cfg.train.gradient_checkpointing)
    else:
        report["train"] = gradient_baseline(model, method, forget_ex, retain_ex, tok, epochs=epochs, lr=lr,
                                            batch_size=bs, max_length=ml, beta=beta, seed=seed)
    params = {"alpha": alpha, "variant": variant if method == "del" else None, "topk_frac": topk_frac,
              "epochs": epochs, "lr": lr, "batch_size": bs, "beta": beta if method.startswith("npo") else None,
              "seed": seed}
    if out_name is None:
        digest = hashlib.sha256(json.dumps([sorted(ids), method, params, src["blocks"]]).encode()).hexdigest()[:10]
        out_name = f"{cfg.name}-s{shard}-{method.replace('_', '-')}-{digest}"
    manifest = {
        "method": method, "guarantee": "none (approximate unlearning)", "params": params,
        "forget_ids": ids, "n_forget": len(ids), "n_retain": len(retain_ex), "shard": shard,
        "source_adapter": {"name": src["name"], "prefix": src["prefix"], "blocks": src["blocks"]},
        "layers": src["layers"], "base_model": run.model_path, "base_fingerprint": run.info["base_fingerprint"],
        **report, "seconds": time.perf_counter() - t_start, "created_at": time.time(),
    }
    path = commit_derived(run, shard, src["blocks"],
                          lambda: write_adapter(run, out_name, model, src["layers"], manifest))
    logger.info("%s: unlearned %d samples of shard %d with %s in %.1fs -> %s", cfg.name, len(ids), shard, method,
                manifest["seconds"], path)
    return path
