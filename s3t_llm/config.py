"""Typed run configuration, filled from a YAML recipe and ``section.field=value`` overrides.

One dataclass per concern. Every field is type-checked and range-checked when the config is built,
so a bad recipe fails with a ``ConfigError`` naming the field and the value before any model loads.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A recipe or override with a wrong field, type or value."""


@dataclass
class ModelConfig:
    # Hub id, local directory, or the embedded alias "smollm2-135m-instruct".
    name: str = "smollm2-135m-instruct"
    precision: Literal["8bit", "bf16", "fp32"] = "fp32"


@dataclass
class DataConfig:
    # Alpaca-format JSON/JSONL file; None means ../shared/data's Alpaca, else the hub's tatsu-lab/alpaca.
    path: str | None = None
    # Use only this many records (a seeded random subset), None for all.
    limit: int | None = None
    # "alpaca": the Stanford Alpaca prompt template; "chat": the tokenizer's chat template.
    template: Literal["alpaca", "chat"] = "alpaca"
    max_length: int = 256
    # Records held out of training (never registered as trainable) for evaluation; 0 for none.
    heldout: int = 0


@dataclass
class S3TConfig:
    shards: int = 2
    slices: int = 3
    budget: int = 2
    method: Literal["cyclic", "bms", "random"] = "cyclic"
    # Deletion prior over slices (length = slices), needed by method "bms".
    prior: list[float] | None = None
    seed: int = 0
    # Which end of the LoRA layers block 1 sits at (the even split; ``lora.blocks`` gives a layout explicitly):
    # "top_down": block 1 nearest the output, stage k's frozen part below it is the base (the first design);
    # "bottom_up": block 1 nearest the input, stage k trains block k above the frozen, trained blocks 1..k-1,
    # which then run without LoRA dropout (see s3t_llm/activation_cache.py). Exactness is the same either way
    # (base + blocks 1..k never saw slices k+1..L). A run keeps the order it was created with (run.json).
    block_order: Literal["top_down", "bottom_up"] = "top_down"


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    rslora: bool = True
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))
    # Which decoder layers carry LoRA: "all", or the top N layers (an int).
    layers: str | int = "all"
    # Explicit block layout (block 1 first), overriding the even split of s3t.block_order.
    blocks: list[list[int]] | None = None


# transformers' optimizer names (``transformers.training_args.OptimizerNames``, 5.19) and scheduler names
# (``SchedulerType``), kept here so that a recipe is checked without importing transformers.
OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor", "adamw_anyprecision",
    "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad", "adamw_bnb_8bit", "adamw_8bit",
    "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit", "paged_adamw_8bit", "paged_ademamix_32bit",
    "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit",
    "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise", "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw",
    "schedule_free_radam", "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise",
    "stable_adamw",
)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")


@dataclass
class TrainConfig:
    """Per-stage training (every stage gets a fresh optimizer and schedule with these settings).

    The defaults of ``optim`` and ``max_grad_norm`` are what transformers 5.19 used when these fields did not
    exist (``adamw_torch_fused`` with torch >= 2.8, clipping at 1.0), so a run made before them trains the same.
    """
    epochs: float = 1.0
    learning_rate: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = -1
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"
    # A transformers optimizer name; the paged_* and *_bnb_* ones need CUDA + bitsandbytes.
    optim: str = "adamw_torch_fused"
    # Gradient clipping (global L2 norm over the trainable block); 0 disables it.
    max_grad_norm: float = 1.0
    seed: int = 0
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    # Activation cache (s3t_llm/activation_cache.py): a stage whose trained block has only zero blocks below it
    # runs the decoder from that block's lowest layer up, from cached per-sample hidden states of the frozen
    # base. In memory (then on disk, see activation_cache_disk_gb), dropped when training returns or a deletion lands.
    cache_activations: bool = False
    # Memory bound of that cache in GiB (hidden states in the training dtype); a stage whose entries would not
    # fit runs uncached (decided from the stage's own data, so the result stays deterministic).
    activation_cache_gb: float = 4.0
    # Disk tier of that cache in GiB (0: memory only): entries beyond the memory bound spill to the trainer's
    # scratch directory under the run (mode 0700, in the training dtype), removed when training returns or a
    # deletion lands; a deletion destroys the deleted slices' groups and `s3t verify` checks it. Off by default
    # because it writes data derived from samples to disk; worth it when a stage's states exceed memory.
    activation_cache_disk_gb: float = 0.0


@dataclass
class RayConfig:
    """Where the stage tree runs when training on Ray (``s3t train --ray``, ``s3t serve --retrain --ray``).

    The command-line flags override these fields; ``enabled: true`` makes Ray the default for this recipe.
    """
    enabled: bool = False
    # null or "local": a local instance sized to the machine (bound to 127.0.0.1); "auto" or HOST:PORT: a cluster.
    address: str | None = None
    # torch threads per stage, and the CPUs a stage reserves on the cluster.
    threads: int = 1
    # stages at once on a local instance (null: CPUs // threads, or one per GPU).
    workers: int | None = None
    # GPUs a stage reserves (null: 1 where the cluster has GPUs, else 0).
    gpus_per_stage: float | None = None
    # Ray's own retries of a stage whose worker died, then the driver's resubmissions of it.
    max_retries: int = 3
    resubmits: int = 2


@dataclass
class ExperimentConfig:
    """``s3t experiment deletion-stream``: the same stream of deletions on one run per budget B (B=1 is SISA).

    The command-line flags override these fields (as ``experiment.<field>=value`` overrides do)."""
    budgets: list[int] = field(default_factory=lambda: [1, 2, 3])
    # single-sample deletion requests, drawn uniformly or ("skewed") slice j with weight skew**j
    requests: int = 8
    prior: str = "uniform"
    skew: float = 0.5
    eval_every: int = 1  # evaluate after every k-th request (and after the last)
    # lm-eval task names or task YAML paths (arc_easy etc. alias the shipped s3t_arc_easy etc.)
    tasks: list[str] = field(default_factory=lambda: ["arc_easy", "piqa"])
    limit: int = 40  # items per task (a fixed seeded subset); 0 for all
    heldout: int = 32  # held-out records for the loss (the rest: the audit's non-members)
    audit: bool = True  # the membership audit before and after the stream
    reference: bool = True  # also fine-tune one LoRA on all the data (the "full training" reference)
    generations: int = 3  # held-out prompts for the generation samples
    backend: str = "vllm"  # vllm: serve each copy with `s3t serve`; offline: in-process scoring
    out: str | None = None  # experiment directory (null: <output_dir>/<name>-stream)
    seed: int = 0


@dataclass
class RunConfig:
    name: str = "s3t-run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    s3t: S3TConfig = field(default_factory=S3TConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "RunConfig":
        _check(re.fullmatch(r"[A-Za-z0-9._-]+", self.name) is not None, "name", self.name,
               "use letters, digits, '.', '_' or '-'")
        s = self.s3t
        for f in ("shards", "slices", "budget"):
            _check(getattr(s, f) >= 1, f"s3t.{f}", getattr(s, f), "must be >= 1")
        if s.method == "bms":
            _check(s.prior is not None and len(s.prior) == s.slices, "s3t.prior", s.prior,
                   f"method 'bms' needs a prior of length s3t.slices={s.slices}")
        _check(self.lora.r >= 1, "lora.r", self.lora.r, "must be >= 1")
        _check(self.lora.alpha > 0, "lora.alpha", self.lora.alpha, "must be > 0")
        _check(0.0 <= self.lora.dropout < 1.0, "lora.dropout", self.lora.dropout, "must be in [0, 1)")
        bad = [m for m in self.lora.target_modules if m not in PROJECTIONS]
        _check(not bad and self.lora.target_modules, "lora.target_modules", self.lora.target_modules,
               f"must be a non-empty subset of {list(PROJECTIONS)}")
        if isinstance(self.lora.layers, str):
            _check(self.lora.layers == "all", "lora.layers", self.lora.layers, "must be 'all' or an int")
        else:
            _check(self.lora.layers >= 1, "lora.layers", self.lora.layers, "must be >= 1")
        _check(self.data.max_length >= 16, "data.max_length", self.data.max_length, "must be >= 16")
        _check(self.data.limit is None or self.data.limit >= 1, "data.limit", self.data.limit, "must be >= 1")
        _check(self.data.heldout >= 0, "data.heldout", self.data.heldout, "must be >= 0")
        t = self.train
        _check(t.epochs > 0, "train.epochs", t.epochs, "must be > 0")
        _check(t.learning_rate > 0, "train.learning_rate", t.learning_rate, "must be > 0")
        _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
        _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "must be >= 1")
        _check(t.optim in OPTIMIZERS, "train.optim", t.optim, f"must be one of transformers' optimizers {list(OPTIMIZERS)}")
        _check(t.lr_scheduler in SCHEDULERS, "train.lr_scheduler", t.lr_scheduler, f"must be one of {list(SCHEDULERS)}")
        _check(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", t.warmup_ratio, "must be in [0, 1)")
        _check(t.weight_decay >= 0.0, "train.weight_decay", t.weight_decay, "must be >= 0")
        _check(t.max_grad_norm >= 0.0, "train.max_grad_norm", t.max_grad_norm, "must be >= 0 (0 disables clipping)")
        _check(t.activation_cache_gb > 0.0, "train.activation_cache_gb", t.activation_cache_gb, "must be > 0")
        _check(t.activation_cache_disk_gb >= 0.0, "train.activation_cache_disk_gb", t.activation_cache_disk_gb,
               "must be >= 0 (0: memory only)")
        r = self.ray
        _check(r.threads >= 1, "ray.threads", r.threads, "must be >= 1")
        _check(r.workers is None or r.workers >= 1, "ray.workers", r.workers, "must be >= 1 (or null)")
        _check(r.gpus_per_stage is None or r.gpus_per_stage >= 0, "ray.gpus_per_stage", r.gpus_per_stage,
               "must be >= 0 (or null)")
        _check(r.max_retries >= 0, "ray.max_retries", r.max_retries, "must be >= 0")
        _check(r.resubmits >= 0, "ray.resubmits", r.resubmits, "must be >= 0")
        if r.address not in (None, "", "local", "auto"):
            _check(re.fullmatch(r"(ray://)?[A-Za-z0-9.\-\[\]:]+:\d+", r.address) is not None, "ray.address",
                   r.address, "use null/'local' (a local instance), 'auto' or HOST:PORT")
        e = self.experiment
        _check(bool(e.budgets) and all(b >= 1 for b in e.budgets), "experiment.budgets", e.budgets,
               "need one or more budgets >= 1")
        _check(e.requests >= 1, "experiment.requests", e.requests, "must be >= 1")
        _check(e.eval_every >= 1, "experiment.eval_every", e.eval_every, "must be >= 1")
        _check(e.prior in ("uniform", "skewed"), "experiment.prior", e.prior, "use 'uniform' or 'skewed'")
        _check(0 < e.skew <= 1, "experiment.skew", e.skew, "must be in (0, 1] (slice j is hit with weight skew**j)")
        _check(e.backend in ("vllm", "offline"), "experiment.backend", e.backend, "use 'vllm' or 'offline'")
        _check(bool(e.tasks), "experiment.tasks", e.tasks, "name one or more tasks")
        for f in ("limit", "heldout", "generations"):
            _check(getattr(e, f) >= 0, f"experiment.{f}", getattr(e, f), "must be >= 0")
        _check(self.data.limit is None or e.requests <= self.data.limit, "experiment.requests", e.requests,
               f"exceeds the recipe's data.limit={self.data.limit} samples")
        return self


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        errors = []
        for a in args:
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}={value!r}: expected {_tname(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r}: must be one of {list(args)}")
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{name}={value!r}: expected null")
        return None
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r}: expected a list")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected true/false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r}: expected a string")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, name)
    raise ConfigError(f"{name}: unsupported type {tp}")


def _tname(tp: Any) -> str:
    return str(tp).replace("typing.", "")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown field(s) {', '.join(where + u for u in unknown)}; known: {sorted(known)}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    import yaml

    return yaml.safe_load(text)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested dict."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected section.field=value")
        key, raw = ov.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {ov!r}: {p} is not a section")
        node[parts[-1]] = _parse_scalar(raw)
    return data


def load_config(recipe: str | Path | dict | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Build a validated ``RunConfig`` from a YAML recipe (path or dict) plus overrides."""
    import yaml

    if recipe is None:
        data: dict = {}
    elif isinstance(recipe, dict):
        data = recipe
    else:
        p = Path(recipe)
        if not p.exists():
            raise ConfigError(f"recipe {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"recipe {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {p}: top level must be a mapping")
    data = apply_overrides(_deepcopy(data), overrides or [])
    return _build(RunConfig, data, "").validate()


def _deepcopy(d: Any) -> Any:
    import copy

    return copy.deepcopy(d)
