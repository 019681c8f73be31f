"""The main job (``s3t demo``): simulate, train the CPU default recipe, serve it, delete, evaluate.

Reads top to bottom like a recipe: load -> plan -> train stages -> export adapters -> serve -> delete.
Every step reuses what a previous invocation finished (training resumes at the first unfinished stage).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
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


def start_serving(run_dir: Path, port: int) -> tuple[subprocess.Popen, str, str]:
    import requests

    log = open(run_dir / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "s3t_llm.cli", "serve", str(run_dir), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"s3t serve exited early; see {run_dir / 'serve.log'}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.time() - t0 > 600:
            proc.kill()
            raise RuntimeError("s3t serve not ready after 600 s")
        time.sleep(1)
        if int(time.time() - t0) % 15 == 0:
            print(f"  waiting for vLLM + gateway ... {time.time() - t0:.0f} s", flush=True)
    token = json.loads((run_dir / "serve.json").read_text())["token"]
    print(f"  gateway ready at {url} after {time.time() - t0:.0f} s", flush=True)
    return proc, url, token


def run_demo(recipe: str | None = None, overrides: list[str] | None = None, *, trials: int = 2000,
             plot: str = "simulate.png", n_deletions: int = 3, port: int | None = None,
             simulate_only: bool = False, evaluate: bool = True) -> int:
    import requests

    from .config import load_config
    from .deletion import publish
    from .run import Run
    from .serving import free_port
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
    proc, url, token = start_serving(run.dir, port or free_port())
    try:
        prompt = "Below is an instruction that describes a task. Write a response that appropriately completes " \
                 "the request.\n\n### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"
        r = requests.post(f"{url}/v1/completions", json={"model": run.config.name, "prompt": prompt,
                                                         "max_tokens": 48, "temperature": 0}, timeout=300)
        print(f"  {r.headers.get('x-s3t-adapter')} answers: {r.json()['choices'][0]['text'].strip()[:200]!r}")

        _banner(f"4. applying a deletion list of {n_deletions + 1} requests through the gateway")
        deletions = pick_deletions(run, n_deletions)
        (run.dir / "demo_deletions.json").write_text(json.dumps(deletions, indent=1))
        evals = []
        for ids in deletions:
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
                evals.append(_evaluate_served(run, url))
        st = requests.get(f"{url}/s3t/state", timeout=60).json()
        print("  served now: " + ", ".join(f"shard {s['shard']} depth {s['depth']}" for s in st["shards"]))
        print(f"  engine adapter ids: {st['engine_adapter_ids']}  loaded: {st['adapters_loaded']}")
        if evals:
            (run.dir / "demo_eval.json").write_text(json.dumps(evals, indent=1))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"\ndone. run: {run.dir.resolve()}")
    return 0


def _evaluate_served(run, url: str) -> dict:
    """Held-out loss of the served model after a deletion (the evaluation harness, when present)."""
    try:
        from .evaluation import heldout_loss_served  # provided by the evaluation harness
    except ImportError:
        return {}
    res = heldout_loss_served(run, url)
    print(f"    held-out loss {res}")
    return res


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo())
