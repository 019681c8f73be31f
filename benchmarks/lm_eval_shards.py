"""Per-shard scores of a run against lm-eval's own run of each served adapter, and the ensemble from them.

For every live shard of RUN, its served prefix adapter is scored offline in float32 twice on the very task
YAMLs of ``eval/lm_tasks`` (lm-eval's own ``limit``: the first N docs of each task):

- ours: ``s3t_llm.evaluation.evaluate`` with an ``HFScorer`` (transformers + PEFT), the path ``s3t eval
  --backend offline`` takes;
- lm-eval's: ``lm_eval.simple_evaluate(model="hf", model_args="pretrained=BASE,peft=ADAPTER,dtype=float32")``,
  i.e. ``lm_eval --model hf --model_args pretrained=BASE,peft=ADAPTER_DIR ...``.

It prints and writes, per task and shard, acc / acc_norm of both, the items predicted differently and the
largest per-choice log-likelihood difference; then the shard ensemble (the average over shards of each item's
choice probabilities) computed from our log-likelihoods and from lm-eval's.

    python benchmarks/lm_eval_shards.py runs/smollm2-cpu --items 100 --threads 1
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a trained run directory (its live shards' served adapters are scored)")
    ap.add_argument("--tasks", nargs="+", default=TASKS)
    ap.add_argument("--items", type=int, default=100, help="lm-eval's limit: the first N docs of each task")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_eval_shards.md"))
    args = ap.parse_args(argv)

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from s3t_llm.deletion import serving_plan
    from s3t_llm.evaluation import HFScorer, evaluate, item_predictions, lm_tasks
    from s3t_llm.evaluation.ensemble import _argmax, ensemble_probs
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

    t0 = time.time()
    scorers = {s: HFScorer.from_pretrained(base, adapter=p, dtype="float32", batch_size=args.batch_size)
               for s, p in adapters.items()}
    ours = evaluate(scorers, tasks, return_samples=True)
    t_ours = time.time() - t0
    del scorers
    print(f"ours: {t_ours:.0f} s", flush=True)

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

    rows, ens_rows, ok, worst_all = [], [], True, 0.0
    for t in tasks:
        items = {it.index: it for it in t.items}
        mine = {s["index"]: s["lls"] for s in ours["samples"][t.name]}
        lm_lls = {s: {x["doc_id"]: [float(r[0]) for r in x["filtered_resps"]] for x in theirs[s]["samples"][t.name]}
                  for s in adapters}
        for s in adapters:
            assert sorted(lm_lls[s]) == sorted(mine), (t.name, s)
            worst = max(abs(a - b) for i in mine for a, b in zip(mine[i][s], lm_lls[s][i]))
            worst_all = max(worst_all, worst)
            res = theirs[s]["results"][t.name]
            for m in ("acc", "acc_norm"):
                if f"{m},none" not in res:
                    continue
                a = 100 * ours["tasks"][t.name]["scorers"][s][m]
                b = 100 * float(res[f"{m},none"])
                differ = sum(int(item_predictions(items[i], mine[i][s])[m] != item_predictions(items[i], lm_lls[s][i])[m])
                             for i in mine)
                ok &= abs(a - b) < 1e-9 and worst < LL_TOLERANCE  # k/n vs lm-eval's mean: float rounding
                rows.append([t.name, len(t), s, m, f"{a:.2f}", f"{b:.2f}", differ, f"{worst:.1e}"])
        if len(adapters) > 1:
            for m in ("acc", "acc_norm"):
                from_lm = 100 * sum(int(_argmax(ensemble_probs(items[i], [lm_lls[s][i] for s in adapters])[m])
                                        == items[i].gold) for i in mine) / len(mine)
                a = 100 * ours["tasks"][t.name]["ensemble"][m]
                ok &= abs(a - from_lm) < 1e-9
                ens_rows.append([t.name, len(t), m, f"{a:.2f}", f"{from_lm:.2f}"])

    cmd = "python benchmarks/lm_eval_shards.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Per-shard scores against lm-eval's own hf+peft run, and the shard ensemble", "",
             f"Run `{run.config.name}` ({run.shards} shards x {run.config.s3t.slices} slices, B={len(run.sequences)}), "
             f"base `{base}`, served prefixes "
             + ", ".join(f"shard {s}: depth {e['depth']}" for s, e in sorted(plan.items()) if e) + ". "
             f"Tasks: the `eval/lm_tasks` YAMLs, lm-eval's own `limit={args.items}` (the first docs) on both sides; "
             "float32 on CPU.", f"Command: `{cmd}`", f"Machine: {C.machine()}; lm-eval "
             f"{_version('lm_eval')}, transformers {_version('transformers')}, peft {_version('peft')}.", "",
             "## Per shard", "",
             C.md_table(["task", "n", "shard", "metric", "ours (HFScorer+PEFT)", "lm-eval hf+peft",
                         "items predicted differently", "max per-choice log-likelihood diff"], rows), ""]
    if ens_rows:
        lines += ["## The shard ensemble (average of the shards' choice probabilities)", "",
                  C.md_table(["task", "n", "metric", "from our log-likelihoods", "from lm-eval's log-likelihoods"],
                             ens_rows), ""]
    lines += [f"Wall time: ours {t_ours:.0f} s (all shards), lm-eval {t_lm:.0f} s (one run per shard), model loads "
              "included.",
              f"Largest per-choice log-likelihood difference over everything: {worst_all:.1e} (tolerance "
              f"{LL_TOLERANCE:g}: the same items, fp32, lm-eval pads its batches differently).",
              f"Verdict: {'PASS' if ok else 'FAIL'} (every accuracy equal, every ensemble equal, every "
              "log-likelihood within tolerance).", ""]
    C.write_result("\n".join(lines), args.out)
    return 0 if ok else 1


def _version(pkg: str) -> str:
    from importlib.metadata import version

    try:
        return version(pkg)
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    sys.exit(main())
