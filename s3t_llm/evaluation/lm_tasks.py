"""lm-eval task objects as the source of zero-shot multiple-choice tasks.

:func:`load_lm_tasks` resolves lm-eval task names (lm-eval's own shipped tasks, the shipped ``eval/lm_tasks``
folder and any ``include_path``) or lm-eval task YAML paths through ``lm_eval.tasks.TaskManager``, builds the
requests with lm-eval's own ``Task.build_all_requests`` (so every ``(context, continuation)`` pair is
lm-eval's, few-shot context and description included) and turns each doc into an :class:`evaluation.Item`.
The returned :class:`LMTask` is an :class:`evaluation.Task`: the scorers, the shard ensemble and
:func:`evaluation.evaluate` use it unchanged. It keeps the lm-eval task objects and docs, so that metrics can
come from lm-eval itself (:func:`lm_metrics`, :func:`aggregate`, :func:`lm_eval_scores`):

- a task with lm-eval's default ``multiple_choice`` ``process_results``: ``evaluate``'s own acc / acc_norm
  (and its ensemble: the average over shards of the softmax over choices of ll, of ll/len(choice)) are
  lm-eval's metrics; :func:`lm_eval_scores` also recomputes each scorer's through lm-eval.
- a task with its own ``process_results`` (a ``!function``) or several true answers (``doc_to_target``
  returning a list): per scorer, lm-eval's ``process_results`` on that scorer's log-likelihoods; for the
  ensemble, on the log of the shard-averaged choice probabilities (``is_greedy`` is False there: no single
  model decoded it). ``evaluate``'s own acc there only counts the first listed answer.

A group (e.g. ``s3t_mmlu``, lm-eval's ``mmlu``) becomes one task whose items carry their leaf task's name as
``Item.group`` (the micro average = lm-eval's ``weight_by_size`` aggregation); a tag becomes one task per
member. ``limit`` is lm-eval's (the first N docs of each leaf task) unless ``seed`` is given, when it is a
seeded random subset (as :func:`evaluation.load_task`), passed to lm-eval as ``samples``.
"""

from __future__ import annotations

import difflib
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .tasks import METRICS, Item, Task, TaskError, env_include_paths
from ..paths import REPO_ROOT

logger = logging.getLogger(__name__)

LM_TASKS_DIR = REPO_ROOT / "eval" / "lm_tasks"
SUPPORTED_OUTPUT_TYPES = ("multiple_choice",)
PREFIX = "s3t_"
FEWSHOT_SEED = 1234          # lm_eval.simple_evaluate's default fewshot_random_seed

#: The old task names (the retired ``eval/tasks/*.yaml`` specs) -> the lm-eval tasks of ``eval/lm_tasks`` that
#: replace them (item for item equal). A task loaded by an old name keeps that name (in results, reports).
ALIASES: dict[str, str] = {
    "arc_easy": "s3t_arc_easy",
    "arc_challenge": "s3t_arc_challenge",
    "piqa": "s3t_piqa",
    "boolq": "s3t_boolq",
    "hellaswag": "s3t_hellaswag",
    "winogrande": "s3t_winogrande",
    "openbookqa": "s3t_openbookqa",
    "mmlu": "s3t_mmlu",
}


@dataclass
class LMTask(Task):
    """An :class:`evaluation.Task` built from lm-eval task object(s); ``docs[i]`` is ``(leaf name, doc)`` of
    ``items[i]``; ``lm_tasks`` maps leaf names to the lm-eval ``Task`` objects."""

    lm_tasks: dict = field(default_factory=dict, repr=False)
    docs: list = field(default_factory=list, repr=False)
    custom_metrics: bool = False     # process_results is the task's own, or several gold answers
    selection: dict = field(default_factory=dict, repr=False)   # leaf -> doc indices of its items (lm-eval samples=)

    def lm_task_of(self, i: int):
        return self.lm_tasks[self.docs[i][0]]


# ---------------------------------------------------------------------------------------------------------
# Resolution
# ---------------------------------------------------------------------------------------------------------

_MANAGERS: dict[tuple, Any] = {}


def _include_paths(include_path) -> list[str]:
    """``include_path`` (a folder or a list), the ``S3T_EVAL_TASKS`` folders, then ``eval/lm_tasks``."""
    extra = [] if include_path is None else ([include_path] if isinstance(include_path, (str, Path)) else list(include_path))
    extra += env_include_paths()
    out = [str(Path(p).expanduser().resolve()) for p in extra]
    for p in out:
        if not Path(p).is_dir():
            raise TaskError(f"include path {p} is not a folder")
    return list(dict.fromkeys([*out, str(LM_TASKS_DIR.resolve())]))


def task_manager(include_path=None, *, include_defaults: bool = True):
    """A cached ``lm_eval.tasks.TaskManager`` over ``include_path`` (a folder or a list), ``eval/lm_tasks`` and,
    with ``include_defaults``, lm-eval's own tasks (indexing those takes ~20 s once per process)."""
    from lm_eval.tasks import TaskManager

    paths = _include_paths(include_path)
    key = (tuple(paths), include_defaults)
    if key not in _MANAGERS:
        _MANAGERS[key] = TaskManager(include_path=paths, include_defaults=include_defaults)
    return _MANAGERS[key]


def _is_yaml_path(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) or Path(name).expanduser().is_file()


def _yaml_output_types(path: Path) -> list[str]:
    """output_type of a task YAML (includes followed, ``!function`` not imported): checked before any data load."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path, resolve_func=False)
    if "group" in cfg and "task" in cfg and isinstance(cfg["task"], list):
        return []      # a group: its members are checked once built
    return [cfg.get("output_type", "generate_until")]


def _check_output_type(name: str, output_type: str | None) -> None:
    if output_type not in SUPPORTED_OUTPUT_TYPES:
        raise TaskError(f"lm-eval task {name!r} has output_type {output_type!r}; only "
                        f"{', '.join(SUPPORTED_OUTPUT_TYPES)} tasks can be scored per shard and ensembled "
                        "(loglikelihood of each choice); use lm-eval itself for generate_until / loglikelihood / "
                        "loglikelihood_rolling tasks")


def _build(tm, spec: str, what: str):
    try:
        return tm.load(spec)
    except TaskError:
        raise
    except Exception as e:  # noqa: BLE001 - lm-eval raises many kinds; say which task and pass its message on
        raise TaskError(f"lm-eval cannot load {what}: {type(e).__name__}: {e}") from e


def _resolve(name: str, include_path) -> tuple[str, Any]:
    """Check ``name`` (known, loadable YAML, multiple_choice) without reading data: ``(display name, build)``,
    ``build()`` returning lm-eval's ``TaskManager.load`` result."""
    name = str(name).strip()
    if not name:
        raise TaskError("empty task name")
    if _is_yaml_path(name):
        p = Path(name).expanduser()
        if not p.is_file():
            raise TaskError(f"lm-eval task YAML {p} does not exist")
        try:
            from lm_eval.tasks._index import TaskIndex

            entry = TaskIndex.entry_from_path(p)
            types = _yaml_output_types(p)
        except Exception as e:  # noqa: BLE001
            raise TaskError(f"lm-eval cannot load task YAML {p}: {type(e).__name__}: {e}") from e
        if entry is None:
            raise TaskError(f"lm-eval cannot load task YAML {p}: it has no `task:` (or `group:`) name")
        for t in types:
            _check_output_type(entry.name, t)
        paths = [*_user_paths(include_path), str(p.parent.resolve())]

        def build_path():
            what = f"task YAML {p}"
            try:
                return _build(task_manager(paths, include_defaults=False), str(p.resolve()), what)
            except TaskError as e:
                if not _missing_name(e):
                    raise
                return _build(task_manager(paths), str(p.resolve()), what)   # names lm-eval's own tasks

        return entry.name, build_path
    # a name: our folder and include_path first (cheap), lm-eval's own tasks only when needed
    local = task_manager(include_path, include_defaults=False)
    if name in local.all_tasks:
        tm = local
    elif _in_default_yaml_text(name):
        tm = task_manager(include_path)
    else:   # in no lm-eval YAML at all: unknown, without indexing lm-eval's 14k task YAMLs (~20 s)
        tm = None
    if tm is None or name not in tm.all_tasks:
        known = sorted(set(local.all_tasks) | (set(tm.all_tasks) if tm is not None else _default_names_quick()))
        close = difflib.get_close_matches(name, known, n=8, cutoff=0.6)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise TaskError(f"unknown lm-eval task {name!r} (searched lm-eval's tasks, {LM_TASKS_DIR}"
                        f"{', ' + ', '.join(_user_paths(include_path)) if include_path else ''}){hint}")
    entry = tm.task_index[name]
    if getattr(entry, "yaml_path", None):
        try:
            types = _yaml_output_types(Path(entry.yaml_path))
        except Exception as e:  # noqa: BLE001
            raise TaskError(f"lm-eval cannot load task YAML {entry.yaml_path} ({name!r}): {type(e).__name__}: {e}") from e
        for t in types:
            _check_output_type(name, t)

    def build_name():
        what = f"task {name!r}" + (f" ({entry.yaml_path})" if getattr(entry, "yaml_path", None) else "")
        try:
            return _build(tm, name, what)
        except TaskError as e:
            if tm is local and _missing_name(e):   # a member named from lm-eval's own tasks
                return _build(task_manager(include_path), name, what)
            raise

    return name, build_name


_DEFAULT_TEXT: list[tuple[str, str]] = []


def _default_yaml_texts() -> list[tuple[str, str]]:
    if not _DEFAULT_TEXT:
        import os

        import lm_eval.tasks

        root = Path(lm_eval.tasks.__file__).parent
        for dp, _, fns in os.walk(root):
            for fn in fns:
                if fn.endswith((".yaml", ".yml")):
                    path = os.path.join(dp, fn)
                    with open(path, encoding="utf-8", errors="replace") as fh:
                        _DEFAULT_TEXT.append((path, fh.read()))
    return _DEFAULT_TEXT


def _in_default_yaml_text(name: str) -> bool:
    """False only when ``name`` occurs in none of lm-eval's task YAMLs (so it cannot be one of its tasks)."""
    return any(name in text for _, text in _default_yaml_texts())


def _default_names_quick() -> set[str]:
    """Approximately the names lm-eval's YAMLs define (``task:``/``group:``/``tag:`` lines), for suggestions."""
    import re

    rx = re.compile(r"^[\"']?(task|group|tag)[\"']?[ \t]*:[ \t]*(.*)$", re.M)
    names: set[str] = set()
    for _, text in _default_yaml_texts():
        for _, v in rx.findall(text):
            v = v.strip().strip("'\"")
            if v and v[0] not in "[!{":
                names.add(v)
    return names


def _missing_name(e: TaskError) -> bool:
    """The build failed because a member name is not registered here (worth retrying with lm-eval's own tasks)."""
    cause = e.__cause__
    return isinstance(cause, KeyError) or "not a registered" in str(cause or "")


def _user_paths(include_path) -> list[str]:
    return _include_paths(include_path)[:-1]


# ---------------------------------------------------------------------------------------------------------
# Items
# ---------------------------------------------------------------------------------------------------------

def _gold(task, doc, choices: list[str], where: str) -> tuple[int, bool]:
    """Gold index (the first when several) and whether the task has several gold answers."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    many = isinstance(gold, list)
    golds = gold if many else [gold]
    out = []
    for g in golds:
        if isinstance(g, str) and not g.strip().lstrip("-").isdigit():
            if g not in choices:
                raise TaskError(f"{where}: gold {g!r} is not one of the choices {choices}")
            g = choices.index(g)
        g = int(g)
        if not 0 <= g < len(choices):
            raise TaskError(f"{where}: gold index {g} out of range for {len(choices)} choices")
        out.append(g)
    if not out:
        raise TaskError(f"{where}: no gold answer")
    return out[0], many


def _custom_process_results(task) -> bool:
    return callable(getattr(task.config, "process_results", None))


def _items_of(task, leaf: str, *, limit, seed, offset: int, group: str | None,
              samples: list[int] | None = None) -> tuple[list[Item], list, int, bool]:
    _check_output_type(leaf, task.OUTPUT_TYPE)
    if "acc_mutual_info" in getattr(task, "_metric_fn_list", {}):
        raise TaskError(f"lm-eval task {leaf!r}: acc_mutual_info (unconditional requests) is not supported")
    n_total = len(task.eval_docs)
    lm_limit = limit
    if limit is not None:
        if limit < 1:
            raise TaskError(f"task {leaf!r}: limit must be >= 1, got {limit}")
        if seed is not None and limit < n_total:
            samples = sorted(random.Random(seed).sample(range(n_total), int(limit)))
            lm_limit = None
    try:
        task.set_fewshot_seed(seed=FEWSHOT_SEED)   # as lm_eval.simple_evaluate does (its default seed)
        task.build_all_requests(limit=lm_limit, samples=samples, rank=0, world_size=1)
    except Exception as e:  # noqa: BLE001
        raise TaskError(f"lm-eval task {leaf!r}: building requests failed: {type(e).__name__}: {e}") from e
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    delim = task.config.target_delimiter
    items, docs, many_any = [], [], False
    for k, doc_id in enumerate(sorted(by_doc)):
        insts = sorted(by_doc[doc_id], key=lambda x: x.idx)
        doc = insts[0].doc
        index = samples[doc_id] if samples is not None else doc_id
        where = f"lm-eval task {leaf!r}, doc {index}"
        args = [tuple(i.arguments[:2]) for i in insts]
        if task.multiple_input:
            conts = {a[1] for a in args}
            if len(conts) != 1 or not next(iter(conts)).startswith(delim):
                raise TaskError(f"{where}: multiple-input requests do not share one continuation")
            contexts = tuple(a[0] for a in args)
            item = Item(index=offset + index, context=contexts, choices=contexts, gold=0, delimiter=delim,
                        continuation=args[0][1][len(delim):], group=group)
        else:
            ctxs = {a[0] for a in args}
            if len(ctxs) != 1 or not all(a[1].startswith(delim) for a in args):
                raise TaskError(f"{where}: the choices' requests do not share one context")
            item = Item(index=offset + index, context=args[0][0], choices=tuple(a[1][len(delim):] for a in args),
                        gold=0, delimiter=delim, group=group)
        if len(item.choices) < 2:
            raise TaskError(f"{where}: {len(item.choices)} choice(s); a multiple-choice item needs at least 2")
        choices = list(task.doc_to_choice(doc))
        gold, many = _gold(task, doc, choices, where)
        many_any |= many
        item = Item(index=item.index, context=item.context, choices=item.choices, gold=gold, delimiter=delim,
                    continuation=item.continuation, group=group)
        if item.requests != args:   # the pairs we score ARE lm-eval's
            raise TaskError(f"{where}: internal error: rebuilt requests differ from lm-eval's")
        items.append(item)
        docs.append((leaf, doc))
    return items, docs, n_total, many_any


def _metrics_of(task) -> list[str]:
    ms = [m for m in getattr(task, "_metric_fn_list", {}) if m in METRICS]
    return ms or ["acc"]


def load_lm_tasks(names: str | Iterable[str], include_path=None, limit: int | None = None,
                  seed: int | None = None) -> list[LMTask]:
    """Load lm-eval tasks (names or YAML paths) as :class:`LMTask` (see the module docstring).

    Every name is resolved (unknown names, output types other than ``multiple_choice`` and YAMLs lm-eval
    cannot load raise :class:`evaluation.TaskError`) before any task's data are read (a group's members:
    once built, before any request is made).
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = [str(n).strip() for n in names]
    if not names:
        raise TaskError("no task names given")
    task_log = logging.getLogger("lm_eval.api.task")
    task_log.addFilter(_quiet_custom_dataset)
    try:
        checked = [(n, *_resolve(ALIASES.get(n, n), include_path)) for n in names]   # every name checked first
        resolved = [(asked, name, build()) for asked, name, build in checked]      # then lm-eval builds (reads data)
    finally:
        task_log.removeFilter(_quiet_custom_dataset)
    out: list[LMTask] = []
    for asked, name, res in resolved:
        alias = asked if asked in ALIASES else None
        tasks, groups = res["tasks"], res["groups"]
        if groups:
            children = {c for kids in res.get("group_map", {}).values() for c in kids}
            tops = [g for g in groups if g not in children] or list(groups)
            title = name if name in groups else tops[0]
            out.append(_merge(alias or title, [(leaf, tasks[leaf]) for leaf in sorted(tasks)], limit, seed,
                              grouped=True))
        else:
            for leaf in (sorted(tasks) if len(tasks) > 1 else tasks):
                out.append(_merge(alias if alias and len(tasks) == 1 else leaf, [(leaf, tasks[leaf])], limit, seed,
                                  grouped=False))
    return out


def _quiet_custom_dataset(record: logging.LogRecord) -> bool:
    """Drop lm-eval's warning about ``--metadata`` kwargs that every ``custom_dataset`` task logs on load."""
    return "Custom kwargs can be passed to `--metadata`" not in str(record.msg)


def _pooled_samples(leaves: list[tuple[str, Any]], limit, seed) -> list[list[int] | None] | None:
    """A seeded ``limit`` over a group: one random subset of the concatenated docs (leaves in order), as the
    old specs drew it over all of MMLU, split into each leaf's doc indices; None when not seeded or all fit."""
    if limit is None or seed is None or len(leaves) < 2:
        return None
    sizes = [len(t.eval_docs) for _, t in leaves]
    total = sum(sizes)
    if limit < 1 or limit >= total:
        return None
    pick = sorted(random.Random(seed).sample(range(total), int(limit)))
    out, off = [], 0
    for n in sizes:
        out.append([i - off for i in pick if off <= i < off + n])
        off += n
    return out


def _merge(title: str, leaves: list[tuple[str, Any]], limit, seed, *, grouped: bool) -> LMTask:
    items, docs, n_total, many_any, custom = [], [], 0, False, False
    metrics: list[str] = []
    selection: dict[str, list[int]] = {}
    pooled = _pooled_samples(leaves, limit, seed) if grouped else None
    for k, (leaf, t) in enumerate(leaves):
        if pooled is not None:
            if not pooled[k]:
                n_total += len(t.eval_docs)
                custom |= _custom_process_results(t)
                continue
            its, ds, n, many = _items_of(t, leaf, limit=None, seed=None, offset=n_total,
                                         group=leaf, samples=pooled[k])
        else:
            its, ds, n, many = _items_of(t, leaf, limit=limit, seed=seed, offset=n_total,
                                         group=leaf if grouped else None)
        selection[leaf] = [it.index - n_total for it in its]
        items += its
        docs += ds
        n_total += n
        many_any |= many
        custom |= _custom_process_results(t)
        metrics += [m for m in _metrics_of(t) if m not in metrics]
    return LMTask(name=title, items=items, n_total=n_total, metrics=metrics,
                  mode="partial" if items and items[0].continuation is not None else "choice",
                  spec={"name": title, "source": "lm_eval", "leaves": [leaf for leaf, _ in leaves]},
                  lm_tasks=dict(leaves), docs=docs, custom_metrics=custom or many_any, selection=selection)


# ---------------------------------------------------------------------------------------------------------
# lm-eval metrics
# ---------------------------------------------------------------------------------------------------------

def lm_metrics(task, doc, lls: Sequence[tuple[float, bool]]) -> dict:
    """lm-eval's per-doc metrics: ``task.process_results(doc, [(logprob, is_greedy), ...])``."""
    return task.process_results(doc, [(float(ll), bool(g)) for ll, g in lls])


def aggregate(task, per_doc: Sequence[Mapping]) -> dict:
    """lm-eval's aggregation (``task.aggregation()``) of per-doc metric dicts."""
    agg = task.aggregation()
    out = {}
    for m in (per_doc[0] if per_doc else {}):
        fn = agg.get(m)
        if fn is None:
            continue
        out[m] = float(fn([d[m] for d in per_doc]))
    return out


def ensemble_lls(lls_by_scorer: Sequence[Sequence[float]]) -> list[float]:
    """Per-choice log of the shard-averaged softmax probabilities (the ensemble as log-likelihoods)."""
    n = len(lls_by_scorer)
    probs = [0.0] * len(lls_by_scorer[0])
    for lls in lls_by_scorer:
        m = max(lls)
        ex = [math.exp(x - m) for x in lls]
        s = sum(ex)
        for j, e in enumerate(ex):
            probs[j] += e / s / n
    return [math.log(p) if p > 0 else float("-inf") for p in probs]


def lm_eval_scores(task: LMTask, samples: Sequence[Mapping], scorers: Sequence[str]) -> dict:
    """lm-eval metrics of a scored :class:`LMTask` from ``evaluate(..., return_samples=True)["samples"][name]``.

    Returns ``{"scorers": {s: metrics}, "ensemble": metrics | None}``: per scorer through lm-eval's
    ``process_results``/``aggregation``; the ensemble (the log of the averaged choice probabilities through
    ``process_results``) only for tasks whose metrics are their own (``task.custom_metrics``): for the default
    ``multiple_choice`` metrics ``evaluate``'s ensemble (acc, acc_norm) is the one to use.
    """
    by_index = {it.index: k for k, it in enumerate(task.items)}
    per: dict[str, list] = {s: [] for s in scorers}
    ens: list = []
    leaf_task = None
    for smp in samples:
        k = by_index[smp["index"]]
        leaf, doc = task.docs[k]
        t = task.lm_tasks[leaf]
        leaf_task = leaf_task or t
        for s in scorers:
            per[s].append(lm_metrics(t, doc, [(ll, False) for ll in smp["lls"][s]]))
        if task.custom_metrics:
            ens.append(lm_metrics(t, doc, [(ll, False) for ll in ensemble_lls([smp["lls"][s] for s in scorers])]))
    if leaf_task is None:
        return {"scorers": {s: {} for s in scorers}, "ensemble": None}
    return {"scorers": {s: aggregate(leaf_task, per[s]) for s in scorers},
            "ensemble": aggregate(leaf_task, ens) if task.custom_metrics else None}


def evaluate(scorers, tasks: Iterable[LMTask | Task | str], *, include_path=None, limit: int | None = None,
             seed: int | None = None, **kw) -> dict:
    """:func:`evaluation.evaluate` plus, for every :class:`LMTask`, ``tasks[name]["lm_eval"]`` =
    :func:`lm_eval_scores` (names are loaded with :func:`load_lm_tasks`)."""
    if not isinstance(scorers, Mapping):
        scorers = {"model": scorers}
    loaded: list[Task] = []
    for t in tasks:
        loaded += [t] if isinstance(t, Task) else load_lm_tasks([t], include_path=include_path, limit=limit, seed=seed)
    want = kw.pop("return_samples", False)
    from .ensemble import evaluate as evaluate_items

    res = evaluate_items(scorers, loaded, return_samples=True, **kw)
    for t in loaded:
        if isinstance(t, LMTask):
            res["tasks"][t.name]["lm_eval"] = lm_eval_scores(t, res["samples"][t.name], list(scorers))
    if not want:
        res.pop("samples", None)
    return res


def list_lm_tasks(include_path=None) -> list[str]:
    """Names of the tasks and groups in ``eval/lm_tasks`` and ``include_path`` (not lm-eval's own)."""
    return list(task_manager(include_path, include_defaults=False).all_tasks)


__all__ = ["LMTask", "load_lm_tasks", "lm_metrics", "aggregate", "ensemble_lls", "lm_eval_scores", "evaluate",
           "task_manager", "list_lm_tasks", "LM_TASKS_DIR", "SUPPORTED_OUTPUT_TYPES"]
