"""The main job (``s3t demo``): simulate, train the CPU default recipe, serve it, delete, evaluate.

Reads top to bottom like a recipe: load -> plan -> train stages -> export adapters -> serve -> delete.
Every step reuses what a previous invocation finished (training resumes at the first unfinished stage).
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from .paths import REPO_ROOT

DEFAULT_RECIPE = REPO_ROOT / "recipes" / "cpu_smollm2.yaml"


def _banner(text: str) -> None:
    print(f"\n== {text} ==", flush=True)


def pick_deletions(run, n: int, seed: int = 0) -> list[list[str]]:
    """A deletion list for the demo: n single-sample requests, then a repeat of the first (a no-op)."""
    from .run import DATASET

    with run.ledger() as led:
        live = sorted(sid for s in range(run.shards) for sl in range(run.config.s3t.slices)
                      for sid, _ in led.slice_samples(DATASET, s, sl))
    rng = random.Random(seed)
    picks = rng.sample(live, n)
    return [[p] for p in picks] + [[picks[0]]]


def run_demo(recipe: str | None = None, overrides: list[str] | None = None, *, trials: int = 2000,
             plot: str = "simulate.png", n_deletions: int = 3, port: int | None = None,
             simulate_only: bool = False, evaluate: bool = True, eval_limit: int = 20) -> int:
    import requests

    from .config import load_config
    from .deletion import publish
    from .run import Run
    from .serving import free_port, spawn_server, stop_server
    from .simulator import default_report
    from .training import train_run

    _banner("1. deletion-rate simulator: requests served before retraining, S3T vs SISA")
    print(default_report(n_trials=trials, seed=0, out_png=plot))
    print(f"plot: {Path(plot).resolve()}")
    if simulate_only:
        return 0

    _banner("2. S3T training (CPU default recipe; resumes where a previous run stopped)")
    cfg = load_config(recipe or DEFAULT_RECIPE, overrides or [])
    run = Run.create(cfg)
    t0 = time.perf_counter()
    summary = train_run(run)
    routing, _ = publish(run)
    print(f"trained {summary['stages_trained']} stages, reused {summary['stages_reused']}, "
          f"in {time.perf_counter() - t0:.0f} s; run at {run.dir.resolve()}")
    for s, e in sorted(routing.items()):
        print(f"  shard {s}: {e['name']} (blocks 1..{e['depth']})" if e else f"  shard {s}: no surviving prefix")

    _banner("3. serving on vLLM multi-LoRA behind the S3T gateway")
    proc, url, token, _ = spawn_server(run.dir, port or free_port())
    try:
        prompt = "Below is an instruction that describes a task. Write a response that appropriately completes " \
                 "the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"
        r = requests.post(f"{url}/v1/completions", json={"model": run.config.name, "prompt": prompt,
                                                         "max_tokens": 48, "temperature": 0}, timeout=300)
        print(f"  {r.headers.get('x-s3t-adapter')} answers: {r.json()['choices'][0]['text'].strip()[:200]!r}")

        _banner(f"4. applying a deletion list of {n_deletions + 1} requests through the gateway, "
                "evaluating the served model after each (zero-shot ARC-Easy + PIQA subsets, held-out loss)")
        deletions = pick_deletions(run, n_deletions)
        (run.dir / "demo_deletions.json").write_text(json.dumps(deletions, indent=1))
        from .experiment import ScoreCache

        scores = ScoreCache(None)  # by adapter content, in memory: an adapter a deletion left alone is not re-scored
        evals = [_evaluate(run, url, url, 0, eval_limit, cache=scores)] if evaluate else []
        base_ref = evals[0] if evals else None
        for step, ids in enumerate(deletions, start=1):
            t1 = time.perf_counter()
            r = requests.post(f"{url}/s3t/delete", json={"ids": ids},
                              headers={"Authorization": f"Bearer {token}"}, timeout=600)
            body = r.json()
            wall = time.perf_counter() - t1
            if r.status_code != 200:
                print(f"  {ids}: error {body['error']['message']}")
                continue
            what = "; ".join(f"shard {c['shard']}: depth {c['from_depth']} -> {c['to_depth'] or 0}"
                             for c in body["served_changes"]) or ("no-op (already deleted)" if body["noop"]
                                                                 else "served adapters unaffected")
            print(f"  delete {ids[0]}: {what}; effective in {body['deletion_to_effect_seconds']:.2f} s "
                  f"(HTTP round trip {wall:.2f} s); certificate {body['certificate']}")
            if evaluate:
                evals.append(_evaluate(run, url, None, step, eval_limit, base_ref, cache=scores))
        st = requests.get(f"{url}/s3t/state", headers={"Authorization": f"Bearer {token}"}, timeout=60).json()
        print("  served now: " + ", ".join(f"shard {s['shard']} depth {s['depth']}" for s in st["shards"]))
        print(f"  engine adapter ids: {st.get('engine_adapter_ids')}  loaded: {st.get('adapters_loaded')}")
        _banner("5. `s3t verify`: an independent audit of the run and of what the server serves")
        from .verify import verify_run

        audit = verify_run(run.dir, source=run.info.get("source"), echo=lambda m: print("  " + m))
        (run.dir / "verify_report.json").write_text(json.dumps(audit, indent=2))
        print(f"  verify: {'PASS' if not audit['problems'] else 'FAIL'}: {audit['checks']} checks, "
              f"{len(audit['problems'])} problem(s)" + "".join(f"\n    problem: {p}" for p in audit["problems"]))
        if evals:
            _banner("6. evaluation after each deletion")
            report = write_report(run, evals)
            print(f"report: {(report / 'report.md').resolve()}\nplot: {(report / 'quality_vs_deletions.png').resolve()}")
    finally:
        stop_server(proc)
    print(f"\ndone. run: {run.dir.resolve()}")
    return 0


def _evaluate(run, url: str, base_url: str | None, step: int, limit: int, base: dict | None = None,
              cache=None) -> dict:
    """Zero-shot ensemble scores and held-out loss of the served run, with the base model as reference
    (scored once, at step 0, and carried over: it does not change)."""
    from .evaluation import evaluate_served

    t0 = time.perf_counter()
    res = evaluate_served(run, url, tasks=("arc_easy", "piqa"), limit=limit, heldout=16, base_url=base_url,
                          cache=cache)
    if base:
        for t, v in base["tasks"].items():
            carried = ("base_acc", "base_acc_norm", "base_acc_stderr")
            res["tasks"].setdefault(t, {}).update({k: v[k] for k in carried if k in v})
        res["heldout"]["base"] = base["heldout"].get("base")
        res["heldout"]["base_stderr"] = base["heldout"].get("base_stderr")
    res["requests"] = step
    res["seconds"] = round(time.perf_counter() - t0, 1)
    scores = ", ".join(f"{t} {100 * v['acc']:.1f}% (base {100 * v['base_acc']:.1f}%)"
                       for t, v in res["tasks"].items() if "acc" in v)
    h = res["heldout"]
    loss = f"held-out loss {h['mean']:.3f} (base {h['base']:.3f})" if h.get("mean") is not None else "no live shard"
    print(f"    after {step} request(s): {scores or 'no live shard'}; {loss}; depths {res['depths']} "
          f"[{res['seconds']} s" + (f", {res['cache']['hits']} scores reused, {res['cache']['misses']} computed"
                                   if "cache" in res else "") + "]", flush=True)
    return res


def write_report(run, evals: list[dict]) -> Path:
    """JSONL of the measurements, a plot of quality against deletions (every point with its standard error,
    :mod:`s3t_llm.evaluation.report`, as the deletion-stream experiment draws it) and a markdown report."""
    from .evaluation.report import Reference, Series, acc_cell, loss_cell, plot_quality

    out = run.dir / "report"
    out.mkdir(exist_ok=True)
    (out / "deletion_stream.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    tasks = sorted({t for e in evals for t in e["tasks"]})
    points = [{"requests": e["requests"], "depth": sum(e["depths"]) / max(1, len(e["depths"])),
               "tasks": e["tasks"], "heldout_loss": e["heldout"].get("mean"),
               "heldout_loss_stderr": e["heldout"].get("mean_stderr")} for e in evals]
    refs = []
    if evals:
        first = evals[0]
        base_tasks = {t: {"acc": v.get("base_acc"), "acc_stderr": v.get("base_acc_stderr")}
                      for t, v in first["tasks"].items() if "base_acc" in v}
        if base_tasks or first["heldout"].get("base") is not None:
            refs.append(Reference("base, no fine-tuning", base_tasks, first["heldout"].get("base"),
                                  first["heldout"].get("base_stderr")))
    plot_quality(out / "quality_vs_deletions.png", [Series("S3T served (ensemble; loss: mean over shards)", points)],
                 tasks, refs)
    lines = ["# Deletion stream: quality of the served S3T model after each request", "",
             f"Run `{run.config.name}` ({run.shards} shards x {run.config.s3t.slices} slices, "
             f"B={len(run.sequences)}), base `{run.model_path}`. Accuracies in % ± lm-eval's standard error; "
             "held-out loss per token ± its standard error.", "",
             "| requests | served depths | " + " | ".join(f"{t} acc (base)" for t in tasks) + " | held-out loss (base) |",
             "|---|---|" + "---|" * len(tasks) + "---|"]
    for e in evals:
        cells = []
        for t in tasks:
            v = e["tasks"].get(t, {})
            base = {"acc": v.get("base_acc"), "acc_stderr": v.get("base_acc_stderr")}
            cells.append(f"{acc_cell(v)} ({acc_cell(base)})" if "acc" in v else "n/a")
        h = e["heldout"]
        loss = (f"{loss_cell(h['mean'], h.get('mean_stderr'))} ({loss_cell(h.get('base'), h.get('base_stderr'))})"
                if h.get("mean") is not None else "n/a (no live shard)")
        lines.append(f"| {e['requests']} | {e['depths']} | " + " | ".join(cells) + f" | {loss} |")
    lines += ["", "![quality vs deletions](quality_vs_deletions.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
