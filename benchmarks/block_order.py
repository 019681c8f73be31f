"""Block order, measured: the CPU recipe with LoRA on all 30 SmolLM2 layers, trained top-down and bottom-up, each
with the activation cache off and on, side by side in one run; cost and quality.

    python benchmarks/block_order.py                                # recipes/cpu_smollm2.yaml, lora.layers=all
    python benchmarks/block_order.py --set data.limit=24 --set train.epochs=3 --runs top_down:off,bottom_up:on \
        --out benchmarks/results/block_order_3epochs.md

Every run trains the same recipe (same data, seed, sequences) from scratch in this process, one after the other,
through ``s3t_llm.training.train_run`` (what ``s3t train`` calls); only ``s3t.block_order`` and
``train.cache_activations`` differ. Cost: whole wall time (incl. the base-model load), sum of ``train()``, of the
cache fills and of the stage set-up, per depth k, next to ``benchmarks/plan_compute.py``'s cost model. Quality, per
order (of the last run of that order: cache on and off train the same function, within float rounding, which the
table shows as the stage-loss difference): the final stages' training loss, each shard's served model's (base +
its full-depth prefix, from the block store) held-out loss with its standard error on the run's held-out records,
and the membership (loss attack) AUC of the shard's own training samples against those held-out records, with a
95% bootstrap CI: how much the served model memorises what it trained on, the quantity a deletion must remove.
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
ORDERS = ("top_down", "bottom_up")


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cpu_smollm2.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="section.field=value",
                    help="recipe overrides (repeatable), after lora.layers=all")
    ap.add_argument("--runs", default="top_down:off,top_down:on,bottom_up:off,bottom_up:on",
                    help="ORDER:CACHE pairs to train, in this order (default: both orders, cache off and on)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out", default=str(C.RESULTS / "block_order.md"))
    return ap


def quality(run) -> dict:
    """Per shard: held-out loss +- SE of the served model, and the loss-attack AUC of its training samples
    against the held-out records."""
    import numpy as np

    from s3t_llm.evaluation.audit import _load_served_model, auc_with_ci, score_records_hf
    from s3t_llm.evaluation.scorers import HFScorer, heldout_loss
    from transformers import AutoTokenizer
    from s3t_llm.run import DATASET

    cfg = run.config
    tok = AutoTokenizer.from_pretrained(run.model_path)
    held = run.heldout()
    out = {}
    for shard in range(run.shards):
        model, a = _load_served_model(run, shard)
        with run.ledger() as led:
            members = [rec for sl in range(cfg.s3t.slices) for _, rec in led.slice_samples(DATASET, shard, sl)]
        hl = heldout_loss(HFScorer(model, tok), held, cfg.data.template, cfg.data.max_length)
        ms = [x for x in score_records_hf(model, tok, members, template=cfg.data.template,
                                          max_length=cfg.data.max_length, full_vocab=False) if x is not None]
        hs = [x for x in score_records_hf(model, tok, held, template=cfg.data.template,
                                          max_length=cfg.data.max_length, full_vocab=False) if x is not None]
        mloss = np.array([-float(np.mean(x.logprobs)) for x in ms])
        hloss = np.array([-float(np.mean(x.logprobs)) for x in hs])
        out[shard] = {"prefix": a.get("prefix"), "heldout": hl, "auc": auc_with_ci([(mloss, hloss)]),
                      "member_loss": float(mloss.mean()), "n_members": len(mloss)}
        del model
    return out


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.setup_device("cpu", args.threads)
    import datasets

    from s3t_llm.config import load_config
    from s3t_llm.run import Run
    from s3t_llm.training import train_run

    datasets.disable_progress_bars()
    from trl import SFTTrainer  # noqa: F401  imported before timing

    sets = ["lora.layers=all", *args.set]
    pairs = [tuple(x.split(":")) for x in args.runs.split(",") if x]
    bad = [p for p in pairs if len(p) != 2 or p[0] not in ORDERS or p[1] not in ("on", "off")]
    if bad:
        raise SystemExit(f"--runs: {bad} are not ORDER:CACHE pairs with ORDER in {ORDERS} and CACHE on|off")
    orders = [o for o in ORDERS if any(p[0] == o for p in pairs)]
    # The run whose quality is evaluated per order: cache on where trained (the faster), else off.
    qual_of = {o: ("on" if (o, "on") in pairs else "off") for o in orders}
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="s3t-order-bench-"))
    res: dict[tuple[str, str], dict] = {}
    load_before = os.getloadavg()
    for order, which in pairs:
        if True:
            name = f"order-{order}-cache-{which}"
            cfg = load_config(args.recipe, [*sets, f"output_dir={work}", f"name={name}",
                                            f"s3t.block_order={order}",
                                            f"train.cache_activations={'true' if which == 'on' else 'false'}"])
            shutil.rmtree(cfg.run_dir, ignore_errors=True)
            run = Run.create(cfg)
            t0 = time.perf_counter()
            summary = train_run(run, progress=False)
            wall = time.perf_counter() - t0
            mans = {(s, p): run.store.manifest(s, p) for s, p in run.store.blocks()}
            res[(order, which)] = {"wall": wall, "summary": summary, "mans": mans, "cfg": cfg, "run": run,
                                   "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
            print(f"  {order} cache {which}: blocks {run.blocks}, {summary['stages_trained']} stages, "
                  f"wall {wall:.1f}s, train() {summary['seconds']:.1f}s", flush=True)
    t_q = time.perf_counter()
    qual = {}
    for order in orders:
        r = res[(order, qual_of[order])]
        qual[order] = quality(r["run"])
        print(f"  quality {order}: " + ", ".join(f"shard {s} held-out {q['heldout']['loss']:.4f} "
                                                 f"+- {q['heldout']['stderr']:.4f}, AUC {q['auc']['auc']:.3f}"
                                                 for s, q in qual[order].items()), flush=True)
    q_s = time.perf_counter() - t_q
    load_after = os.getloadavg()

    from plan_compute import cache_cost

    first = pairs[0]
    cfg0 = res[first]["cfg"]
    run0 = res[first]["run"]
    N = run0.info["num_layers"]
    n = len({i for b in run0.blocks for i in b})
    L = cfg0.s3t.slices
    rows = []
    base_wall = res[first]["wall"]

    def model_cost(order, which):
        cc = cache_cost(cfg0.s3t.shards, L, cfg0.s3t.budget, N=N, n=n, epochs=cfg0.train.epochs,
                        method=cfg0.s3t.method, order=order)
        return cc["cached"] if which == "on" else cc["uncached"]  # "cached" includes the fill

    for (order, which), r in res.items():
        s = r["summary"]
        model = model_cost(order, which)
        rows.append([order, which, f"{r['wall']:.1f}", f"{s['seconds']:.1f}",
                     f"{sum(b['cache_fill_s'] for b in s['blocks']):.1f}",
                     f"{sum(b['setup_s'] for b in s['blocks']):.1f}", f"{base_wall / r['wall']:.2f}x",
                     f"{model_cost(*first) / model:.2f}x",
                     f"{model:.0f}", f"{r['maxrss_mib']:.0f}"])
    # Per depth k: train() + fill seconds summed over the stages at that depth.
    depth_rows = []
    for k in range(1, L + 1):
        row = [k]
        for key, r in res.items():
            bs = [b for b in r["summary"]["blocks"] if len(b["prefix"]) == k]
            row.append(f"{sum(b['seconds'] + b['cache_fill_s'] for b in bs):.1f}")
        depth_rows.append(row)
    # Cache on vs off: stage-loss difference per order.
    diffs = []
    for order in orders:
        if (order, "off") in res and (order, "on") in res:
            off, on = res[(order, "off")]["mans"], res[(order, "on")]["mans"]
            rel = max(abs(off[k]["train_loss"] - on[k]["train_loss"]) / abs(off[k]["train_loss"]) for k in off)
            diffs.append(f"{order}: largest stage-loss relative difference cache on vs off {rel:.1e} over "
                         f"{len(off)} stages")
    qrows = []
    for order in orders:
        r = res[(order, qual_of[order])]
        for shard, q in qual[order].items():
            h, a = q["heldout"], q["auc"]
            mine = [m for (s, p), m in r["mans"].items() if s == shard]
            qrows.append([order, shard, "-".join(map(str, q["prefix"] or [])),
                          f"{statistics.mean(m['train_loss'] for m in mine if m['block'] == L):.4f}",
                          f"{statistics.mean(m['train_loss'] for m in mine):.4f}",
                          f"{h['loss']:.4f} +- {h['stderr']:.4f}", f"{q['member_loss']:.4f}",
                          f"{a['auc']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}]"])
    cmd = "python benchmarks/block_order.py " + " ".join(sys.argv[1:] if argv is None else argv)
    keys = [f"{o} {w}" for o, w in res]
    text = "\n".join([
        "# Block order: top-down vs bottom-up, LoRA on every layer", "",
        f"Command: `{cmd.strip()}`  ", f"Date: {time.strftime('%Y-%m-%d %H:%M')}  ", f"Machine: {C.machine()}  ",
        "Load average (1/5/15 min) before: " + " ".join(f"{x:.2f}" for x in load_before) + "; after: "
        + " ".join(f"{x:.2f}" for x in load_after), "",
        f"Recipe `{Path(args.recipe).name}` with {' '.join(sets)}: {cfg0.model.name}, {cfg0.model.precision}, "
        f"m={cfg0.s3t.shards} L={L} B={cfg0.s3t.budget}, LoRA on all {n} of {N} layers: "
        + "; ".join(f"{o} blocks {next(r['run'].blocks for k, r in res.items() if k[0] == o)}" for o in orders)
        + f", {cfg0.data.limit} samples, batch "
        f"{cfg0.train.batch_size}, max_length {cfg0.data.max_length}, {cfg0.train.epochs} epoch(s), lr "
        f"{cfg0.train.learning_rate:g} {cfg0.train.lr_scheduler}. All runs in one process, one after the other, "
        "on a machine shared with other jobs: the ratios are what was measured side by side.", "",
        "## Cost", "",
        C.md_table(["order", "cache", "wall s (incl. model load)", "sum train() s", "sum fill s", "sum set-up s",
                    f"wall speed-up vs {first[0]} cache {first[1]}", f"modelled speed-up vs {first[0]} cache {first[1]}",
                    "cost model, layer-passes", "peak RSS MiB"], rows),
        "",
        "Cost model: `plan_compute.cache_cost(..., order=...)`, layer-passes (forward + input-gradient backward) over "
        "the whole plan, fills included for cache on (the LM head and the optimizer step, paid alike by every row, "
        "are not in it).", "",
        "Seconds of train() + fill per stage depth k (summed over the stages at that depth):", "",
        C.md_table(["k", *keys], depth_rows), "",
        *(f"- {d}" for d in diffs), "",
        "## Quality", "",
        "Per order, the run with the cache on where it was trained (else off). Training loss: mean stage loss of the final stages (k = L) and "
        "of all stages. Held-out: mean token loss (completion, EOS included) of each shard's served model (base + "
        f"its full-depth prefix) on the run's {len(run0.heldout())} held-out records, +- its standard error (delta "
        "method over samples). Member loss: the same on the shard's own training samples. AUC: the loss attack, "
        "P(member loss < held-out loss), 95% bootstrap CI; 0.5 = the served model does not tell its training "
        "samples from never-seen ones.", "",
        C.md_table(["order", "shard", "served prefix", "final-stage train loss", "all-stage train loss",
                    "held-out loss +- SE", "member loss", "membership AUC (loss)"], qrows), "",
        f"Quality evaluation took {q_s:.0f} s.",
    ])
    C.write_result(text + "\n", args.out)
    print(text)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
