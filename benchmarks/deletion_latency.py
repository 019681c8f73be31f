"""Deletion-to-effect latency of a served S3T run, against SISA and full retraining; gateway throughput.

    .venv/bin/python benchmarks/deletion_latency.py            # builds benchmarks/runs/<name> first (~10 min)
    .venv/bin/python benchmarks/deletion_latency.py --run benchmarks/runs/smollm2-dl   # reuse a built run

What it does, in one invocation (the machine is shared and noisy, so everything is measured side by side):

1. Build (or reuse with ``--run``) an S3T run of SmolLM2-135M-Instruct on a seeded Alpaca subset (default
   m=4 shards, L=3 slices, B=3 cyclic sequences, 8 samples per cell, LoRA on the top 6 layers). The wall time
   of that build is a real full retraining (every stage of every shard from nothing) and is kept in
   ``<run>/bench_build.json`` so that a later ``--run`` reuses the measurement.
   The built run is never modified: serving and deletions work on a copy (``<run>.serving``), SISA on copies
   of a B=1 run (``<name>-sisa``) whose blocks are those of sequence 0 of the main run (same ledger).
2. Serve the copy with ``s3t serve`` (a subprocess: vLLM + gateway on free ports).
3. Throughput: the gateway (``model=<run name>``, hash-routed over the m shard adapters) against vLLM serving
   the base model alone (vLLM's own port, ``model=<base path>``): same prompts (held-out Alpaca prompts), same
   ``max_tokens`` with ``ignore_eos`` (every request generates exactly max_tokens), same concurrency;
   interleaved base, gateway, base, gateway, ... after an untimed warm-up of each.
4. Deletions: N single-sample requests drawn uniformly (seeded) from the live samples, sent one after the other
   to ``POST /s3t/delete`` while a light client load runs through the gateway. Per request: HTTP wall time
   (sent -> response) and the certificate's ``deletion_to_effect_seconds`` (received -> no served adapter
   depends on the sample), whether the served routing changed, shards that died.
5. SISA (= S3T with B=1: one sequence per shard, a block per slice, block k trained on slices 1..k): on a copy of
   the B=1 run, ``apply_deletion(..., backend=None)`` then ``train_run(run, shards=[s])`` (the blocks from the
   hit slice on are retrained) then ``publish``; one deletion per slice position (stratified: with equal slices
   this is the expected cost of a uniformly drawn deletion), each on a different shard.
6. Full retraining: every stage of every shard of the B=3 run, measured (the build, or ``--measure-full``:
   ``train_run`` on a copy with every block removed), else extrapolated from the stored per-stage seconds.

Prints Markdown and writes it to ``benchmarks/results/deletion_latency.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import shlex
import shutil
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD_FILE = "bench_build.json"


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=None, help="reuse this built run directory (not modified)")
    ap.add_argument("--name", default=None, help="run name when building (default: smollm2-dl-m{m}L{L}B{B}-n{limit})")
    ap.add_argument("--runs-dir", default=str(BENCH / "runs"), help="where runs and their copies are written")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--budget", type=int, default=3)
    ap.add_argument("--limit", type=int, default=48, help="training samples (data.limit)")
    ap.add_argument("--heldout", type=int, default=32, help="held-out records (throughput prompts)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6, help="LoRA on the top N layers")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--deletions", type=int, default=20)
    ap.add_argument("--gap", type=float, default=0.5, help="seconds between deletion requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-clients", type=int, default=1, help="clients sending requests during deletions (0: none)")
    ap.add_argument("--sisa-deletions", type=int, default=None, help="default: one per slice position (L)")
    ap.add_argument("--measure-full", action="store_true", help="measure a full retraining even when reusing --run")
    ap.add_argument("--tp-clients", type=int, default=4)
    ap.add_argument("--tp-requests", type=int, default=32)
    ap.add_argument("--tp-tokens", type=int, default=32)
    ap.add_argument("--tp-rounds", type=int, default=2, help="timed (base, gateway) pairs")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--tp-direct", action="store_true",
                    help="also time the same adapters on vLLM's own port (separates gateway overhead from LoRA cost)")
    ap.add_argument("--skip-sisa", action="store_true")
    ap.add_argument("--port", type=int, default=None, help="gateway port (default: a free one)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads for training (1 is much faster on a shared, oversubscribed machine)")
    ap.add_argument("--out", default=str(C.RESULTS / "deletion_latency.md"))
    ap.add_argument("--guarantees", action="store_true",
                    help="only the serving-guarantees comparison (cut vs drain, idle and under load); see guarantees_bench")
    ap.add_argument("--load-tokens", type=int, default=64, help="--guarantees: tokens per load request")
    ap.add_argument("--replicas-bench", action="store_true",
                    help="only the replicas comparison (1 vs 2 vLLM replicas, idle and under load) and the latency "
                         "the gateway adds per request; see replicas_bench")
    ap.add_argument("--overhead-requests", type=int, default=100, help="--replicas-bench: pairs for the added latency")
    ap.add_argument("--g-deletions", type=int, default=8, help="--guarantees: deletions per cell")
    ap.add_argument("--g-rounds", type=int, default=1, help="--guarantees: rounds of the four cells")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only re-render the Markdown from a results JSON written by an earlier invocation")
    return ap


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(xs: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(xs, dtype=float), q)) if xs else float("nan")


def fmt(x: float, nd: int = 2) -> str:
    return "n/a" if x != x else f"{x:.{nd}f}"


# ----- runs -------------------------------------------------------------------------------------------
def overrides(args, name: str, budget: int) -> list[str]:
    return [f"name={name}", f"output_dir={args.runs_dir}", f"model.name={args.model}", "model.precision=fp32",
            f"data.limit={args.limit}", f"data.heldout={args.heldout}", f"data.max_length={args.max_length}",
            f"s3t.shards={args.shards}", f"s3t.slices={args.slices}", f"s3t.budget={budget}", "s3t.method=cyclic",
            f"s3t.seed={args.seed}", f"lora.layers={args.layers}", f"train.epochs={args.epochs}",
            f"train.batch_size={args.batch_size}", "train.logging_steps=1000"]


def build_run(args):
    """The pristine B=budget run: built (timed: a full retraining) or reopened."""
    from s3t_llm.config import load_config
    from s3t_llm.deletion import publish
    from s3t_llm.run import Run
    from s3t_llm.training import train_run

    if args.run:
        run = Run.open(args.run)
    else:
        run = Run.create(load_config(REPO / "recipes" / "cpu_smollm2.yaml", overrides(args, args.name, args.budget)))
    t0 = time.perf_counter()
    summary = train_run(run, progress=True)
    wall = time.perf_counter() - t0
    if summary["stages_trained"]:
        publish(run)
    bf = run.dir / BUILD_FILE
    if summary["stages_trained"] == summary["stages_total"]:  # everything trained now: a full retraining
        (run.dir / BUILD_FILE).write_text(json.dumps({"wall_seconds": wall, "summary": summary,
                                                      "date": datetime.now().isoformat(timespec="seconds")}, indent=2))
        log(f"built {run.dir}: {summary['stages_trained']} stages in {wall:.0f} s")
    elif summary["stages_trained"]:
        log(f"resumed {run.dir}: trained {summary['stages_trained']} of {summary['stages_total']} stages")
        bf.unlink(missing_ok=True)  # a partial build is no full-retraining measurement
    else:
        log(f"reusing {run.dir}: all {summary['stages_total']} stages present")
    return run


def copy_run(src: Path, dst: Path):
    from s3t_llm.run import Run

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("serve.json", "serve*.log", "vllm.log", ".trainer-*",
                                                             "certificates", BUILD_FILE))
    return Run.open(dst)


def build_sisa(args, run):
    """The B=1 run (SISA in S3T terms) on the same data; its blocks are copied from sequence 0 of ``run``."""
    from s3t_llm.config import RunConfig, load_config
    from s3t_llm.run import Run
    from s3t_llm.training import stage_plan, train_run

    data = dict(run.config.to_dict())
    data["name"] = f"{run.config.name}-sisa"
    data["output_dir"] = str(run.dir.parent)
    data["s3t"] = dict(data["s3t"], budget=1)
    cfg: RunConfig = load_config(data)
    sisa = Run.create(cfg)
    assert sisa.sequences == [run.sequences[0]], (sisa.sequences, run.sequences)
    if sisa.slice_hashes() == run.slice_hashes():
        for shard, prefix in stage_plan(sisa):
            if not sisa.block_is_valid(shard, prefix) and run.block_is_valid(shard, prefix):
                dst = sisa.store.block_dir(shard, prefix)
                if dst.exists():
                    shutil.rmtree(dst)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(run.store.block_dir(shard, prefix), dst)
    else:
        log("the B=1 run's ledger differs from the main run's: training it")
    s = train_run(sisa, progress=False)
    log(f"SISA (B=1) run {sisa.dir}: {s['stages_reused']} stages copied/reused, {s['stages_trained']} trained")
    return sisa


# ----- serving -----------------------------------------------------------------------------------------
def start_server(run_dir: Path, port: int, timeout: float = 900):
    from s3t_llm.serving import spawn_server

    t0 = time.perf_counter()
    proc, url, _, _ = spawn_server(run_dir, port, timeout=timeout, echo=lambda m: None, log_name="serve-bench.log")
    info = json.loads((run_dir / "serve.json").read_text())
    return proc, url, info, time.perf_counter() - t0


def load_round(base_url: str, model, prompts: list[str], n_req: int, clients: int, max_tokens: int) -> dict:
    """``n_req`` completions with ``clients`` concurrent clients; tokens = usage.completion_tokens.

    ``model``: a name, or a function of the request index (the prompt is ``prompts[i % len(prompts)]``)."""
    import httpx

    lock = threading.Lock()
    todo = list(range(n_req))
    res: list[dict] = []

    def client():
        with httpx.Client(base_url=base_url, timeout=600) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop(0)
                body = {"model": model(i) if callable(model) else model, "prompt": prompts[i % len(prompts)],
                        "max_tokens": max_tokens,
                        "temperature": 0, "ignore_eos": True}
                t0 = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                dt = time.perf_counter() - t0
                j = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
                with lock:
                    res.append({"i": i, "status": r.status_code, "seconds": dt,
                                "tokens": (j.get("usage") or {}).get("completion_tokens", 0),
                                "shard": r.headers.get("x-s3t-shard"), "adapter": r.headers.get("x-s3t-adapter")})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in res)
    shards: dict = {}
    for r in res:
        shards[r["shard"]] = shards.get(r["shard"], 0) + 1
    return {"wall": wall, "tokens": tokens, "tok_s": tokens / wall, "ok": sum(r["status"] == 200 for r in res),
            "n": len(res), "latency_p50": pct([r["seconds"] for r in res], 50), "shards": shards,
            "adapters": {r["i"]: r["adapter"] for r in res}}


def throughput(args, url: str, info: dict, run, prompts: list[str]) -> dict:
    # vLLM listens on a private Unix socket (issue 11): the base model is reached through the gateway.
    base_url, base_model, gw_model = url, run.model_path, run.config.name
    kw = dict(n_req=args.tp_requests, clients=args.tp_clients, max_tokens=args.tp_tokens)
    log("throughput: warm-up (untimed)")
    load_round(base_url, base_model, prompts, n_req=2 * args.tp_clients, clients=args.tp_clients, max_tokens=8)
    # The gateway warm-up covers every request index: it also tells which adapter serves each prompt, so that
    # the "vLLM direct" target sends the same prompt to the same adapter without the gateway in between.
    warm = load_round(url, gw_model, prompts, n_req=args.tp_requests, clients=args.tp_clients, max_tokens=4)
    routed = warm["adapters"]
    targets = [("base (vLLM, no adapter)", base_url, base_model)]
    if args.tp_direct:
        targets.append(("vLLM direct (same adapters, no gateway)", base_url, lambda i: routed[i]))
    targets.append(("gateway (m adapters)", url, gw_model))
    rounds = []
    for r in range(args.tp_rounds):
        for label, u, m in targets:
            out = load_round(u, m, prompts, **kw)
            out.pop("adapters")
            out.update(label=label, round=r + 1)
            rounds.append(out)
            log(f"throughput {label} round {r + 1}: {out['tok_s']:.1f} tok/s ({out['tokens']} tokens, "
                f"{out['wall']:.1f} s, {out['ok']}/{out['n']} ok, shards {out['shards']})")
    return {"rounds": rounds}


class LightLoad:
    """Clients sending short completions through the gateway (model=<run name>) until stopped."""

    def __init__(self, url: str, model: str, prompts: list[str], clients: int):
        self.url, self.model, self.prompts = url, model, prompts
        self.stop = threading.Event()
        self.results: list[tuple[float, int, str | None]] = []
        self.errors: dict[tuple[int, str], int] = {}
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]

    def client(self, i: int) -> None:
        import httpx

        j = 0
        with httpx.Client(base_url=self.url, timeout=600) as c:
            while not self.stop.is_set():
                t0 = time.time()
                try:
                    r = c.post("/v1/completions", json={"model": self.model, "prompt": self.prompts[(i + j) % len(self.prompts)],
                                                        "max_tokens": 8, "temperature": 0})
                    if r.status_code != 200:
                        msg = (r.json().get("error") or {}).get("message", "")[:120]
                        self.errors[(r.status_code, msg)] = self.errors.get((r.status_code, msg), 0) + 1
                        time.sleep(0.2)  # no live shard left: do not spin
                    self.results.append((t0, r.status_code, r.headers.get("x-s3t-adapter")))
                except httpx.HTTPError:
                    self.results.append((t0, -1, None))
                j += 1

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=300)


def deletion_stream(args, url: str, info: dict, run, prompts: list[str]) -> dict:
    import httpx

    from s3t_llm.run import DATASET

    with run.ledger() as led:
        cells = {sid: (s, sl) for s in range(run.shards) for sl in range(run.config.s3t.slices)
                 for sid, _ in led.slice_samples(DATASET, s, sl)}
    live = sorted(cells)
    picks = random.Random(args.seed).sample(live, min(args.deletions, len(live)))
    headers = {"Authorization": f"Bearer {info['token']}"}
    rows, effect_at = [], []
    load = LightLoad(url, run.config.name, prompts, args.load_clients)
    with httpx.Client(base_url=url, timeout=3600) as c, load:
        time.sleep(1.0)
        for i, sid in enumerate(picks):
            t0 = time.perf_counter()
            r = c.post("/s3t/delete", json={"ids": [sid], "request_id": f"bench-{i:03d}-{sid}"}, headers=headers)
            wall = time.perf_counter() - t0
            effect_at.append(time.time())
            if r.status_code != 200:
                raise RuntimeError(f"deletion {sid} failed: {r.status_code} {r.text[:500]}")
            b = r.json()
            sw = b.get("switch_report") or {}
            rows.append({"i": i + 1, "sample": sid, "cell": cells[sid], "http_seconds": wall,
                         "effect_seconds": b["deletion_to_effect_seconds"], "changes": b["served_changes"],
                         "dead_shards": b["dead_shards"], "noop": b["noop"],
                         "switch_seconds": sw.get("total_seconds"), "loaded": len(sw.get("loaded", [])),
                         "removed": len(sw.get("removed", []))})
            ch = "; ".join(f"shard {x['shard']}: depth {x['from_depth']} -> {x['to_depth'] or 'dead'}" for x in b["served_changes"])
            log(f"deletion {i + 1}/{len(picks)} {sid} cell {cells[sid]}: http {wall:.3f} s, effect "
                f"{b['deletion_to_effect_seconds']:.3f} s, {ch or 'no served adapter changed'}")
            time.sleep(args.gap)
        time.sleep(1.0)
        state = c.get("/s3t/state", headers=headers).json()
    codes: dict = {}
    for _, code, _ in load.results:
        codes[str(code)] = codes.get(str(code), 0) + 1
    all_dead_at = next((t for t, r in zip(effect_at, rows) if len(r["dead_shards"]) == run.shards), None)
    before = [code for t0, code, _ in load.results if all_dead_at is None or t0 < all_dead_at]
    return {"rows": rows, "load_codes": codes, "load_n": len(load.results), "state": state,
            "load_errors": [{"status": k[0], "message": k[1], "n": v} for k, v in load.errors.items()],
            "load_before_all_dead": {str(c): before.count(c) for c in sorted(set(before))}}


# ----- SISA and full retraining --------------------------------------------------------------------------
def sisa_measure(args, sisa_pristine) -> list[dict]:
    from s3t_llm.deletion import apply_deletion, publish
    from s3t_llm.run import DATASET
    from s3t_llm.training import train_run

    work = copy_run(sisa_pristine.dir, sisa_pristine.dir.parent / f"{sisa_pristine.dir.name}.work")
    seq = work.sequences[0]
    L = len(seq)
    n = args.sisa_deletions or L
    rng = random.Random(args.seed + 1)
    shards = rng.sample(range(work.shards), min(work.shards, n))
    out = []
    for i in range(n):
        pos = i % L
        shard = shards[i % len(shards)]
        with work.ledger() as led:
            victim = rng.choice([sid for sid, _ in led.slice_samples(DATASET, shard, seq[pos])])
        t0 = time.perf_counter()
        apply_deletion(work, [victim], backend=None, request_id=f"sisa-{i:03d}")
        t1 = time.perf_counter()
        summary = train_run(work, shards=[shard], progress=False)
        t2 = time.perf_counter()
        publish(work)
        t3 = time.perf_counter()
        row = {"shard": shard, "slice": seq[pos], "position": pos + 1, "stages": summary["stages_trained"],
               "apply_s": t1 - t0, "train_wall_s": t2 - t1, "train_inner_s": summary["seconds"],
               "publish_s": t3 - t2, "total_s": t3 - t0}
        out.append(row)
        log(f"SISA deletion {i + 1}/{n}: shard {shard} slice {seq[pos]} (position {pos + 1}/{L}): "
            f"{row['stages']} stages retrained, total {row['total_s']:.1f} s")
    return out


def full_retrain(args, run) -> dict:
    """Measured (build of this or an earlier invocation, or --measure-full), else extrapolated."""
    from s3t_llm.training import stage_plan, train_run

    bf = run.dir / BUILD_FILE
    if args.measure_full:
        work = copy_run(run.dir, run.dir.parent / f"{run.dir.name}.full")
        shutil.rmtree(work.store.blocks_dir, ignore_errors=True)
        shutil.rmtree(work.store.adapters_dir, ignore_errors=True)
        t0 = time.perf_counter()
        s = train_run(work, progress=True)
        wall = time.perf_counter() - t0
        shutil.rmtree(work.dir, ignore_errors=True)
        return {"seconds": wall, "how": f"measured now: `train_run` of all {s['stages_trained']} stages on a copy "
                                        "with every block removed (incl. base-model load)", "stages": s["stages_trained"]}
    if bf.exists():
        b = json.loads(bf.read_text())
        return {"seconds": b["wall_seconds"], "stages": b["summary"]["stages_trained"],
                "how": f"measured: wall time of the build (`train_run` of all {b['summary']['stages_trained']} "
                       f"stages from nothing, incl. base-model load) on {b['date']}"}
    secs = [run.store.manifest(s, p)["seconds"] for s, p in stage_plan(run)]
    return {"seconds": sum(secs), "stages": len(secs),
            "how": "extrapolated: sum of the stored per-stage `train()` seconds (excludes base-model load "
                   "and per-stage set-up)"}


# ----- report --------------------------------------------------------------------------------------------
def report(args, run, meta, tp, dels, sisa, full) -> str:
    out = ["# Deletion-to-effect latency: S3T (served) vs SISA vs full retraining; gateway throughput", ""]
    out.append(f"Command: `{meta['command']}`  ")
    out.append(f"Machine: {meta['machine']} (shared with other jobs: timings are noisy)  ")
    out.append(f"Date: {meta['date']}; total wall {meta['total_s'] / 60:.1f} min")
    out.append("")
    c = run.config
    out.append(f"Run `{run.config.name}`: base `{c.model.name}` ({run.info['num_layers']} layers, fp32 training, "
               f"bf16 vLLM serving), m={run.shards} shards, L={c.s3t.slices} slices, B={len(run.sequences)} "
               f"{c.s3t.method} sequences {run.sequences}, {meta['n_samples']} Alpaca samples "
               f"({meta['n_samples'] // (run.shards * c.s3t.slices)} per cell), max_length {c.data.max_length}, "
               f"LoRA r={c.lora.r} on the top {c.lora.layers} layers (blocks {run.blocks}), "
               f"{c.train.epochs:g} epoch, batch {c.train.batch_size}. vLLM + gateway ready after "
               f"{meta['serve_ready_s']:.0f} s.")
    out.append("")

    # --- latency comparison
    rows = dels["rows"] if dels else []
    eff = [r["effect_seconds"] for r in rows]
    http = [r["http_seconds"] for r in rows]
    changed = [r for r in rows if r["changes"]]
    s3t_med = statistics.median(eff) if eff else float("nan")
    out.append("## Latency to effect, side by side")
    out.append("")
    table = []
    if rows:
        table.append(["S3T, served (all requests)", len(rows), fmt(s3t_med, 3), fmt(statistics.median(http), 3), "1.0"])
        if changed:
            m = statistics.median([r["effect_seconds"] for r in changed])
            table.append(["S3T, served (requests that switched an adapter)", len(changed), fmt(m, 3),
                          fmt(statistics.median([r["http_seconds"] for r in changed]), 3), fmt(m / s3t_med, 1)])
    if sisa:
        m = statistics.median([r["total_s"] for r in sisa])
        mean = statistics.mean([r["total_s"] for r in sisa])
        table.append([f"SISA (B=1): retrain the hit shard's suffix (mean {mean:.1f} s)", len(sisa), fmt(m, 1), "-",
                      fmt(m / s3t_med, 0)])
    if full:
        table.append([f"full retraining: all {full['stages']} stages of all {run.shards} shards", 1,
                      fmt(full["seconds"], 1), "-", fmt(full["seconds"] / s3t_med, 0)])
    out.append(C.md_table(["method", "deletions", "median latency to effect (s)", "median HTTP wall (s)",
                           "ratio vs S3T (median)"], table))
    out.append("")
    out.append("S3T latency to effect = the certificate's `deletion_to_effect_seconds` (request journaled -> new "
               "routing live, superseded adapters removed from the vLLM engine, prefix cache reset); HTTP wall = "
               "request sent -> response (adds certificate writing, artifact destruction, evidence checks). "
               "SISA = `apply_deletion` (no server) + `train_run(shards=[s])` + `publish` (the adapter to serve); "
               "its latency to effect is the retraining (a SISA shard that must keep answering has no model "
               "without the sample until then). "
               + (f"Full retraining: {full['how']}." if full else ""))
    out.append("")

    if rows:
        out.append(f"## S3T: {len(rows)} single-sample deletions through `POST /s3t/delete`")
        out.append("")
        st = dels["state"]
        dead = [s["shard"] for s in st["shards"] if s["needs_retraining"]]
        out.append(C.md_table(["", "p50 (s)", "p99 (s)", "max (s)", "mean (s)"], [
            ["deletion_to_effect_seconds (all)", fmt(pct(eff, 50), 3), fmt(pct(eff, 99), 3), fmt(max(eff), 3),
             fmt(statistics.mean(eff), 3)],
            ["HTTP wall (all)", fmt(pct(http, 50), 3), fmt(pct(http, 99), 3), fmt(max(http), 3),
             fmt(statistics.mean(http), 3)],
            *([[f"deletion_to_effect_seconds (switched, n={len(changed)})",
                *(fmt(pct([r["effect_seconds"] for r in changed], q), 3) for q in (50, 99)),
                fmt(max(r["effect_seconds"] for r in changed), 3),
                fmt(statistics.mean(r["effect_seconds"] for r in changed), 3)]] if changed else []),
            *([[f"deletion_to_effect_seconds (no switch, n={len(rows) - len(changed)})",
                *(fmt(pct([r["effect_seconds"] for r in rows if not r["changes"]], q), 3) for q in (50, 99)),
                fmt(max(r["effect_seconds"] for r in rows if not r["changes"]), 3),
                fmt(statistics.mean(r["effect_seconds"] for r in rows if not r["changes"]), 3)]]
              if len(changed) < len(rows) else []),
        ]))
        out.append("")
        n_died = sum(1 for r in rows for ch in r["changes"] if ch["to"] is None)
        out.append(f"- {len(changed)} requests changed the served routing (a shard's adapter replaced by a shorter "
                   f"prefix, or the shard retired), {len(rows) - len(changed)} were no-ops for serving (the sample "
                   f"was in no served adapter: a slice beyond the served prefix, or an already dead shard).")
        out.append(f"- Shards that died (no surviving prefix): {n_died} during the stream; at the end "
                   f"{len(dead)}/{run.shards} dead {dead}, live samples {st['live_samples']}/{st['samples']}; "
                   f"served depths {[s['depth'] for s in st['shards']]}.")
        out.append(f"- Engine adapter ids at the end {st['engine_adapter_ids']} = loaded "
                   f"{sorted(st['adapters_loaded'].values())}.")
        codes = dels["load_codes"]
        out.append(f"- Light load during the stream ({args.load_clients} client(s), 8-token completions with "
                   f"model=`{run.config.name}`): {dels['load_n']} requests, status codes {codes}; before the "
                   f"response to the request that left no live shard: {dels.get('load_before_all_dead')}. Errors: "
                   + ("; ".join(f"{e['n']} x {e['status']} '{e['message']}'" for e in dels.get("load_errors", []))
                      or "none") + ".")
        out.append("")
        per = []
        for r in rows:
            ch = "; ".join(f"s{x['shard']}: {x['from_depth']}->{x['to_depth'] or 'dead'}" for x in r["changes"])
            per.append([r["i"], r["sample"], f"({r['cell'][0]}, {r['cell'][1]})", fmt(r["http_seconds"], 3),
                        fmt(r["effect_seconds"], 3), fmt(r["switch_seconds"] or float("nan"), 3),
                        f"+{r['loaded']}/-{r['removed']}", ch or "-"])
        out.append("<details><summary>per request</summary>\n")
        out.append(C.md_table(["#", "sample", "cell (shard, slice)", "HTTP s", "effect s", "switch s",
                               "adapters +loaded/-removed", "served change"], per))
        out.append("\n</details>")
        out.append("")

    if sisa:
        out.append("## SISA (B=1) retraining per deletion")
        out.append("")
        out.append("One deletion per slice position (stratified over positions, each on a different shard): with "
                   "equal slices the mean is the expected cost of a uniformly drawn deletion.")
        out.append("")
        out.append(C.md_table(["shard", "hit slice (position)", "stages retrained", "apply_deletion s",
                               "train_run wall s", "train() s", "publish s", "total s"],
                              [[r["shard"], f"{r['slice']} ({r['position']})", r["stages"], fmt(r["apply_s"], 3),
                                fmt(r["train_wall_s"], 1), fmt(r["train_inner_s"], 1), fmt(r["publish_s"], 3),
                                fmt(r["total_s"], 1)] for r in sisa]))
        out.append("")

    if tp:
        out.append("## Serving throughput: gateway with m adapters vs vLLM serving the base model alone")
        out.append("")
        labels = list(dict.fromkeys(r["label"] for r in tp["rounds"]))
        out.append(f"{args.tp_requests} requests x {args.tp_tokens} generated tokens (`ignore_eos`, greedy), "
                   f"{args.tp_clients} concurrent clients, held-out Alpaca prompts (the same for every target); "
                   f"interleaved {', '.join(labels)}, ... after an untimed warm-up. Gateway: model=`{run.config.name}`, "
                   f"hash-routed over the live shard adapters; base: vLLM's own port, model=<base path>"
                   + ("; vLLM direct: vLLM's own port, each prompt sent to the adapter the gateway routed it to in "
                      "the warm-up (same adapters, same assignment, no gateway hop)" if len(labels) > 2 else "") + ".")
        out.append("")
        trs = []
        for r in tp["rounds"]:
            trs.append([r["round"], r["label"], r["tokens"], fmt(r["wall"], 2), fmt(r["tok_s"], 1),
                        fmt(r["latency_p50"], 2), f"{r['ok']}/{r['n']}",
                        ", ".join(f"{k}: {v}" for k, v in sorted(r["shards"].items(), key=lambda x: str(x[0])))
                        if r["label"].startswith("gateway") else "-" if r["label"].startswith("base")
                        else "as gateway"])
        out.append(C.md_table(["round", "target", "tokens", "wall s", "tokens/s", "p50 request s", "ok",
                               "requests per shard"], trs))
        out.append("")
        agg = {}
        for r in tp["rounds"]:
            a = agg.setdefault(r["label"], [0, 0.0])
            a[0] += r["tokens"]
            a[1] += r["wall"]
        labels = list(agg)
        bt, bw = agg[labels[0]]
        k = len(labels)
        for lab in labels[1:]:
            t, w = agg[lab]
            j = labels.index(lab)
            per = [tp["rounds"][i + j]["tok_s"] / tp["rounds"][i]["tok_s"] for i in range(0, len(tp["rounds"]), k)]
            out.append(f"- **{lab}: {t / w:.1f} tokens/s vs base {bt / bw:.1f} tokens/s: ratio {(t / w) / (bt / bw):.2f}** "
                       f"(per round: {', '.join(fmt(x, 2) for x in per)})")
        out.append("")
    return "\n".join(out)


# ----- serving guarantees (issue 11): cut vs drain, side by side ------------------------------------------
def _drain_first(gw, server):
    """Emulate the gateway before issue 11 on a live Gateway: no cut (wait for requests in flight on a retired
    adapter to finish, up to drain_timeout, then remove it), no digest or integrity checks, no vLLM quiesce."""
    def no_cut(names, reason):
        return []

    def drain(victims, names, replica=None):
        t0 = time.perf_counter()
        deadline = time.time() + gw.drain_timeout
        with gw._cond:
            while any(gw.inflight.get(n, 0) > 0 for n in names) and time.time() < deadline:
                gw._cond.wait(timeout=max(0.0, deadline - time.time()))
        return {"requests": 0, "drained_seconds": round(time.perf_counter() - t0, 4), "engine_quiesced": True,
                "relays_stopped_seconds": 0.0, "relays_not_confirmed": 0}

    gw._cut_locked = no_cut
    gw._await_cut = drain
    gw.check_integrity = lambda *a, **k: {"skipped": True}
    server.digests = lambda ids=None: {i: None for i in server.engine_loras()}
    server._digests_of_new = lambda known: {i: None for i in server.engine_loras()}
    server.expected_digest = lambda path: None


def _restore(server):
    for k in ("digests", "_digests_of_new", "expected_digest"):
        server.__dict__.pop(k, None)


def _load_worker(url, model, prompts, clients, tokens, stop, out):
    """Load clients in their own process (the gateway's process keeps its GIL, as with real clients)."""
    import httpx

    codes: dict = {}
    lock = threading.Lock()

    def client(i):
        with httpx.Client(base_url=url, timeout=600) as c:
            j = 0
            while not stop.is_set():
                r = c.post("/v1/completions", json={"model": model, "prompt": prompts[(i + j) % len(prompts)],
                                                    "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
                k = str(r.status_code) if r.status_code == 200 else \
                    f"{r.status_code} {(r.json().get('error') or {}).get('code')}"
                with lock:
                    codes[k] = codes.get(k, 0) + 1
                j += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out.put(codes)


def _resolve_tiny(args, runs: Path) -> None:
    """``--model tiny``: a 4-layer random Llama with a tokenizer trained on Alpaca, built once under ``runs``."""
    if args.model != "tiny":
        return
    from s3t_llm.models import build_tiny_llama
    from s3t_llm.paths import alpaca_path
    from s3t_llm.records import load_records

    tiny = runs / "tiny-llama-model"
    if not (tiny / "config.json").exists():
        recs = load_records(alpaca_path())[:400]
        build_tiny_llama(tiny, corpus=[r["instruction"] + " " + r["input"] + " " + r["output"] for r in recs],
                         num_layers=4, vocab_size=1024, init_std=0.2, bf16_exact=True)
    args.model = str(tiny)


def _serve_gateway(gw):
    """The gateway's app on a free loopback port in a thread: (uvicorn server, thread, url)."""
    import uvicorn

    from s3t_llm.serving import free_port

    port = free_port()
    us = uvicorn.Server(uvicorn.Config(gw.app(), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=us.run, daemon=True)
    th.start()
    while not us.started:
        time.sleep(0.05)
    return us, th, f"http://127.0.0.1:{port}"


def _start_load(args, url: str, work, prompts, load: str):
    """For a ``load`` cell, a process of ``--load-clients`` clients through the gateway: (stop, queue, proc)."""
    ctx = multiprocessing.get_context("spawn")
    stop, q, proc = ctx.Event(), ctx.Queue(), None
    if load == "load":
        proc = ctx.Process(target=_load_worker, args=(url, work.config.name, prompts, args.load_clients,
                                                      args.load_tokens, stop, q), daemon=True)
        proc.start()
        time.sleep(4.0)  # the clients' process starts, then the load is steady
    else:
        time.sleep(0.2)
    return stop, q, proc


def guarantees_bench(args) -> int:
    """Deletion-to-effect through ``POST /s3t/delete`` on one vLLM server: idle and under load (``--load-clients``
    clients x ``--load-tokens`` tokens), with the gateway before issue 11 (drain, emulated) and after (cut),
    each cell on a fresh copy of the same run, cells interleaved."""
    import httpx

    from s3t_llm.run import DATASET, Run
    from s3t_llm.serving import Gateway, VLLMServer
    from s3t_llm.prompts import render_prompt

    t_start = time.perf_counter()
    command = ".venv/bin/python benchmarks/deletion_latency.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    _resolve_tiny(args, runs)
    pristine = build_run(args)
    prompts = [render_prompt(r, "alpaca") for r in pristine.heldout()] or ["Give three tips for staying healthy."]
    server = VLLMServer(pristine.model_path, max_loras=2 * pristine.shards + 2, max_lora_rank=pristine.config.lora.r,
                        max_model_len=max(512, pristine.config.data.max_length * 2), log_file=runs / "guarantees-vllm.log")
    t0 = time.perf_counter()
    server.start()
    ready = time.perf_counter() - t0
    log(f"vLLM ready on {server.uds} after {ready:.0f} s")
    cells = []
    for rnd in range(args.g_rounds):
        for load in ("idle", "load"):
            for variant in ("before", "after"):
                cells.append((rnd, load, variant))
    results = []
    try:
        for rnd, load, variant in cells:
            work = copy_run(pristine.dir, runs / f"{pristine.dir.name}.g-{load}-{variant}")
            for n in list(server.ids):
                server.remove(n)
            gw = Gateway(work, server, token="bench-token")
            gw.check_interval = 3600
            if variant == "before":
                _drain_first(gw, server)
            gw.refresh("start-up")
            us, th, url = _serve_gateway(gw)
            stop, q, proc = _start_load(args, url, work, prompts, load)
            codes = {}
            rows = []
            with httpx.Client(base_url=url, timeout=600) as c:
                for k in range(args.g_deletions):
                    live = [s for s, e in sorted(gw.routing.items()) if e and e["depth"] > 1]
                    if not live:
                        break
                    s = live[k % len(live)]
                    e = gw.routing[s]
                    with work.ledger() as led:
                        victim = led.slice_samples(DATASET, s, e["prefix"][-1])[0][0]
                    t_rpc = time.perf_counter()
                    server.engine_loras()  # one engine round trip now (it waits for the engine's current step)
                    rpc = time.perf_counter() - t_rpc
                    t1 = time.perf_counter()
                    r = c.post("/s3t/delete", json={"ids": [victim]}, headers={"Authorization": "Bearer bench-token"})
                    wall = time.perf_counter() - t1
                    b = r.json()
                    if r.status_code != 200:
                        raise RuntimeError(f"deletion failed: {r.status_code} {r.text[:500]}")
                    sw = b.get("switch_report") or {}
                    rows.append({"effect": b["deletion_to_effect_seconds"], "http": wall,
                                 "changed": bool(b["served_changes"]), "cut": sw.get("cut_requests", 0),
                                 "switch": sw.get("total_seconds"), "rpc": rpc})
                    log(f"{load}/{variant} deletion {k + 1}: effect {b['deletion_to_effect_seconds']:.3f} s, http "
                        f"{wall:.3f} s, cut {sw.get('cut_requests', 0)}, changes {len(b['served_changes'])}")
                    time.sleep(args.gap)
            stop.set()
            if proc is not None:
                codes = q.get(timeout=600)
                proc.join(60)
            gw.wait_checks()
            us.should_exit = True
            th.join(30)
            _restore(server)
            results.append({"round": rnd + 1, "load": load, "variant": variant, "rows": rows, "codes": codes})
    finally:
        server.stop()
    md = guarantees_report(args, pristine, results, command, ready, time.perf_counter() - t_start)
    print("\n" + md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md + "\n")
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    log(f"wrote {out}")
    return 0


def guarantees_report(args, run, results, command, ready, total) -> str:
    c = run.config
    out = ["# Deletion-to-effect with the serving guarantees (issue 11): cut vs drain, idle and under load", ""]
    out.append(f"Command: `{command}`  ")
    out.append(f"Machine: {C.machine()} (2 cores shared with another engineer's jobs: timings are noisy)  ")
    out.append(f"Date: {datetime.now().strftime('%Y-%m-%d %H:%M')}; total wall {total / 60:.1f} min; vLLM ready "
               f"after {ready:.0f} s")
    out.append("")
    out.append(f"Run `{c.name}`: base `{Path(c.model.name).name}` ({run.info['num_layers']} layers), m={run.shards}, "
               f"L={c.s3t.slices}, B={len(run.sequences)}; every deletion hits the last block of a served prefix, "
               f"so every deletion switches an adapter. One vLLM server (Unix socket) for all cells; each cell serves a "
               f"fresh copy of the same run through a new in-process gateway; cells interleaved "
               f"(idle before, idle after, load before, load after). Load: {args.load_clients} clients sending "
               f"{args.load_tokens}-token completions (`ignore_eos`) through the gateway without pause.")
    out.append("")
    out.append("- **before** = the gateway of commit 0f03b7a emulated on the current one: on a switch it waits "
               "(up to drain_timeout = 30 s) for requests in flight on the retired adapter to finish, then removes "
               "it; no digest checks, no vLLM quiesce.")
    out.append("- **after** = this gateway: requests in flight on the retired adapter are cut (503 / SSE error "
               "`deletion_in_progress`), vLLM confirms their abort, the adapter is removed, digests are checked.")
    out.append("")
    rows = []
    agg: dict = {}
    for r in results:
        a = agg.setdefault((r["load"], r["variant"]), {"eff": [], "http": [], "cut": 0, "codes": {}, "sw": [],
                                                       "rpc": []})
        a["eff"] += [x["effect"] for x in r["rows"]]
        a["sw"] += [x["switch"] for x in r["rows"] if x["switch"] is not None]
        a["rpc"] += [x.get("rpc") for x in r["rows"] if x.get("rpc") is not None]
        a["http"] += [x["http"] for x in r["rows"]]
        a["cut"] += sum(x["cut"] for x in r["rows"])
        for k, v in r["codes"].items():
            a["codes"][k] = a["codes"].get(k, 0) + v
    for (load, variant), a in agg.items():
        e, h = a["eff"], a["http"]
        rows.append([load, variant, len(e), fmt(pct(e, 50), 3), fmt(pct(e, 99), 3), fmt(max(e) if e else float("nan"), 3),
                     fmt(pct(a["sw"], 50), 3), fmt(pct(a["sw"], 99), 3), fmt(pct(a["rpc"], 50), 3),
                     fmt(pct(h, 99), 3), a["cut"], ", ".join(f"{k}: {v}" for k, v in sorted(a["codes"].items())) or "-"])
    out.append(C.md_table(["load", "gateway", "deletions", "effect p50 (s)", "effect p99 (s)", "effect max (s)",
                           "switch p50 (s)", "switch p99 (s)", "engine RPC p50 (s)", "HTTP p99 (s)", "requests cut",
                           "load responses"], rows))
    out.append("")

    def p99(load, variant):
        return pct(agg.get((load, variant), {"eff": []})["eff"], 99)

    out.append(f"- idle: p99 after / before = {fmt(p99('idle', 'after') / p99('idle', 'before'), 2)} (target <= 1.1)")
    out.append(f"- under load: p99 after = {fmt(p99('load', 'after'), 3)} s (target < 1 s, aim 0.5 s); "
               f"before = {fmt(p99('load', 'before'), 3)} s")
    out.append("")
    out.append("effect = the certificate's `deletion_to_effect_seconds` (request journaled -> new routing live, the "
               "superseded adapter removed from the engine, no request on it left in vLLM); switch = "
               "`apply_routing` (the gateway's part of it: load, cut, quiesce, remove); engine RPC = one "
               "`/collective_rpc` round trip measured just before each deletion (it waits for the engine's current "
               "step); HTTP = request sent -> response.")
    return "\n".join(out)


# ----- replicas (issue 14): deletion-to-effect with 1 and 2 vLLM replicas; what the gateway adds per request ---
def replicas_bench(args) -> int:
    """Two vLLM replicas (disjoint cores) started once; cells interleaved: a gateway over replica 0 only, then
    over both, idle and under load, each on a fresh copy of the same run. Then the latency the gateway adds
    per request: the same 1-token completion on the same adapter, through the gateway and straight to vLLM's
    socket, interleaved."""
    import httpx

    from s3t_llm.prompts import render_prompt
    from s3t_llm.run import DATASET
    from s3t_llm.serving import Gateway, VLLMServer, replica_envs

    t_start = time.perf_counter()
    command = ".venv/bin/python benchmarks/deletion_latency.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    _resolve_tiny(args, runs)
    pristine = build_run(args)
    prompts = [render_prompt(r, "alpaca") for r in pristine.heldout()] or ["Give three tips for staying healthy."]
    servers = [VLLMServer(pristine.model_path, max_loras=2 * pristine.shards + 2, max_lora_rank=pristine.config.lora.r,
                          max_model_len=max(512, pristine.config.data.max_length * 2),
                          log_file=runs / f"replicas-vllm-{i}.log", env=env) for i, env in enumerate(replica_envs(2))]
    t0 = time.perf_counter()
    for srv in servers:  # from this thread (vLLM's parent-death signal follows the launching thread)
        srv.launch()
    for srv in servers:
        srv.wait_ready()
    ready = time.perf_counter() - t0
    log(f"2 vLLM replicas ready after {ready:.0f} s")
    results, overhead = [], {}
    try:
        for rnd in range(args.g_rounds):
            for load in ("idle", "load"):
                for n in (1, 2):
                    work = copy_run(pristine.dir, runs / f"{pristine.dir.name}.r{n}-{load}")
                    for srv in servers:
                        for name in list(srv.ids):
                            srv.remove(name)
                    gw = Gateway(work, servers[:n], token="bench-token")
                    gw.check_interval = gw.reconcile_interval = 3600
                    gw.refresh("start-up")
                    us, thr, url = _serve_gateway(gw)
                    stop, q, proc = _start_load(args, url, work, prompts, load)
                    codes = {}
                    rows = []
                    with httpx.Client(base_url=url, timeout=600) as c:
                        if load == "idle" and n == 1 and rnd == 0:
                            overhead = _gateway_overhead(c, servers[0], gw, prompts, args.overhead_requests)
                        for k in range(args.g_deletions):
                            live = [s for s, e in sorted(gw.routing.items()) if e and e["depth"] > 1]
                            if not live:
                                break
                            s = live[k % len(live)]
                            e = gw.routing[s]
                            with work.ledger() as led:
                                victim = led.slice_samples(DATASET, s, e["prefix"][-1])[0][0]
                            t1 = time.perf_counter()
                            r = c.post("/s3t/delete", json={"ids": [victim]}, headers={"Authorization": "Bearer bench-token"})
                            wall = time.perf_counter() - t1
                            b = r.json()
                            if r.status_code != 200:
                                raise RuntimeError(f"deletion failed: {r.status_code} {r.text[:500]}")
                            sw = b.get("switch_report") or {}
                            rows.append({"effect": b["deletion_to_effect_seconds"], "http": wall,
                                         "cut": sw.get("cut_requests", 0), "switch": sw.get("total_seconds"),
                                         "fenced": sum(1 for x in sw.get("replicas", []) if not x["receives_traffic"])})
                            log(f"{load}/{n} replica(s) deletion {k + 1}: effect {b['deletion_to_effect_seconds']:.3f} s")
                            time.sleep(args.gap)
                    stop.set()
                    if proc is not None:
                        codes = q.get(timeout=600)
                        proc.join(60)
                    gw.wait_checks()
                    us.should_exit = True
                    thr.join(30)
                    results.append({"round": rnd + 1, "load": load, "replicas": n, "rows": rows, "codes": codes})
    finally:
        for srv in servers:
            srv.stop()
    total = time.perf_counter() - t_start
    c = pristine.config
    out = ["# Deletion-to-effect with 1 and 2 vLLM replicas; the latency the gateway adds (issue 14)", ""]
    out.append(f"Command: `{command}`  ")
    out.append(f"Machine: {C.machine()} (2 cores: each replica is bound to one; shared with other jobs, noisy)  ")
    out.append(f"Date: {datetime.now().strftime('%Y-%m-%d %H:%M')}; total wall {total / 60:.1f} min; "
               f"2 replicas ready after {ready:.0f} s")
    out.append("")
    out.append(f"Run `{c.name}`: m={pristine.shards}, L={c.s3t.slices}, B={len(pristine.sequences)}; every deletion "
               f"switches an adapter; acknowledged only when every replica that receives traffic has loaded the new "
               f"adapter, cut and removed the old one. Load: {args.load_clients} clients x {args.load_tokens}-token "
               f"completions through the gateway. Cells interleaved (idle 1, idle 2, load 1, load 2) x {args.g_rounds}.")
    out.append("")
    agg: dict = {}
    for r in results:
        a = agg.setdefault((r["load"], r["replicas"]), {"eff": [], "sw": [], "http": [], "cut": 0, "fenced": 0, "codes": {}})
        a["eff"] += [x["effect"] for x in r["rows"]]
        a["sw"] += [x["switch"] for x in r["rows"] if x["switch"] is not None]
        a["http"] += [x["http"] for x in r["rows"]]
        a["cut"] += sum(x["cut"] for x in r["rows"])
        a["fenced"] += sum(x["fenced"] for x in r["rows"])
        for k, v in r["codes"].items():
            a["codes"][k] = a["codes"].get(k, 0) + v
    rows = []
    for (load, n), a in sorted(agg.items()):
        e = a["eff"]
        rows.append([load, n, len(e), fmt(pct(e, 50), 3), fmt(pct(e, 99), 3), fmt(pct(a["sw"], 50), 3),
                     fmt(pct(a["http"], 99), 3), a["cut"], a["fenced"],
                     ", ".join(f"{k}: {v}" for k, v in sorted(a["codes"].items())) or "-"])
    out.append(C.md_table(["load", "replicas", "deletions", "effect p50 (s)", "effect p99 (s)", "switch p50 (s)",
                           "HTTP p99 (s)", "requests cut", "replicas fenced", "load responses"], rows))
    out.append("")
    for load in ("idle", "load"):
        p1, p2 = pct(agg.get((load, 1), {"eff": []})["eff"], 99), pct(agg.get((load, 2), {"eff": []})["eff"], 99)
        out.append(f"- {load}: effect p99 with 2 replicas / 1 = {fmt(p2 / p1, 2)} (goal <= 1.5)")
    if overhead:
        out.append("")
        out.append(f"Latency the gateway adds per request ({overhead['n']} interleaved pairs, 1-token completion on the "
                   f"same adapter, idle): vLLM direct p50 {overhead['direct_p50_ms']:.1f} ms / p99 "
                   f"{overhead['direct_p99_ms']:.1f} ms; through the gateway p50 {overhead['gateway_p50_ms']:.1f} ms / "
                   f"p99 {overhead['gateway_p99_ms']:.1f} ms; added p50 {overhead['added_p50_ms']:.1f} ms, p99 "
                   f"{overhead['added_p99_ms']:.1f} ms.")
    out.append("")
    out.append("Throughput with 2 replicas against 1 is not claimed here: 2 cores cannot show scaling (each replica "
               "gets one core). Not measured: multi-node, GPU replicas.")
    md = "\n".join(out)
    print("\n" + md)
    dst = Path(args.out)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(md + "\n")
    dst.with_suffix(".json").write_text(json.dumps({"results": results, "overhead": overhead}, indent=2))
    log(f"wrote {dst}")
    return 0


def _gateway_overhead(c, server, gw, prompts, n: int) -> dict:
    """The same 1-token completion on shard 0's adapter, straight to vLLM's socket and through the gateway."""
    name = gw.routing[0]["name"]
    direct, via = [], []
    body = {"model": name, "prompt": prompts[0], "max_tokens": 1, "temperature": 0}
    for _ in range(5):  # warm-up
        server.client.post("/v1/completions", json=body)
        c.post("/v1/completions", json=body)
    for _ in range(n):
        t = time.perf_counter()
        assert server.client.post("/v1/completions", json=body).status_code == 200
        direct.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert c.post("/v1/completions", json=body).status_code == 200
        via.append(time.perf_counter() - t)
    added = [b - a for a, b in zip(direct, via)]
    return {"n": n, "direct_p50_ms": 1e3 * pct(direct, 50), "direct_p99_ms": 1e3 * pct(direct, 99),
            "gateway_p50_ms": 1e3 * pct(via, 50), "gateway_p99_ms": 1e3 * pct(via, 99),
            "added_p50_ms": 1e3 * pct(added, 50), "added_p99_ms": 1e3 * pct(added, 99)}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.name is None:
        args.name = f"smollm2-dl-m{args.shards}L{args.slices}B{args.budget}-n{args.limit}"
    C.setup_device("cpu", args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from s3t_llm.run import DATASET, Run
    from s3t_llm.prompts import render_prompt
    from s3t_llm.serving import free_port, stop_server

    if args.guarantees:
        return guarantees_bench(args)
    if args.replicas_bench:
        return replicas_bench(args)
    if args.render:
        raw = json.loads(Path(args.render).read_text())
        meta = raw["meta"]
        margs = make_parser().parse_args(shlex.split(meta["command"])[2:])
        if margs.name is None:
            margs.name = f"smollm2-dl-m{margs.shards}L{margs.slices}B{margs.budget}-n{margs.limit}"
        run = Run.open(margs.run or Path(margs.runs_dir) / margs.name)
        md = report(margs, run, meta, raw["throughput"], raw["deletions"], raw["sisa"], raw["full"])
        print(md)
        Path(args.out).write_text(md + "\n")
        return 0
    t_start = time.perf_counter()
    command = ".venv/bin/python benchmarks/deletion_latency.py" + "".join(" " + shlex.quote(a) for a in (argv or sys.argv[1:]))
    Path(args.runs_dir).mkdir(parents=True, exist_ok=True)
    run = build_run(args)
    with run.ledger() as led:
        n_samples = led.dataset(DATASET).n_live
    sisa = None if args.skip_sisa else build_sisa(args, run)
    prompts = [render_prompt(r, "alpaca") for r in run.heldout()] or ["Give three tips for staying healthy."]

    served = copy_run(run.dir, run.dir.parent / f"{run.dir.name}.serving")
    port = args.port or free_port()
    log(f"starting s3t serve {served.dir} on port {port}")
    proc, url, info, ready = start_server(served.dir, port)
    log(f"gateway ready at {url} after {ready:.0f} s (vLLM at {info['vllm_url']})")
    try:
        tp = None if args.skip_throughput else throughput(args, url, info, served, prompts)
        dels = deletion_stream(args, url, info, served, prompts) if args.deletions else None
    finally:
        stop_server(proc)
    sisa_rows = sisa_measure(args, sisa) if sisa else []
    full = full_retrain(args, run)
    meta = {"command": command, "machine": C.machine(), "date": datetime.now().strftime("%Y-%m-%d %H:%M"),
            "total_s": time.perf_counter() - t_start, "n_samples": n_samples, "serve_ready_s": ready}
    md = report(args, run, meta, tp, dels, sisa_rows, full)
    print("\n" + md)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(md + "\n")
    raw = Path(args.out).with_suffix(".json")
    raw.write_text(json.dumps({"meta": meta, "throughput": tp, "deletions": dels, "sisa": sisa_rows, "full": full},
                              indent=2, default=str))
    log(f"wrote {args.out} and {raw}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
