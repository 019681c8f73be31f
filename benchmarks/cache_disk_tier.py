"""The activation cache's disk tier against memory: the same recipe trained twice in one process, side by side.

    python benchmarks/cache_disk_tier.py                       # recipes/cpu_smollm2.yaml, data.limit=48, 1 epoch
    python benchmarks/cache_disk_tier.py --set train.epochs=3

``memory``: the recipe's cache (``train.activation_cache_gb`` 4, no disk tier). ``disk``: a memory bound of
1 KiB and ``train.activation_cache_disk_gb`` 4, so every entry spills to the trainer's scratch under the run and
is read back from it on every use (the worst case; a real run spills only what exceeds memory). Reports the
whole ``train_run`` wall time, train() and fill seconds, what was spilled and read, the peak bytes of each tier,
and whether the two runs' blocks are byte-identical (they must be: the disk tier stores the same bits).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"memory": ["train.activation_cache_disk_gb=0"],
            "disk": ["train.activation_cache_gb=0.000001", "train.activation_cache_disk_gb=4"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cpu_smollm2.yaml"))
    ap.add_argument("--set", action="append", default=None, metavar="section.field=value",
                    help="recipe overrides (repeatable); default: data.limit=48 data.heldout=0")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(C.RESULTS / "cache_disk_tier.md"))
    args = ap.parse_args(argv)
    C.setup_device("cpu", args.threads)
    import datasets

    from s3t_llm.config import load_config
    from s3t_llm.run import Run
    from s3t_llm.training import train_run

    datasets.disable_progress_bars()
    from trl import SFTTrainer  # noqa: F401  imported before timing

    sets = args.set if args.set is not None else ["data.limit=48", "data.heldout=0"]
    work = Path(tempfile.mkdtemp(prefix="s3t-disk-tier-"))
    res = {}
    try:
        for which, extra in VARIANTS.items():
            cfg = load_config(args.recipe, [*sets, f"output_dir={work}", f"name=tier-{which}",
                                            "train.cache_activations=true", *extra])
            run = Run.create(cfg)
            print(f"  {which}: training ...", flush=True)
            t0 = time.perf_counter()
            summary = train_run(run, progress=True)
            wall = time.perf_counter() - t0
            left = list(Path(run.dir).glob(".trainer-*"))
            res[which] = {"wall": wall, "summary": summary, "cfg": cfg, "left": left,
                          "sha": {(s, p): run.store.manifest(s, p)["sha256"] for s, p in run.store.blocks()}}
            st = summary["activation_cache"]
            print(f"  {which}: wall {wall:.1f}s, train() {summary['seconds']:.1f}s, spilled {st['spilled']}, "
                  f"disk reads {st['disk_reads']} ({st['disk_read_seconds']:.2f}s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m, d = res["memory"], res["disk"]
    same = m["sha"] == d["sha"]
    stat = lambda r, k: r["summary"]["activation_cache"][k]  # noqa: E731
    fill = lambda r: sum(b["cache_fill_s"] for b in r["summary"]["blocks"])  # noqa: E731
    cfg = m["cfg"]
    cmd = "python benchmarks/cache_disk_tier.py " + " ".join(sys.argv[1:] if argv is None else argv)
    rows = [
        ["whole train_run wall s", f"{m['wall']:.1f}", f"{d['wall']:.1f}", f"{d['wall'] / m['wall']:.3f}"],
        ["sum of train() s", f"{m['summary']['seconds']:.1f}", f"{d['summary']['seconds']:.1f}",
         f"{d['summary']['seconds'] / m['summary']['seconds']:.3f}"],
        ["sum of cache fill s (incl. writing spilled entries)", f"{fill(m):.1f}", f"{fill(d):.1f}", ""],
        ["entries filled / hits", f"{stat(m, 'fills')} / {stat(m, 'hits')}", f"{stat(d, 'fills')} / {stat(d, 'hits')}", ""],
        ["entries spilled (write s)", "0", f"{stat(d, 'spilled')} ({stat(d, 'spill_seconds'):.2f})", ""],
        ["entry reads from disk (read s)", "0", f"{stat(d, 'disk_reads')} ({stat(d, 'disk_read_seconds'):.2f})", ""],
        ["peak memory tier MiB", f"{stat(m, 'peak_memory_bytes') / 2**20:.1f}",
         f"{stat(d, 'peak_memory_bytes') / 2**20:.1f}", ""],
        ["peak disk tier MiB", "0", f"{stat(d, 'peak_disk_bytes') / 2**20:.1f}", ""],
        ["trainer scratch left under the run after train_run", str(len(m["left"])), str(len(d["left"])), ""],
    ]
    text = "\n".join([
        "# Activation cache: disk tier vs memory", "",
        f"Command: `{cmd.strip()}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M')}  ",
        f"Recipe `{Path(args.recipe).name}` with {' '.join(sets) or 'no overrides'}: {cfg.model.name}, "
        f"m={cfg.s3t.shards} L={cfg.s3t.slices} B={cfg.s3t.budget}, {cfg.data.limit} samples, {cfg.train.epochs} "
        "epoch(s). `disk`: memory bound 1 KiB, so every entry is written once and read from disk at every use "
        "(the worst case). One process, one run after the other, on a shared 2-core machine.", "",
        C.md_table(["", "memory", "disk", "disk / memory"], rows), "",
        f"Blocks byte-identical (sha256 of every block file) between the two runs: **{same}** "
        f"({len(m['sha'])} blocks).",
    ])
    C.write_result(text + "\n", args.out)
    print(text)
    return 0 if same and not m["left"] and not d["left"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
