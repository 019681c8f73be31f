"""Stage training: for each shard and sequence, a stack of LoRA blocks trained one stage at a time.

Stage k of sequence pi trains ONLY block k's LoRA tensors (a TRL ``SFTTrainer`` with a fresh optimizer)
on the live samples of slices pi_1..pi_k, with blocks 1..k-1 loaded frozen from the store and blocks
k+1..L zeroed (a zero LoRA B matrix adds exactly 0.0, so they are absent, not approximately absent).
The stage's result is a deterministic function of (seed, shard, prefix, the prefix's data, blocks 1..k-1):
it cannot depend on later slices, and a resumed run reproduces it.

Each sample is tokenised once per ``StageTrainer`` (TRL's own preparation code, run once on the samples not yet
seen; the stages' trainers get the token ids with ``skip_prepare_dataset``), and with
``train.cache_activations`` a stage runs from cached hidden states entering its block's lowest layer
(``s3t_llm.activation_cache``): the frozen base's when only zero blocks lie below (top-down), the base's through
the frozen blocks 1..k-1 when they lie below (``s3t.block_order: bottom_up``; keyed by their digest). Both caches live in memory, keyed by content, and die with the
trainer (``train_run`` drops them when it returns and whenever the ledger's slice hashes change).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import exactness
from .activation_cache import (ActivationCache, base_boundary, block_digest, boundary, cached_forward, check_zero,
                               highest_boundary, lineage_of, lower_blocks, zero_top)
from .adapters import layer_of
from .prompts import to_example
from .locking import hold, writer_lock
from .run import DATASET, Run, StaleStageError

__all__ = ["StageTrainer", "StaleStageError", "stage_plan", "train_run", "training_env"]

logger = logging.getLogger(__name__)


# TRL's fused LM head (``SFTTrainer`` computes the loss with ``fused_lm_head=True``) projects only the positions
# with a label on Triton devices, and every position elsewhere, so that XLA/Neuron tile shapes stay fixed. In
# eager CPU PyTorch nothing recompiles, and the prompt and padding positions' projections (SmolLM2: 576 x 49152
# per token, about 8 decoder layers' worth, forward and backward) are pure waste: the masked positions' outputs
# are zeroed anyway, so the loss and every gradient are the same sums over the same labelled positions (float
# rounding aside: a different tiling of the same rows). COMPACT_LM_HEAD = False restores TRL's CPU behaviour.
COMPACT_LM_HEAD = True


@contextlib.contextmanager
def _compact_lm_head():
    """While TRL trains: its fused LM head scores only the labelled positions on CPU too (see COMPACT_LM_HEAD)."""
    try:
        import trl.trainer.utils as tu
    except ImportError:  # pragma: no cover
        yield
        return
    orig = getattr(tu, "_use_triton", None)
    if not COMPACT_LM_HEAD or orig is None:   # an older/newer TRL without the switch: leave it alone
        yield
        return
    # Only the `compact` decision of add_fused_lm_head reads this name in trl.trainer.utils; the kernels module
    # keeps its own reference, so the CPU kernels still run on CPU.
    tu._use_triton = lambda device: device.type == "cpu" or orig(device)
    try:
        yield
    finally:
        tu._use_triton = orig


def _time_phases(trainer) -> dict:
    """Seconds of ``train()`` by phase, filled while it runs (CPU wall clock: on a GPU, asynchronous kernels land
    in whichever phase synchronises next): ``forward_s`` (the trainer's ``compute_loss``: the model's forward and
    TRL's loss and token metrics), ``backward_s`` (``accelerator.backward``), ``optimizer_s`` (from the end of an
    optimizer step's last backward to ``on_step_end``: gradient clipping, the optimizer and scheduler steps,
    zero_grad; under DeepSpeed the engine steps inside ``backward``, so it counts there); the rest of ``train()``
    is data loading, logging and the Trainer's own set-up. The wraps are attributes of this trainer only (its
    Accelerator is its own)."""
    from transformers import TrainerCallback

    t = {"forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
    last_backward_end = [None]

    def timed(fn, key):
        def call(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                now = time.perf_counter()
                t[key] += now - t0
                if key == "backward_s":
                    last_backward_end[0] = now
        return call

    trainer.compute_loss = timed(trainer.compute_loss, "forward_s")
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward_s")

    class _Optim(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):  # after the optimizer step (substeps: on_substep_end)
            if last_backward_end[0] is not None:
                t["optimizer_s"] += time.perf_counter() - last_backward_end[0]
                last_backward_end[0] = None

    trainer.add_callback(_Optim())
    return t


def stage_seed(seed: int, shard: int, prefix) -> int:
    h = hashlib.sha256(f"s3t-stage:{seed}:{shard}:{'-'.join(map(str, prefix))}".encode()).hexdigest()
    return int(h[:8], 16) % (2**31 - 1)


# ----- several processes (accelerate launch / torchrun: DDP or DeepSpeed inside a stage) -------------------
# Every rank runs the same stage loop and joins every stage's collectives. Rank 0 alone decides (which stages to
# train, from the store and the ledger), writes (run.json, the ledger registration, the blocks) and takes the
# per-block lock; it broadcasts each decision, so all ranks make the same sequence of train / skip choices and no
# rank ever waits on a lock that a rank inside a collective holds. Single process: no broadcast, no barrier.
_RANK_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
_WORLD_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def _env_int(names, default: int) -> int:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return default


def world_size() -> int:
    """How many processes train each stage together (1 without a distributed launcher)."""
    return _env_int(_WORLD_ENV, 1)


def is_main_process() -> bool:
    return _env_int(_RANK_ENV, 0) == 0


def _dist_state():
    """accelerate's process state, initialised as transformers' Trainer will initialise it (gloo on a CPU
    machine, as ``TrainingArguments(use_cpu=True)`` does; the GPU backend otherwise), so the process group made
    here is the one the stages' trainers reuse."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    state = PartialState(cpu=cpu)
    if state.num_processes != world_size():
        raise RuntimeError(f"WORLD_SIZE={world_size()} but accelerate set up {state.num_processes} process(es) "
                           f"({state.distributed_type}); launch with `accelerate launch` or `torchrun`")
    return state


def _wait_for_everyone() -> None:
    if world_size() > 1:
        _dist_state().wait_for_everyone()


def broadcast_from_main(obj):
    """``obj`` as rank 0 has it, on every rank (a collective: every rank must call it; identity in one process)."""
    if world_size() == 1:
        return obj
    from accelerate.utils import broadcast_object_list

    _dist_state()
    box = [obj if is_main_process() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main_then_broadcast(fn, what: str):
    """Run ``fn()`` on rank 0 only and return its result on every rank; an exception on rank 0 is raised on
    every rank (the same exception where it pickles, so the CLI reports it the same way; else a RuntimeError
    naming it), so no rank is left waiting in a collective."""
    if world_size() == 1:
        return fn()
    import pickle

    res, err, sent = None, None, None
    if is_main_process():
        try:
            res = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the others have heard of it
            err = e
            try:
                sent = pickle.loads(pickle.dumps(e))
            except Exception:  # noqa: BLE001 - a message is enough
                sent = RuntimeError(f"{what} failed on rank 0: {type(e).__name__}: {e}")
    sent = broadcast_from_main(sent)
    if err is not None:
        raise err
    if sent is not None:
        raise sent
    return broadcast_from_main(res)


@contextlib.contextmanager
def _block_lock(path: Path):
    """An exclusive lock per block so parallel jobs never train the same block twice (one process's view)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _stage_lock(path: Path, poll_s: float = 1.0):
    """The block lock for a stage, taken by rank 0 only and held while every rank trains the stage.

    One process: a blocking ``flock``. Several: rank 0 tries it without waiting and broadcasts whether it got
    it; while another job holds it, all ranks sleep and retry together, so no rank sits in a collective for
    longer than a poll (a collective's timeout never fires on a long wait for another job)."""
    if world_size() == 1:
        with _block_lock(path):
            yield
        return
    f = None
    try:
        while True:
            got = False
            if is_main_process():
                path.parent.mkdir(parents=True, exist_ok=True)
                f = f or open(path, "w")
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    got = True
                except BlockingIOError:
                    got = False
            if broadcast_from_main(got):
                break
            time.sleep(poll_s)
        yield
    finally:
        if f is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)
            f.close()


class StageTrainer:
    """Holds one base model with LoRA on every block's layers and trains stages on it."""

    def __init__(self, run: Run, precision: str | None = None):
        from peft import LoraConfig, get_peft_model

        from .models import load_base

        self.run = run
        cfg = run.config
        self.precision = precision or cfg.model.precision
        base, self.tokenizer = load_base(run.model_path, self.precision, for_training=True)
        all_layers = sorted(i for b in run.blocks for i in b)
        lc = cfg.lora
        self.lora_config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, use_rslora=lc.rslora,
                                      target_modules=list(lc.target_modules), layers_to_transform=all_layers,
                                      layers_pattern="layers", bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, self.lora_config)
        layer_to_block = {i: b for b, layers in enumerate(run.blocks, start=1) for i in layers}
        # Block membership by parsed layer index (never by substring match on names).
        self.block_params: dict[int, list[tuple[str, object]]] = {b: [] for b in range(1, len(run.blocks) + 1)}
        self.lora_modules: dict[int, list[tuple[str, object]]] = {b: [] for b in self.block_params}
        for name, p in self.model.named_parameters():
            p.requires_grad_(False)
            if "lora_" in name:
                self.block_params[layer_to_block[layer_of(name)]].append((name, p))
        from peft.tuners.lora import LoraLayer

        for name, mod in self.model.named_modules():
            if isinstance(mod, LoraLayer):
                self.lora_modules[layer_to_block[layer_of(name)]].append((name, mod))
        if any(not v for v in self.block_params.values()):
            raise RuntimeError("a block has no LoRA parameters; check lora.target_modules and the block layout")
        import torch

        if cfg.train.optim.startswith("paged_") and not torch.cuda.is_available():
            raise RuntimeError(f"train.optim={cfg.train.optim!r} (a bitsandbytes paged optimizer) needs CUDA; "
                               "use train.optim=adamw_torch_fused on a CPU machine")
        # Tokenise once: content key of a prompt/completion example -> (input_ids, labels), or None when TRL
        # would drop it (no completion token within data.max_length). In memory; dies with the trainer.
        self._tokens: dict[str, tuple[list[int], list[int]] | None] = {}
        self.pretokenize = True  # False: the per-stage TRL preparation of before (kept for the equality test)
        # The disk tier lives in the run directory (erasure and `s3t verify` cover it there); a Ray worker,
        # which never opens the run directory, keeps its cache in memory only.
        on_disk = isinstance(run, Run) and cfg.train.activation_cache_disk_gb > 0
        self.act_cache = (ActivationCache(run.info.get("base_fingerprint", run.model_path) + ":" + self.precision,
                                          int(cfg.train.activation_cache_gb * 2**30),
                                          disk_limit_bytes=int(cfg.train.activation_cache_disk_gb * 2**30),
                                          disk_root=run.dir if on_disk else None,
                                          lock=writer_lock(run.dir) if on_disk else None,
                                          current=self._cache_group_current if on_disk else None)
                          if cfg.train.cache_activations else None)
        self.last_fit: dict = {}

    def _cache_group_current(self, name: str) -> bool:
        """Whether a disk-tier group may be created now: its slice and lower block are current in the ledger and
        the store (read under the run's writer lock, which the cache holds while it asks)."""
        from .activation_cache import group_problem

        hashes, blocks = self.run.slice_hashes(), self.run.block_manifests()
        return group_problem(name, hashes, blocks, exactness.valid_blocks(blocks, hashes)) is None

    def clear_caches(self) -> None:
        """Drop every cached token list and hidden state (they are data derived from samples)."""
        self._tokens.clear()
        if self.act_cache is not None:
            self.act_cache.clear()

    # ----- adapter state --------------------------------------------------------------------------
    @staticmethod
    def _saved_key(param_name: str) -> str:
        # PEFT's saved-adapter naming: the adapter name ("default") is dropped.
        return param_name.replace(".default.", ".")

    def block_tensors(self, block: int) -> dict:
        return {self._saved_key(n): p.detach().clone().cpu() for n, p in self.block_params[block]}

    def set_stack(self, shard: int, prefix: tuple[int, ...], *, fresh_top: bool, seed: int = 0) -> None:
        """Load blocks 1..k-1 (k = len(prefix)) from the store, zero blocks > k, and set block k.

        ``fresh_top``: initialise block k as PEFT does (A random under ``seed``, B = 0) for training;
        otherwise load it from the store too (for evaluation of a finished prefix).
        """
        import torch

        store = self.run.store
        k = len(prefix)
        with torch.no_grad():
            for b in self.block_params:
                if b < k or (b == k and not fresh_top):
                    saved = store.load_block(shard, prefix[:b])
                    params = dict(self.block_params[b])
                    names = {self._saved_key(n): n for n in params}
                    if set(saved) != set(names):
                        raise RuntimeError(f"stored block {b} of shard {shard} does not match the model's LoRA layout")
                    for key, t in saved.items():
                        params[names[key]].copy_(t.to(params[names[key]].dtype))
                elif b == k:
                    torch.manual_seed(seed)
                    for _, mod in sorted(self.lora_modules[b], key=lambda x: x[0]):
                        mod.reset_lora_parameters("default", True)
                else:
                    for _, p in self.block_params[b]:
                        p.zero_()

    # ----- one stage ------------------------------------------------------------------------------
    def stage_examples(self, shard: int, prefix, *, by_slice: bool = False):
        """``(examples, slice hashes, sample ids)`` of the live samples of ``prefix``'s slices, slice by slice in
        prefix order, each slice in ledger order; ``by_slice``: also ``[(slice, number of its examples)]`` in that
        order (the activation cache fills per slice)."""
        with self.run.ledger() as led:
            hashes = {str(sl): led.slice_hash(DATASET, shard, sl) for sl in prefix}
            examples, ids, counts = [], [], []
            for sl in prefix:
                n0 = len(examples)
                for sid, rec in led.slice_samples(DATASET, shard, sl):
                    examples.append(to_example(rec, self.run.config.data.template, self.tokenizer))
                    ids.append(sid)
                counts.append((int(sl), len(examples) - n0))
        return (examples, hashes, ids, counts) if by_slice else (examples, hashes, ids)

    def _sft_args(self, tmp: Path, seed: int, **extra):
        import torch
        from trl import SFTConfig

        cfg = self.run.config
        t = cfg.train
        return SFTConfig(
            output_dir=str(tmp), num_train_epochs=t.epochs, max_steps=t.max_steps,
            per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler,
            warmup_steps=t.warmup_ratio,  # float < 1: a ratio (transformers v5)
            weight_decay=t.weight_decay, optim=t.optim, max_grad_norm=t.max_grad_norm,
            seed=seed, data_seed=seed, logging_steps=t.logging_steps,
            save_strategy="no", report_to=[], disable_tqdm=True, max_length=cfg.data.max_length,
            gradient_checkpointing=t.gradient_checkpointing, bf16=False, fp16=False,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            completion_only_loss=True, packing=False, **extra,
        )

    @staticmethod
    def _example_key(ex: dict) -> str:
        return hashlib.sha256(json.dumps(ex, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def tokenize(self, examples: list[dict]) -> list[tuple[list[int], list[int]] | None]:
        """``(input_ids, labels)`` of each example exactly as TRL's SFTTrainer prepares it (prompt-completion,
        EOS appended, completion-only labels, truncated to data.max_length; None where TRL drops it), each
        distinct example tokenised once per trainer: the new ones go through TRL's own preparation code."""
        from types import SimpleNamespace

        import datasets
        from datasets import Dataset
        from trl import SFTTrainer

        keys = [self._example_key(ex) for ex in examples]
        new = {}
        for key, ex in zip(keys, examples):
            if key not in self._tokens:
                new.setdefault(key, ex)
        if new:
            datasets.disable_progress_bars()
            order = list(new)
            ds = Dataset.from_list([dict(new[key], _s3t_row=i) for i, key in enumerate(order)])
            with tempfile.TemporaryDirectory(prefix=f".tok-pid{os.getpid()}-", dir=self.run.dir) as tmp:
                args = self._sft_args(Path(tmp), 0)
                # The preparation method reads only these attributes of the trainer (TRL 1.16); with
                # assistant_only_loss off, TRL's chat_template attribute is None.
                shim = SimpleNamespace(_tokenizer=self.tokenizer, completion_only_loss=True, chat_template=None,
                                       _is_vision_dataset=False, args=args, _signature_columns=None)
                out = SFTTrainer._prepare_dataset(shim, ds, self.tokenizer, args, False, None, "train")
            for key in order:
                self._tokens[key] = None
            for row in out:
                self._tokens[order[row["_s3t_row"]]] = (list(row["input_ids"]), list(row["labels"]))
        return [self._tokens[key] for key in keys]

    def _fit(self, examples: list[dict], tmp: Path, seed: int, what: str, cache_layer: int | None = None,
             cache_groups: list | None = None, cache_also: tuple[int, ...] = (), cache_lineage: str = "base"):
        """One TRL SFT run on ``examples`` over the parameters that require grad; a fresh optimizer that dies
        with the trainer. ``cache_layer``: run the decoder from that layer up on cached hidden states (the
        caller has checked that everything below it is the frozen base); ``cache_groups``: with it,
        ``[(cell, number of examples, fill-to layer)]``, ``examples`` cut into its slices (cell = (shard, slice,
        slice hash[, digest of the frozen blocks below])), in order: the cache fills each slice in its own
        canonical batches; ``cache_also``: other stages' base boundaries to capture on the way. Returns (train output,
        examples used, tokens per epoch, seconds of ``train()``); timings in ``self.last_fit``."""
        import datasets
        from datasets import Dataset
        from transformers import PrinterCallback
        from trl import SFTTrainer

        datasets.disable_progress_bars()
        cfg = self.run.config
        t_setup = time.perf_counter()
        fill_s = 0.0
        if self.pretokenize:
            rows = [r for r in self.tokenize(examples) if r is not None]
            args = self._sft_args(tmp, seed, dataset_kwargs={"skip_prepare_dataset": True})
            train_dataset = Dataset.from_list([{"input_ids": ids, "labels": lab} for ids, lab in rows])
        else:
            args = self._sft_args(tmp, seed)
            train_dataset = Dataset.from_list(examples)
        trainer = SFTTrainer(model=self.model, args=args, train_dataset=train_dataset,
                             processing_class=self.tokenizer)
        trainer.remove_callback(PrinterCallback)  # our own progress bar reports each stage
        n_tokens = int(sum(len(x) for x in trainer.train_dataset["input_ids"]))
        # TRL drops examples whose completion is entirely cut off by max_length: say so.
        n_used = len(trainer.train_dataset)
        if n_used < len(examples):
            logger.warning("%s: %d of %d examples have no completion token within data.max_length=%d and are "
                           "skipped", what, len(examples) - n_used, len(examples), cfg.data.max_length)
        ctx = contextlib.nullcontext()
        used_layer = None
        if cache_layer is not None and self.act_cache is not None:
            t0 = time.perf_counter()
            if cache_groups is None or sum(n for _, n, _ in cache_groups) != len(examples):
                raise ValueError("a cached stage needs its examples grouped by slice (cache_groups)")
            toks = self.tokenize(examples)  # the same token ids the dataset holds (looked up, not recomputed)
            groups, fill_to, i = [], {}, 0
            for cell, n, top in cache_groups:
                groups.append((cell, [t[0] for t in toks[i:i + n] if t is not None]))
                fill_to[cell] = top
                i += n
            if sum(len(rows) for _, rows in groups) != n_used:
                raise RuntimeError(f"{what}: the cache's slice groups do not hold the stage's {n_used} examples")
            pad_id = getattr(trainer.data_collator, "pad_token_id", None)
            if pad_id is None:
                pad_id = self.tokenizer.pad_token_id
            if self.act_cache.prepare(self.model, cache_layer, groups, also=cache_also, batch_size=cfg.train.batch_size,
                                      pad_id=int(pad_id or 0), fill_to=fill_to, lineage=cache_lineage):
                used_layer = cache_layer
                ctx = cached_forward(self.model, self.act_cache, cache_layer, self.lora_modules, self.run.blocks,
                                     cfg.train.gradient_checkpointing)
            fill_s = time.perf_counter() - t0
        setup_s = time.perf_counter() - t_setup - fill_s
        phases = _time_phases(trainer)
        t0 = time.perf_counter()
        with ctx, _compact_lm_head():
            out = trainer.train()
        seconds = time.perf_counter() - t0
        self.last_fit = {"setup_s": setup_s, "cache_fill_s": fill_s, "train_s": seconds, "cache_layer": used_layer,
                         "log": [dict(x) for x in trainer.state.log_history],
                         **{k: round(v, 4) for k, v in phases.items()}}
        del trainer  # drops the optimizer state: it never outlives the stage
        return out, n_used, n_tokens, seconds

    def train_full(self, out_dir: str | Path) -> dict:
        """The reference S3T is compared with: one LoRA adapter on the same layers, rank and hyperparameters,
        trained on all live samples of every shard at once (every block trainable). Saved as a PEFT adapter
        directory with ``reference.json``; it is an experiment artifact, never served by ``s3t serve``."""
        import torch

        run, cfg = self.run, self.run.config
        out_dir = Path(out_dir)
        seed = stage_seed(cfg.train.seed, -1, ())
        examples, ids, hashes = [], [], {}
        with run.ledger() as led:
            for shard in range(run.shards):
                for sl in range(cfg.s3t.slices):
                    hashes[f"{shard}/{sl}"] = led.slice_hash(DATASET, shard, sl)
                    for sid, rec in led.slice_samples(DATASET, shard, sl):
                        examples.append(to_example(rec, cfg.data.template, self.tokenizer))
                        ids.append(sid)
        torch.manual_seed(seed)
        with torch.no_grad():
            for b in sorted(self.lora_modules):
                for _, mod in sorted(self.lora_modules[b], key=lambda x: x[0]):
                    mod.reset_lora_parameters("default", True)
        for ps in self.block_params.values():
            for _, p in ps:
                p.requires_grad_(True)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".trainer-pid{os.getpid()}-", dir=out_dir.parent))
        try:
            out, n_used, n_tokens, seconds = self._fit(examples, tmp, seed, "full fine-tune")
            staging = tmp / "adapter"
            self.model.save_pretrained(str(staging))
            info = {"kind": "full_finetune_reference", "n_samples": len(examples), "n_used": n_used,
                    "sample_ids": ids, "slice_hashes": hashes, "base_model": run.model_path,
                    "layers": sorted(i for b in run.blocks for i in b), "lora": run.lora_dict(),
                    "train": cfg.to_dict()["train"], "train_loss": float(out.training_loss),
                    "steps": int(out.global_step), "tokens": n_tokens * max(1, round(cfg.train.epochs)),
                    "seconds": seconds}
            (staging / "reference.json").write_text(json.dumps(info, indent=1))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            staging.replace(out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for ps in self.block_params.values():
            for _, p in ps:
                p.requires_grad_(False)
        return info

    def train_stage(self, shard: int, prefix: tuple[int, ...], *, verify_frozen: bool = True) -> dict:
        """Train block len(prefix) of ``shard`` on the cumulative data of ``prefix``; store it; return its manifest."""
        import torch

        run, cfg = self.run, self.run.config
        prefix = tuple(int(x) for x in prefix)
        k = len(prefix)
        seed = stage_seed(cfg.train.seed, shard, prefix)
        examples, hashes, ids, counts = self.stage_examples(shard, prefix, by_slice=True)
        if not examples:
            raise RuntimeError(f"shard {shard} prefix {prefix} has no live samples to train on")
        parent_sha = run.store.manifest(shard, prefix[:-1])["sha256"] if k > 1 else None
        self.set_stack(shard, prefix, fresh_top=True, seed=seed)
        if k > 1 and run.store.manifest(shard, prefix[:-1])["sha256"] != parent_sha:
            raise StaleStageError(f"the parent block of shard {shard} prefix {prefix} changed while it was loaded")
        for b, params in self.block_params.items():
            for _, p in params:
                p.requires_grad_(b == k)
        frozen_before = {n: p.detach().clone() for b, ps in self.block_params.items() if b != k for n, p in ps}

        # Bottom-up: the trained blocks below block k are fixed features at stage k and run without LoRA dropout
        # (in the cached and the uncached path alike; see s3t_llm/activation_cache.py). Top-down runs keep the
        # dropout of their frozen blocks (all above the trained one), as they were trained.
        lower = lower_blocks(run.blocks, k)
        no_dropout = lower if getattr(run, "block_order", "top_down") == "bottom_up" else []
        cache_layer, cache_groups, cache_also = None, None, ()
        cache_lineage = lineage_of(prefix[:-1] if lower else (), parent_sha)  # names the cache's disk groups
        if self.act_cache is not None:
            cache_layer = boundary(run.blocks, k)
            live = [n for b in lower if b not in no_dropout for n, m in self.lora_modules[b]
                    if getattr(m.lora_dropout["default"], "p", 0.0) > 0]
            if cache_layer is not None and live:
                # A trained block below the boundary whose dropout is active in training (an explicit layout of
                # a top-down run): its output is random per step, so no cached state can stand for it.
                logger.info("shard %d prefix %s: trained blocks with LoRA dropout lie below block %d; training "
                            "it uncached", shard, prefix, k)
                cache_layer = None
            if cache_layer is not None:
                check_zero(self.block_params, k, run.blocks, cache_layer)  # below it: zero or frozen lower blocks
                if lower:
                    # Entries computed through the frozen blocks 1..k-1: keyed by their digest, filled at the
                    # boundary only (no other stage's boundary has the same blocks below it).
                    digest = block_digest(self.block_params, lower)
                    cache_groups = [((shard, sl, hashes[str(sl)], digest), n, cache_layer) for sl, n in counts]
                else:
                    # Each slice is filled once, up to the highest boundary the plan needs it at, but never above
                    # a layer with a non-zero LoRA block below it (read from the tensors now); a cost hint only.
                    ztop = zero_top(self.block_params, run.blocks)
                    cache_groups = [((shard, sl, hashes[str(sl)]), n,
                                     max(cache_layer, min(ztop, highest_boundary(run.blocks, run.sequences, sl,
                                                                                 cache_layer))))
                                    for sl, n in counts]
                    cache_also = tuple(x for x in (base_boundary(run.blocks, j)
                                                   for j in range(1, len(run.blocks) + 1)) if x is not None)
        tmp = Path(tempfile.mkdtemp(prefix=f".trainer-pid{os.getpid()}-", dir=run.dir))
        saved_dropout = []
        try:
            import torch.nn as nn

            for b in no_dropout:
                for _, mod in self.lora_modules[b]:
                    saved_dropout.append((mod, mod.lora_dropout["default"]))
                    mod.lora_dropout["default"] = nn.Identity()
            out, n_used, n_tokens, seconds = self._fit(examples, tmp, seed, f"shard {shard} prefix {prefix}",
                                                       cache_layer=cache_layer, cache_groups=cache_groups,
                                                       cache_also=cache_also, cache_lineage=cache_lineage)
        finally:
            for mod, drop in saved_dropout:
                mod.lora_dropout["default"] = drop
            shutil.rmtree(tmp, ignore_errors=True)

        if verify_frozen:
            # The invariant of exact unlearning: nothing but block k moved.
            moved = [n for b, ps in self.block_params.items() if b != k for n, p in ps
                     if not torch.equal(p.detach(), frozen_before[n])]
            if moved:
                raise RuntimeError(f"stage {k} changed frozen LoRA tensors: {moved[:3]}")
        for _, p in self.block_params[k]:
            p.requires_grad_(False)

        # A deletion that arrived during training invalidates what was just trained: Run.write_block checks
        # the slice hashes and the parent's digest again, under the writer lock, and refuses a stale stage.
        lc = cfg.lora
        manifest = {
            "block": k, "layers": run.blocks[k - 1], "slices": list(prefix), "slice_hashes": hashes,
            "n_samples": len(examples), "n_used": n_used, "sample_ids": ids,
            "base_model": run.model_path, "base_fingerprint": run.info["base_fingerprint"],
            "precision": self.precision,
            "lora": {"r": lc.r, "alpha": lc.alpha, "rslora": lc.rslora, "dropout": lc.dropout,
                     "target_modules": list(lc.target_modules)},
            "seed": seed, "train_loss": float(out.training_loss), "steps": int(out.global_step),
            "tokens": n_tokens * max(1, round(cfg.train.epochs)), "seconds": seconds,
            "parent_sha256": parent_sha, "env": training_env(),
            # The layer the stage ran from on cached base hidden states (None: the whole decoder ran).
            "activation_cache_layer": self.last_fit.get("cache_layer"),
            "setup_seconds": round(self.last_fit.get("setup_s", 0.0), 3),
            "cache_fill_seconds": round(self.last_fit.get("cache_fill_s", 0.0), 3),
        }
        if is_main_process():
            manifest = run.write_block(shard, prefix, self.block_tensors(k), manifest)
        _wait_for_everyone()
        return manifest


def training_env() -> dict:
    """What a bit-for-bit replay of a stage needs to match (recorded in every block manifest)."""
    import peft
    import torch
    import transformers
    import trl

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "threads": torch.get_num_threads(), "device": dev}


def stage_plan(run: Run, shards: list[int] | None = None, sequences: list[int] | None = None):
    """The (shard, prefix) stages to train, in order: each sequence's prefixes, shared prefixes once."""
    seen, out = set(), []
    for s in shards if shards is not None else range(run.shards):
        for qi, seq in enumerate(run.sequences):
            if sequences is not None and qi not in sequences:
                continue
            for k in range(1, len(seq) + 1):
                key = (s, tuple(seq[:k]))
                if key not in seen:
                    seen.add(key)
                    out.append(key)
    return out


def train_run(run: Run, *, shards: list[int] | None = None, sequences: list[int] | None = None,
              precision: str | None = None, progress: bool = True) -> dict:
    """Train every missing or stale block of ``run``; returns a summary.

    Resumable: a finished block (its manifest is written last, atomically) whose slices are unchanged is
    kept; anything else is (re)trained from the first unfinished stage.
    """
    with hold(run.dir, "train"):
        return _train_run(run, shards=shards, sequences=sequences, precision=precision, progress=progress)


def _train_run(run: Run, *, shards, sequences, precision, progress) -> dict:
    def plan_on_main():
        n_clean = run.store.clean_staging()
        if n_clean:
            logger.info("removed %d partial artifacts from an interrupted run", n_clean)
        plan = stage_plan(run, shards, sequences)
        valid = exactness.valid_blocks(run.block_manifests(), run.slice_hashes())
        return plan, [(s, p) for s, p in plan if (s, p) not in valid]

    # Several processes: rank 0 cleans and plans, every rank gets the same plan (and so builds a trainer or not).
    plan, todo = on_main_then_broadcast(plan_on_main, "planning the stages")
    summary = {"stages_total": len(plan), "stages_reused": len(plan) - len(todo), "stages_trained": 0,
               "tokens": 0, "seconds": 0.0, "blocks": []}
    if not todo:
        return summary
    trainer = StageTrainer(run, precision)
    try:
        out = _train_stages(run, trainer, todo, summary, progress)
        if trainer.act_cache is not None:
            out["activation_cache"] = dict(trainer.act_cache.stats)
        return out
    finally:
        trainer.clear_caches()  # token ids and hidden states never outlive the run's training


def _train_stages(run: Run, trainer: StageTrainer, todo, summary: dict, progress: bool) -> dict:
    from tqdm.auto import tqdm

    seen_hashes = None
    bar = tqdm(todo, desc="S3T stages", unit="stage", disable=not progress or not is_main_process())
    for shard, prefix in bar:
        bar.set_postfix_str(f"shard {shard} prefix {'-'.join(map(str, prefix))}")
        lock = run.store.blocks_dir / f"shard{shard}" / f".lock-{'-'.join(map(str, prefix))}"
        # Rank 0 holds the block lock while all ranks train the stage (the others never take it).
        with _stage_lock(lock):
            action, hashes = on_main_then_broadcast(lambda: _decide_stage(run, shard, prefix),
                                                    f"deciding shard {shard} prefix {prefix}")
            if seen_hashes is not None and hashes != seen_hashes:
                trainer.clear_caches()  # a deletion landed: drop every cached token list and hidden state
            seen_hashes = hashes
            if action == "valid":  # another job trained it while we waited for the lock
                continue
            if action == "parent-invalid":
                if is_main_process():
                    logger.warning("skipping shard %d prefix %s: its parent block is not valid", shard, prefix)
                continue
            man = trainer.train_stage(shard, prefix)  # rank 0 writes the block; all ranks meet at a barrier
            if world_size() > 1:
                man = _agree_on_stage(run, shard, prefix, man)
        summary["stages_trained"] += 1
        summary["tokens"] += man["tokens"]
        summary["seconds"] += man["seconds"]
        lf = trainer.last_fit
        summary["blocks"].append({"shard": shard, "prefix": list(prefix), "loss": man["train_loss"],
                                  "seconds": round(man["seconds"], 2), "setup_s": round(lf.get("setup_s", 0.0), 3),
                                  "cache_fill_s": round(lf.get("cache_fill_s", 0.0), 3),
                                  "cache_layer": lf.get("cache_layer"),
                                  **{k: lf[k] for k in ("forward_s", "backward_s", "optimizer_s") if k in lf}})
        bar.set_postfix_str(f"shard {shard} prefix {'-'.join(map(str, prefix))} loss {man['train_loss']:.3f}")
    return summary


def _decide_stage(run: Run, shard: int, prefix) -> tuple[str, dict]:
    """Under the block lock (rank 0): "valid" (already trained, e.g. by another job while we waited),
    "parent-invalid" (skip it) or "train"; with the ledger's slice hashes it was decided on."""
    hashes = run.slice_hashes()
    valid = exactness.valid_blocks(run.block_manifests(), hashes)
    if (shard, prefix) in valid:
        return "valid", hashes
    if len(prefix) > 1 and (shard, prefix[:-1]) not in valid:
        return "parent-invalid", hashes
    return "train", hashes


def _stage_inputs_digest(man: dict) -> str:
    keys = ("slices", "slice_hashes", "sample_ids", "n_used", "seed", "parent_sha256", "base_fingerprint", "precision")
    return hashlib.sha256(json.dumps({k: man.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()


def _agree_on_stage(run: Run, shard: int, prefix, man: dict) -> dict:
    """After a stage on several ranks: check that every rank trained on the same inputs (samples, slice hashes,
    parent digest, seed); if not, rank 0 destroys the block it wrote (it mixes gradients of different data) and
    every rank fails. Returns rank 0's manifest (the written one, with its sha256) on every rank, its
    ``train_loss`` replaced by the mean of the ranks' values: transformers' ``training_loss`` adds the loss since
    the last logging step unreduced (rank-local), so one rank's value is not the stage's loss unless the last
    step was a logging step; the mean over ranks is (every logged value is already the ranks' mean)."""
    from accelerate.utils import gather_object

    _dist_state()
    got = gather_object([(_stage_inputs_digest(man), float(man["train_loss"]))])
    digests = [d for d, _ in got]
    if len(set(digests)) != 1:
        if is_main_process():
            from .locking import writer_lock

            with writer_lock(run.dir):
                if run.store.has_block(shard, prefix):
                    run.store.destroy_block(shard, prefix)
        _wait_for_everyone()
        raise RuntimeError(f"shard {shard} prefix {prefix}: the ranks trained on different inputs "
                           f"(digests {digests}); the block was discarded")
    out = dict(broadcast_from_main(man))
    out["train_loss"] = sum(loss for _, loss in got) / len(got)
    return out
