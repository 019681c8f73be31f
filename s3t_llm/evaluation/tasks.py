"""Items and tasks: the data model every scorer and the ensemble use, and the entry points that load
lm-eval tasks (:mod:`.tasks_lm` builds them with lm-eval itself) plus the lm-eval cross-check runners."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

METRICS = ("acc", "acc_norm", "acc_bytes")


class TaskError(ValueError):
    """A task, data file or doc that cannot be turned into multiple-choice items."""


# ---------------------------------------------------------------------------------------------------------
# Items and tasks
# ---------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One multiple-choice question.

    ``mode == "choice"``: ``context`` is the prompt and ``choices`` the answer strings; request i is
    ``(context, delimiter + choices[i])``. ``mode == "partial"``: ``choices`` are the contexts (``context``
    holds the same tuple) and request i is ``(choices[i], delimiter + continuation)``.
    """

    index: int                       # record index in the full task
    context: str | tuple[str, ...]
    choices: tuple[str, ...]
    gold: int
    delimiter: str = " "
    continuation: str | None = None
    group: str | None = None

    @property
    def mode(self) -> str:
        return "partial" if self.continuation is not None else "choice"

    @property
    def requests(self) -> list[tuple[str, str]]:
        if self.continuation is not None:
            return [(c, self.delimiter + self.continuation) for c in self.choices]
        return [(self.context, self.delimiter + c) for c in self.choices]

    @property
    def continuations(self) -> list[str]:
        return [cont for _, cont in self.requests]

    @property
    def norm_lengths(self) -> list[int]:
        """Characters used by acc_norm (lm-eval: ``len(choice)``; partial mode: the shared continuation)."""
        if self.continuation is not None:
            return [max(1, len(self.continuation))] * len(self.choices)
        return [max(1, len(c)) for c in self.choices]

    @property
    def byte_lengths(self) -> list[int]:
        src = [self.continuation] * len(self.choices) if self.continuation is not None else self.choices
        return [max(1, len(s.encode("utf-8"))) for s in src]


@dataclass
class Task:
    name: str
    items: list[Item]
    n_total: int                     # records in the full task (before ``limit``)
    metrics: list[str] = field(default_factory=lambda: ["acc", "acc_norm"])
    mode: str = "choice"
    spec: dict = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def requests(self) -> list[tuple[str, str]]:
        return [r for it in self.items for r in it.requests]


def env_include_paths() -> list[str]:
    """``S3T_EVAL_TASKS``: extra folders of lm-eval task YAMLs (``os.pathsep``-separated), searched by every
    task load (as lm-eval's ``--include_path``), before ``eval/lm_tasks``."""
    return [p for p in os.environ.get("S3T_EVAL_TASKS", "").split(os.pathsep) if p]


def load_tasks(names: str | Iterable[str], limit: int | None = None, seed: int | None = 0, *,
               include_path: str | Path | Sequence[str] | None = None) -> list[Task]:
    """Load tasks by name (old names are aliases, :data:`s3t_llm.evaluation.lm_tasks.ALIASES`), lm-eval task name or
    lm-eval task YAML path through :func:`s3t_llm.evaluation.lm_tasks.load_lm_tasks` (a tag gives one task per member,
    a group one task). Every name is checked before any data is read. ``limit`` keeps a seeded random subset
    (``seed``; ``seed=None``: lm-eval's first ``limit`` docs of each leaf task). A task loaded by an alias
    keeps the alias as its name."""
    from . import lm_tasks

    if isinstance(names, (str, Path)):
        names = [n for n in str(names).split(",") if n.strip()]
    asked: list[str] = []
    for n in names:
        if isinstance(n, Mapping):
            raise TaskError("task specs given as dicts (the old eval/tasks template language) are retired; "
                            "write an lm-eval task YAML and pass its path or its folder as include_path")
        asked.append(str(n).strip())
    return list(lm_tasks.load_lm_tasks(asked, include_path=include_path, limit=limit, seed=seed))


def load_task(name_or_yaml: str | Path, limit: int | None = None, seed: int | None = 0, *,
              include_path: str | Path | Sequence[str] | None = None) -> Task:
    """Load one task (see :func:`load_tasks`); a name that stands for several tasks (a tag) is an error."""
    got = load_tasks([name_or_yaml], limit=limit, seed=seed, include_path=include_path)
    if len(got) != 1:
        raise TaskError(f"{name_or_yaml!r} names {len(got)} lm-eval tasks ({', '.join(t.name for t in got)}); "
                        "load them with s3t_llm.evaluation.load_tasks")
    return got[0]


def list_tasks(include_path=None) -> list[str]:
    """The old task names (aliases) and the lm-eval tasks and groups of ``eval/lm_tasks``, ``S3T_EVAL_TASKS``
    and ``include_path`` (not lm-eval's own)."""
    from . import lm_tasks

    return sorted(set(lm_tasks.ALIASES) | set(lm_tasks.list_lm_tasks(include_path)))


# ---------------------------------------------------------------------------------------------------------
# lm-eval bridge
# ---------------------------------------------------------------------------------------------------------

LM_EVAL_PREFIX = "s3t_"


def export_lm_eval_task(task: Task, out_dir: str | Path, *, task_name: str | None = None) -> str:
    """Write ``task``'s items as JSONL plus an lm-eval task YAML (``dataset_path: json``) into ``out_dir``.

    The items are written rendered (context, choices, gold), so lm-eval sees exactly the strings this module
    scores. Returns the lm-eval task name.
    """
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = task_name or f"{LM_EVAL_PREFIX}{task.name}"
    data = out / f"{name}.jsonl"
    with open(data, "w", encoding="utf-8") as fh:
        for it in task.items:
            doc = {"doc_index": it.index, "gold": it.gold, "choices": list(it.choices)}
            if it.continuation is not None:
                doc["continuation"] = it.continuation
            else:
                doc["context"] = it.context
            fh.write(json.dumps(doc, ensure_ascii=False) + "\n")
    delim = task.items[0].delimiter if task.items else " "
    cfg: dict[str, Any] = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "target_delimiter": delim,
        "doc_to_choice": "choices",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in task.metrics],
        "metadata": {"version": 1.0, "source": "s3t_llm.evaluation.export_lm_eval_task"},
    }
    partial = any(it.continuation is not None for it in task.items)
    if partial and not all(it.continuation is not None for it in task.items):
        raise TaskError(f"task {task.name!r}: cannot export a mix of partial and choice items to lm-eval")
    if partial:
        # lm-eval's multiple-input mode: doc_to_text returns the gold index (an int), the choices are contexts.
        cfg.update({"doc_to_text": "gold", "doc_to_target": "continuation"})
    else:
        cfg.update({"doc_to_text": "context", "doc_to_target": "gold"})
    (out / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
    return name


def _prepends_bos(tokenizer_path: str) -> bool:
    """Whether this tokenizer's ``encode`` starts a text with its BOS token (Llama's do; SmolLM2's does not)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ids = tok.encode("a")
    return tok.bos_token_id is not None and bool(ids) and ids[0] == tok.bos_token_id


def run_lm_eval(tasks: Iterable[Task | str | Mapping], *, model: Any = "hf", pretrained: str | None = None,
                peft: str | None = None, dtype: str = "float32", base_url: str | None = None,
                model_name: str | None = None, tokenizer: str | None = None, model_args: str | dict | None = None,
                limit: int | None = None, seed: int = 0, batch_size: int | str = 16, device: str | None = None,
                work_dir: str | Path | None = None, log_samples: bool = False, **simple_evaluate_kwargs) -> dict:
    """Run lm-eval itself on local copies of our tasks (exactly the same items).

    ``model="hf"``: ``pretrained`` (a model dir or hub id) and optionally ``peft`` (an adapter dir, e.g. an S3T
    shard adapter). ``model="local-completions"``: a vLLM server at ``base_url`` serving ``model_name``
    (a base model or a loaded LoRA name), tokenised locally with ``tokenizer``. ``model_args`` overrides the
    generated lm-eval model arguments. Returns lm-eval's result dict (``results``, and ``samples`` with
    ``log_samples``). Task names in lm-eval's output are ``s3t_<name>``. ``device`` defaults to ``cuda`` when
    available, else ``cpu``.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    loaded = [t if isinstance(t, Task) else load_task(t, limit=limit, seed=seed) for t in tasks]
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="s3t_lm_eval_")
        work_dir = tmp.name
    try:
        names = [export_lm_eval_task(t, work_dir) for t in loaded]
        if model_args is None and not isinstance(model, str):
            pass  # an lm_eval LM instance (e.g. lm_eval.models.huggingface.HFLM(pretrained=<model object>))
        elif model_args is None:
            if model == "hf":
                if not pretrained:
                    raise ValueError("run_lm_eval(model='hf') needs pretrained=")
                model_args = f"pretrained={pretrained},dtype={dtype}" + (f",peft={peft}" if peft else "")
            elif model == "local-completions":
                if not (base_url and model_name):
                    raise ValueError("run_lm_eval(model='local-completions') needs base_url= and model_name=")
                url = base_url.rstrip("/")
                if not url.endswith("/completions"):
                    url = (url if url.endswith("/v1") else url + "/v1") + "/completions"
                model_args = (f"model={model_name},base_url={url},tokenizer={tokenizer or pretrained},"
                              "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=3")
                if _prepends_bos(tokenizer or pretrained):
                    # lm-eval's API models encode without special tokens unless told; our scorers (and its hf
                    # model) condition on BOS where the tokenizer adds one (Llama): the same prompts only so.
                    model_args += ",add_bos_token=True"
            else:
                raise ValueError(f"run_lm_eval: give model_args= for model type {model!r}")
        if device is None and isinstance(model, str) and model == "hf":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        tm = TaskManager(include_path=str(work_dir), include_defaults=False)
        res = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, task_manager=tm,
                                      batch_size=batch_size, device=device, log_samples=log_samples,
                                      **simple_evaluate_kwargs)
        return dict(res) if res is not None else {}
    finally:
        if tmp is not None:
            tmp.cleanup()
