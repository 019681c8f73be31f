"""Scorers: lm-eval's ``loglikelihood(requests) -> [(logprob, is_greedy)]`` over transformers (+PEFT), a
served adapter through the gateway / vLLM's completions API, or vLLM in process; and the held-out loss."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

logger = logging.getLogger(__name__)


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



# ----- a served S3T run -----------------------------------------------------------------------------
def heldout_loss(scorer: TokenScorer, records: Sequence[Mapping], template: str = "alpaca",
                 max_length: int | None = None) -> dict:
    """Mean per-token loss of the completions (EOS included) given their Alpaca prompts: completion only.

    ``max_length`` truncates prompt + completion from the right as training does (``data.max_length``);
    a record with no completion token left is skipped, as TRL skips it in training."""
    from ..prompts import to_example

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
    loss = nll / max(1, n_tok)
    return {"loss": loss, "stderr": ratio_stderr([-g[0] for g in got], [len(c) for _, c in pairs], loss),
            "n_samples": len(pairs), "n_tokens": n_tok, "per_sample": per_sample}


def ratio_stderr(nums: Sequence[float], dens: Sequence[int], ratio: float) -> float:
    """Standard error of a per-token mean ``sum(nums) / sum(dens)`` over samples (the delta method for a ratio
    estimator: ``sqrt(sum((num_i - ratio * den_i)^2) / (n (n - 1))) / mean(den)``); nan below 2 samples."""
    import math

    n = len(nums)
    if n < 2:
        return float("nan")
    mean_den = sum(dens) / n
    ss = sum((a - ratio * b) ** 2 for a, b in zip(nums, dens))
    return math.sqrt(ss / (n * (n - 1))) / mean_den
