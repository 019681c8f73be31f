"""Whole `s3t train` wall time of the CPU recipe with the activation cache off and on, side by side in one run.

    python benchmarks/train_cache.py                                  # recipes/cpu_smollm2.yaml, data.limit=48
    python benchmarks/train_cache.py --set data.limit=96              # the recipe as shipped (96 samples)
    python benchmarks/train_cache.py --set train.epochs=3

Both runs train the same recipe (same data, seed, plan) from scratch in this process, one after the other
(order alternates with --repeats), each through ``s3t_llm.training.train_run`` (what ``s3t train`` calls) with
``train.cache_activations`` false / true; the wall time includes the base-model load. Per stage it reports the
set-up (tokenisation, Trainer construction), the cache fill (the frozen lower-stack forwards, per (shard, slice)
cell in the cell's canonical batches of train.batch_size, each cell once up to the highest boundary it is needed at) and
``train()`` split into forward, backward and optimizer (``training._time_phases``), and how far
the losses of the two runs are apart. Next to it: the cost model of ``benchmarks/plan_compute.py``
(``cache_cost``) for the same plan.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cpu_smollm2.yaml"))
    ap.add_argument("--set", action="append", default=None, metavar="section.field=value",
                    help="recipe overrides (repeatable); default: data.limit=48 data.heldout=0")
    ap.add_argument("--repeats", type=int, default=1, help="off/on pairs, order alternating; medians")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out", default=str(C.RESULTS / "train_cache.md"))
    return ap


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.setup_device("cpu", args.threads)
    import datasets

    from s3t_llm.config import load_config
    from s3t_llm.run import Run
    from s3t_llm.training import train_run

    datasets.disable_progress_bars()
    from trl import SFTTrainer  # noqa: F401  imported before timing

    sets = args.set if args.set is not None else ["data.limit=48", "data.heldout=0"]
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="s3t-cache-bench-"))
    res: dict[str, list[dict]] = {"off": [], "on": []}
    load_before = os.getloadavg()
    for i in range(args.repeats):
        for which in (("off", "on") if i % 2 == 0 else ("on", "off")):
            cfg = load_config(args.recipe, [*sets, f"output_dir={work}", f"name=cache-{which}-{i}",
                                            f"train.cache_activations={'true' if which == 'on' else 'false'}",
                                            "train.logging_steps=1"])
            run = Run.create(cfg)
            t0 = time.perf_counter()
            summary = train_run(run, progress=False)
            wall = time.perf_counter() - t0
            mans = {(s, p): run.store.manifest(s, p) for s, p in run.store.blocks()}
            r = {"wall": wall, "summary": summary, "mans": mans, "cfg": cfg, "run": run,
                 "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            res[which].append(r)
            print(f"  cache {which}: {summary['stages_trained']} stages, wall {wall:.1f}s, "
                  f"train() {summary['seconds']:.1f}s", flush=True)
    load_after = os.getloadavg()
    cfg = res["on"][0]["cfg"]
    run = res["on"][0]["run"]
    md = lambda k, f: statistics.median(f(r) for r in res[k])  # noqa: E731
    wall_off, wall_on = md("off", lambda r: r["wall"]), md("on", lambda r: r["wall"])
    tr_off = md("off", lambda r: r["summary"]["seconds"])
    tr_on = md("on", lambda r: r["summary"]["seconds"])
    fill_on = md("on", lambda r: sum(b["cache_fill_s"] for b in r["summary"]["blocks"]))
    setup_off = md("off", lambda r: sum(b["setup_s"] for b in r["summary"]["blocks"]))
    setup_on = md("on", lambda r: sum(b["setup_s"] for b in r["summary"]["blocks"]))

    def phases(b: dict) -> str:
        return " / ".join(f"{b[k]:.1f}" for k in ("forward_s", "backward_s", "optimizer_s")) if "forward_s" in b else "-"

    def phase_sum(k: str, key: str) -> float:
        return md(k, lambda r: sum(b.get(key, 0.0) for b in r["summary"]["blocks"]))

    # Per stage (first repeat of each), with the loss difference.
    off0, on0 = res["off"][0], res["on"][0]
    rows, rels = [], []
    for b_off, b_on in zip(off0["summary"]["blocks"], on0["summary"]["blocks"]):
        key = (b_off["shard"], tuple(b_off["prefix"]))
        lo, ln = off0["mans"][key]["train_loss"], on0["mans"][key]["train_loss"]
        rels.append(abs(lo - ln) / abs(lo))
        rows.append([f"s{key[0]} p{'-'.join(map(str, key[1]))}", on0["mans"][key]["n_used"],
                     b_on["cache_layer"], f"{b_off['setup_s']:.2f}", f"{b_off['seconds']:.1f}",
                     phases(b_off),
                     f"{b_on['setup_s']:.2f}", f"{b_on['cache_fill_s']:.2f}", f"{b_on['seconds']:.1f}", phases(b_on),
                     f"{b_off['seconds'] / max(b_on['seconds'] + b_on['cache_fill_s'], 1e-9):.2f}",
                     f"{abs(lo - ln) / abs(lo):.1e}"])
    from plan_compute import cache_cost

    n_layers = run.info["num_layers"]
    n_lora = len({i for b in run.blocks for i in b})
    cc = cache_cost(cfg.s3t.shards, cfg.s3t.slices, cfg.s3t.budget, N=n_layers, n=n_lora,
                    epochs=cfg.train.epochs, method=cfg.s3t.method)
    cmd = "python benchmarks/train_cache.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = "\n".join([
        "# Activation cache: whole `s3t train` wall time, cache off vs on", "",
        f"Command: `{cmd.strip()}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M')}  ",
        f"Machine: {C.machine()}" if hasattr(C, "machine") else "Machine: the project's shared 2-core CPU box",
        "Load average (1/5/15 min) before: " + " ".join(f"{x:.2f}" for x in load_before) + "; after: "
        + " ".join(f"{x:.2f}" for x in load_after), "",
        f"Recipe `{Path(args.recipe).name}` with {' '.join(sets) or 'no overrides'}: {cfg.model.name}, "
        f"{cfg.model.precision}, m={cfg.s3t.shards} L={cfg.s3t.slices} B={cfg.s3t.budget}, LoRA on the top "
        f"{n_lora} of {n_layers} layers (blocks {run.blocks}), {cfg.data.limit} samples, batch "
        f"{cfg.train.batch_size}, max_length {cfg.data.max_length}, {cfg.train.epochs} epoch(s); "
        f"{args.repeats} off/on pair(s), medians. Both runs in one process, one after the other, on a machine "
        "shared with other jobs (absolute times are noisy; the ratio is what was measured side by side).", "",
        C.md_table(["", "cache off", "cache on", "off / on"], [
            ["whole train_run wall s (incl. model load)", f"{wall_off:.1f}", f"{wall_on:.1f}", f"{wall_off / wall_on:.2f}x"],
            ["sum of train() s", f"{tr_off:.1f}", f"{tr_on:.1f}", f"{tr_off / tr_on:.2f}x"],
            ["sum of cache fill s", "0", f"{fill_on:.1f}", ""],
            ["sum of train() + fill s", f"{tr_off:.1f}", f"{tr_on + fill_on:.1f}", f"{tr_off / (tr_on + fill_on):.2f}x"],
            ["sum of stage set-up s (tokenise + Trainer)", f"{setup_off:.1f}", f"{setup_on:.1f}", ""],
            *[[f"  of train(): {what} s", f"{phase_sum('off', key):.1f}", f"{phase_sum('on', key):.1f}",
               f"{phase_sum('off', key) / max(phase_sum('on', key), 1e-9):.2f}x"]
              for what, key in (("forward (compute_loss)", "forward_s"), ("backward", "backward_s"),
                                ("clipping + optimizer", "optimizer_s"))],
            ["cost model (plan_compute.cache_cost), layer-passes", f"{cc['uncached']:.0f}",
             f"{cc['cached']:.0f} (fill {cc['fill']:.0f})", f"{cc['uncached'] / cc['cached']:.2f}x"],
            ["process peak RSS MiB after the run", f"{md('off', lambda r: r['maxrss_mib']):.0f}",
             f"{md('on', lambda r: r['maxrss_mib']):.0f}", "(cumulative peak of one process)"],
        ]), "",
        "Per stage (first pair): `set-up` = tokenisation + Trainer construction, `fill` = the frozen lower-stack "
        "forwards for the stage's slices not yet cached (each slice once, in its canonical batches, up to the highest "
        "boundary the plan needs it at), `train()` = "
        "forward + backward + optimizer steps (+ data loading and logging), of which `fwd` = the trainer's "
        "compute_loss (model forward, TRL's loss and token metrics), `bwd` = accelerator.backward, `opt` = "
        "clipping + optimizer + scheduler steps + zero_grad. Loss rel. diff = |loss off - loss on| / loss off (stage mean loss).", "",
        C.md_table(["stage", "samples", "cache layer", "off set-up s", "off train() s", "off fwd / bwd / opt s",
                    "on set-up s", "on fill s", "on train() s", "on fwd / bwd / opt s", "off / (on train+fill)",
                    "loss rel. diff"], rows), "",
        f"Largest stage-loss relative difference, cache on vs off: {max(rels):.1e} over {len(rels)} stages.",
    ])
    C.write_result(text + "\n", args.out)
    print(text)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
