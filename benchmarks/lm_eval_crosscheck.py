"""Cross-check s3t_llm.evaluation (HFScorer) against lm-eval itself on exactly the same items.

Both sides score a fixed seeded subset of each task with the same base model in float32: ours through
``evaluate({"hf": HFScorer})``, lm-eval through ``lm_eval.simple_evaluate(model="hf", ...)`` on local task
YAMLs written by ``export_lm_eval_task`` (``dataset_path: json`` over the rendered items). The script prints
and writes a side-by-side table of acc / acc_norm, the differences (must be within 1 point), how many items
the two predict differently and the largest per-request log-likelihood difference.

    python benchmarks/lm_eval_crosscheck.py --items 200 --tasks arc_easy piqa boolq hellaswag
"""

from __future__ import annotations

import argparse
import os
import platform
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
from s3t_llm.evaluation import HFScorer, evaluate, load_task, run_lm_eval  # noqa: E402
from s3t_llm.models import resolve_model  # noqa: E402

TOLERANCE = 1.0  # points


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "piqa", "boolq", "hellaswag"],
                    help="task names, each optionally NAME:N to override --items")
    ap.add_argument("--items", type=int, default=200, help="items per task (seeded random subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice; 1 is faster on a machine shared with other jobs)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_eval_crosscheck.md"))
    args = ap.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = resolve_model(args.model)
    tasks = []
    for spec in args.tasks:
        name, _, n = spec.partition(":")
        tasks.append(load_task(name, limit=int(n) if n else args.items, seed=args.seed))
    n_req = sum(len(t.requests) for t in tasks)
    print(f"model {model_path}; tasks {[(t.name, len(t)) for t in tasks]}; {n_req} requests; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    t0 = time.time()
    scorer = HFScorer.from_pretrained(model_path, dtype="float32", batch_size=args.batch_size)
    ours = evaluate({"hf": scorer}, tasks, return_samples=True)
    t_ours = time.time() - t0
    del scorer
    print(f"ours: {t_ours:.0f}s", flush=True)

    t0 = time.time()
    lm = run_lm_eval(tasks, model="hf", pretrained=model_path, dtype="float32", batch_size=args.batch_size,
                     log_samples=True, bootstrap_iters=0, random_seed=args.seed)
    t_lm = time.time() - t0
    print(f"lm-eval: {t_lm:.0f}s", flush=True)

    rows, ok = [], True
    details = []
    for t in tasks:
        name = f"s3t_{t.name}"
        lres = lm["results"][name]
        ores = ours["tasks"][t.name]["scorers"]["hf"]
        # per-request log-likelihoods and per-item predictions
        our_samples = {s["index"]: s for s in ours["samples"][t.name]}
        max_dll, n_req_cmp, disagree = 0.0, 0, {m: 0 for m in t.metrics}
        items = {it.index: it for it in t.items}
        for s in lm["samples"][name]:
            idx = s["doc"]["doc_index"]
            lm_lls = [float(r[0]) for r in s["filtered_resps"]]
            o_lls = our_samples[idx]["lls"]["hf"]
            for a, b in zip(lm_lls, o_lls):
                max_dll = max(max_dll, abs(a - b))
                n_req_cmp += 1
            for m in t.metrics:
                if float(s[m]) != float(_our_item_metric(items[idx], o_lls, m)):
                    disagree[m] += 1
        for m in t.metrics:
            a, b = 100 * ores[m], 100 * float(lres[f"{m},none"])
            diff = a - b
            ok &= abs(diff) <= TOLERANCE
            rows.append((t.name, len(t), m, a, b, diff, disagree[m]))
        details.append((t.name, n_req_cmp, max_dll))

    lines = [
        "# lm-eval cross-check",
        "",
        f"Model: `{args.model}` ({model_path}), float32, no adapter. Items: a seeded random subset "
        f"(seed {args.seed}) of each task (n below), identical for both sides: lm-eval reads the rendered "
        "items through `export_lm_eval_task` (`dataset_path: json`) and scores them with `model=\"hf\"`.",
        f"Command: `python benchmarks/lm_eval_crosscheck.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads. lm-eval {_version('lm_eval')}, transformers {_version('transformers')}.",
        "",
        "| task | n | metric | ours (HFScorer) | lm-eval | diff (points) | items predicted differently |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, n, m, a, b, d, dis in rows:
        lines.append(f"| {name} | {n} | {m} | {a:.2f} | {b:.2f} | {d:+.2f} | {dis} |")
    lines += ["", "| task | requests compared | max abs log-likelihood difference |", "|---|---|---|"]
    for name, nr, dll in details:
        lines.append(f"| {name} | {nr} | {dll:.2e} |")
    lines += ["", f"Wall time: ours {t_ours:.0f} s, lm-eval {t_lm:.0f} s (incl. model load).",
              f"Verdict: {'PASS' if ok else 'FAIL'} (all metric differences within {TOLERANCE} point).", ""]
    C.write_result("\n".join(lines), args.out)
    return 0 if ok else 1


def _our_item_metric(item, lls, metric) -> int:
    from s3t_llm.evaluation import item_predictions

    return int(item_predictions(item, lls)[metric] == item.gold)


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
