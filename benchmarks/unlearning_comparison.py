"""Exact S3T deletion vs approximate unlearning (DEL, GA, GradDiff, NPO) on one forget set of one shard.

    python benchmarks/unlearning_comparison.py --threads 1                       # runs/smollm2-cpu if trained, else a small run
    python benchmarks/unlearning_comparison.py --run runs/smollm2-cpu --threads 1

The run is never modified: it is copied twice into the work directory, one copy for S3T's exact deletion
(``s3t_llm.deletion.apply_deletion``, then ``train_run`` of the shard = the oracle), one for the approximate
methods (``s3t_llm.unlearn.unlearn``, which writes new adapters under ``unlearned/``).

Rows:
* original: the adapter served before any unlearning (trained on the forget set);
* S3T deletion: the shorter surviving prefix served right after ``apply_deletion`` (exact, no retraining);
* oracle (S3T retrained): the shard's blocks that saw a deleted sample retrained on live data by ``train_run``,
  i.e. exactly the model S3T trains when the forget set was never there (same seeds, same live data);
* DEL / DEL-random / GA / GradDiff / NPO / NPO+RT: ``unlearn(run, ids, method)`` on the original adapter.

Metrics (mean completion-token NLL, the training tokenisation): forget set, retain set (the live samples of the
served prefix's slices minus the forget set), held-out set (``run.heldout()``); membership AUC = Mann-Whitney AUC
of the per-sample losses, forget (members) vs held-out (non-members): 0.5 = indistinguishable; wall seconds of
the unlearning step (S3T: ``apply_deletion``; oracle: the retraining; approximate: the whole ``unlearn`` call,
model load and save included).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RUN = REPO / "runs" / "smollm2-cpu"
# The fallback when no trained run is given or found: the CPU recipe made small (one shard, one sequence,
# 16 samples a slice, LoRA on the top 6 layers), two epochs so that the forget set leaves a trace to remove.
SMALL = ["name=unlearn-bench", "s3t.shards=1", "s3t.budget=1", "data.limit=48", "data.heldout=32",
         "data.max_length=128", "lora.layers=6", "train.epochs=2"]
METHODS = ["del", "del_random", "ga", "graddiff", "npo", "npo_rt"]
LABEL = {"del": "DEL (mean, alpha {a})", "del_random": "DEL random rows (alpha {a})", "ga": "GA", "graddiff": "GradDiff",
         "npo": "NPO", "npo_rt": "NPO+RT"}


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=None, help=f"a trained run (copied, never modified); default {DEFAULT_RUN} "
                                                "if its shard is fully trained and no --set is given, else a small "
                                                "run trained here")
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "cpu_smollm2.yaml"), help="recipe of the small run")
    ap.add_argument("--set", nargs="*", default=None, metavar="KEY=VALUE",
                    help=f"train a small run with these overrides of --recipe (default: {' '.join(SMALL)})")
    ap.add_argument("--shard", type=int, default=0)
    ap.add_argument("--n-forget", type=int, default=8)
    ap.add_argument("--slice-pos", type=int, default=0,
                    help="forget samples come from this position (1-based) of the served prefix; 0 = its last slice")
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--alpha", type=float, default=0.3)
    ap.add_argument("--del-epochs", type=float, default=1.0, help="DEL: passes over the retain set")
    ap.add_argument("--ga-epochs", type=float, default=5.0, help="GA/GradDiff/NPO: passes over the forget set")
    ap.add_argument("--lr", type=float, default=None, help="default: the run's train.learning_rate")
    ap.add_argument("--ga-lr", type=float, default=None, help="GA/GradDiff/NPO learning rate (default: --lr)")
    ap.add_argument("--beta", type=float, default=0.1, help="NPO beta")
    ap.add_argument("--max-eval", type=int, default=32,
                    help="evaluate retain and held-out losses on at most this many samples each (seeded subset)")
    ap.add_argument("--tasks", default="arc_easy,piqa", help="zero-shot tasks scored for every model ('' for none)")
    ap.add_argument("--task-limit", type=int, default=40, help="items per zero-shot task (a fixed seeded subset)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out", default=str(C.RESULTS / "unlearning_comparison.md"))
    return ap


def fully_trained(run, shard: int) -> bool:
    from s3t_llm.training import stage_plan

    hashes = run.slice_hashes()
    return all(run.block_is_valid(s, p, hashes) for s, p in stage_plan(run, [shard]))


ZERO_SHOT: list = []  # evaluation.Task objects (set in main from --tasks)


def adapter_losses(run, adapter_dir: Path, sets: dict) -> dict:
    """Per-example losses of base + the adapter at ``adapter_dir`` on each named example list, and its zero-shot
    accuracy on the ``--tasks`` subsets (key ``zero_shot``)."""
    import torch
    from peft import PeftModel

    from s3t_llm.models import load_base
    from s3t_llm.unlearn import example_losses

    base, tok = load_base(run.model_path, "fp32", for_training=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    ml = run.config.data.max_length
    with torch.no_grad():
        out = {k: example_losses(model, tok, v, max_length=ml, batch_size=8) for k, v in sets.items()}
    if ZERO_SHOT:
        from s3t_llm.evaluation import HFScorer, evaluate

        res = evaluate(HFScorer(model, tok, batch_size=16), ZERO_SHOT, progress=False)
        out["zero_shot"] = {t: r["scorers"]["model"]["acc"] for t, r in res["tasks"].items()}
    return out


def row(label: str, losses: dict, seconds: float | None, guarantee: str) -> dict:
    from s3t_llm.unlearn import membership_auc

    def mean(xs):
        xs = [x for x in xs if not math.isnan(x)]
        return sum(xs) / max(1, len(xs))

    return {"method": label, "forget": mean(losses["forget"]), "retain": mean(losses["retain"]),
            "heldout": mean(losses["heldout"]), "auc": membership_auc(losses["forget"], losses["heldout"]),
            "zero_shot": losses.get("zero_shot", {}), "seconds": seconds, "guarantee": guarantee}


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.setup_device("cpu", args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from s3t_llm.config import load_config
    from s3t_llm.deletion import apply_deletion, publish, serving_plan
    from s3t_llm.prompts import to_example
    from s3t_llm.run import DATASET, Run
    from s3t_llm.training import train_run
    from s3t_llm.unlearn import unlearn

    from s3t_llm.evaluation import load_task

    ZERO_SHOT[:] = [load_task(t, limit=args.task_limit, seed=0) for t in args.tasks.split(",") if t.strip()]
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="unlearn-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    train_note = ""
    if args.run is None and args.set is None and DEFAULT_RUN.exists() and fully_trained(Run.open(DEFAULT_RUN), args.shard):
        args.run = str(DEFAULT_RUN)
    overrides = SMALL if args.set is None else args.set
    if args.run:
        src = Run.open(args.run)
        if not fully_trained(src, args.shard):
            raise SystemExit(f"{args.run}: shard {args.shard} is not fully trained; run `s3t train` first")
        setting = f"trained run `{args.run}` (recipe as frozen in its run.json)"
    else:
        cfg = load_config(args.recipe, [*overrides, f"output_dir={work / 'trained'}"])
        src = Run.create(cfg)
        t0 = time.perf_counter()
        train_run(src, shards=[args.shard], progress=True)
        train_note = f" (trained here in {time.perf_counter() - t0:.0f} s, shard {args.shard} only)"
        setting = f"small run from `{Path(args.recipe).name}` with overrides `{' '.join(overrides)}`{train_note}"
    exact = Run.open(shutil.copytree(src.dir, work / "s3t"))
    approx = Run.open(shutil.copytree(src.dir, work / "approx"))
    for r in (exact, approx):
        publish(r)
    cfg = src.config
    plan = serving_plan(approx)[args.shard]
    prefix = plan["prefix"]
    sl = prefix[(args.slice_pos or len(prefix)) - 1]
    with approx.ledger() as led:
        cell = led.slice_samples(DATASET, args.shard, sl)
        live = [(sid, r) for s in prefix for sid, r in led.slice_samples(DATASET, args.shard, s)]
    if len(cell) < args.n_forget:
        raise SystemExit(f"slice {sl} of shard {args.shard} has only {len(cell)} live samples")
    ids = [sid for sid, _ in cell[:args.n_forget]]
    forget_recs = [r for _, r in cell[:args.n_forget]]
    retain_recs = [r for sid, r in live if sid not in set(ids)]
    heldout = approx.heldout()
    if not heldout:
        raise SystemExit("the run has no held-out records (data.heldout=0): the membership AUC needs them")
    import random

    pick = lambda xs: xs if len(xs) <= args.max_eval else random.Random(0).sample(xs, args.max_eval)  # noqa: E731
    n_retain, n_heldout = len(retain_recs), len(heldout)
    retain_recs, heldout = pick(retain_recs), pick(heldout)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(approx.model_path)
    sets = {k: [to_example(r, cfg.data.template, tok) for r in v]
            for k, v in (("forget", forget_recs), ("retain", retain_recs), ("heldout", heldout))}
    rows = []
    print(f"forget: {len(ids)} samples of shard {args.shard} slice {sl}; retain {n_retain}; held-out {n_heldout}",
          flush=True)

    orig = approx.store.adapter_dir(plan["name"])
    rows.append(row(f"original (prefix {'-'.join(map(str, prefix))}, no unlearning)",
                    adapter_losses(approx, orig, sets), None, "-"))
    # S3T exact deletion: the shorter prefix, then the retrained shard (= the oracle).
    t0 = time.perf_counter()
    cert = apply_deletion(exact, ids)
    t_del = time.perf_counter() - t0
    short = serving_plan(exact)[args.shard]
    if short is None:
        rows.append({"method": "S3T deletion (shard dead until retrained)", "seconds": t_del, "guarantee": "exact"})
    else:
        rows.append(row(f"S3T deletion (prefix {'-'.join(map(str, short['prefix']))} served)",
                        adapter_losses(exact, exact.store.adapter_dir(short["name"]), sets), t_del, "exact"))
    t0 = time.perf_counter()
    # Only the served sequence's blocks: the oracle is its full prefix retrained (other sequences would follow).
    summ = train_run(exact, shards=[args.shard], sequences=[plan["sequence"]], progress=False)
    publish(exact)
    t_re = time.perf_counter() - t0
    full = serving_plan(exact)[args.shard]
    oracle = adapter_losses(exact, exact.store.adapter_dir(full["name"]), sets)
    rows.append(row(f"oracle = S3T retrained ({summ['stages_trained']} blocks, prefix "
                    f"{'-'.join(map(str, full['prefix']))})", oracle, t_re, "exact"))
    manifests = {}
    for m in args.methods:
        print(f"{m} ...", flush=True)
        epochs = args.del_epochs if m.startswith("del") else args.ga_epochs
        lr_m = args.lr if m.startswith("del") or args.ga_lr is None else args.ga_lr
        t0 = time.perf_counter()
        path = unlearn(approx.dir, ids, m, shard=args.shard, alpha=args.alpha, epochs=epochs, lr=lr_m,
                       beta=args.beta, out_name=f"bench-{m.replace('_', '-')}")
        sec = time.perf_counter() - t0
        manifests[m] = json.loads((path / "unlearn_manifest.json").read_text())
        rows.append(row(LABEL[m].format(a=args.alpha), adapter_losses(approx, path, sets), sec, "none"))

    fmt = lambda x, p=3: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    o = rows[2] if "forget" in rows[2] else None
    zs = [t.name for t in ZERO_SHOT]
    table = C.md_table(
        ["method", "forget loss", "retain loss", "held-out loss", "membership AUC", "|forget - oracle|"]
        + [f"{t} acc" for t in zs] + ["seconds", "guarantee"],
        [[r["method"], fmt(r.get("forget")), fmt(r.get("retain")), fmt(r.get("heldout")), fmt(r.get("auc")),
          fmt(abs(r["forget"] - o["forget"])) if o and "forget" in r else "-"]
         + [fmt(100 * r["zero_shot"][t], 1) if t in r.get("zero_shot", {}) else "-" for t in zs]
         + [fmt(r.get("seconds"), 1), r["guarantee"]] for r in rows])
    d = manifests.get("del", {})
    reset_txt = (f"DEL reset {d['reset']['rows']} lora_B rows = {d['reset']['params']} parameters "
                 f"({100 * d['reset']['frac_of_B']:.1f}% of B, {100 * d['reset']['frac_of_lora']:.1f}% of all LoRA "
                 f"parameters) in {d['reset']['modules_touched']} of {d['reset']['modules']} B matrices; "
                 f"localisation {d['localize_seconds']:.1f} s, fine-tuning {d['train']['steps']} steps "
                 f"{d['train']['seconds']:.1f} s.") if d else ""
    cmd = "python benchmarks/unlearning_comparison.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lr = args.lr if args.lr is not None else cfg.train.learning_rate
    lines = [
        "# Exact S3T deletion vs approximate unlearning", "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {C.machine()}; total {time.perf_counter() - t_all:.0f} s", "",
        f"Setting: {setting}. Base `{Path(cfg.model.name).name}`, LoRA r={cfg.lora.r} on layers {src.info['blocks']}"
        f" ({cfg.s3t.slices} blocks), {cfg.s3t.shards} shard(s) x {cfg.s3t.slices} slices, "
        f"data.max_length={cfg.data.max_length}, train.epochs={cfg.train.epochs}, lr {cfg.train.learning_rate}.", "",
        f"Forget set: {len(ids)} samples of shard {args.shard}, slice {sl} (slice {prefix.index(sl) + 1} of the "
        f"served prefix {prefix}); retain set: the other {n_retain} samples of the prefix's slices; "
        f"held-out: {n_heldout} records never trained on; retain and held-out losses on a seeded subset of "
        f"{len(retain_recs)} and {len(heldout)} of them. S3T's deletion destroyed "
        f"{sum(1 for a in cert['destroyed'] if a['kind'] == 'block')} blocks.", "",
        f"Approximate methods (`s3t_llm.unlearn.unlearn`): lr {lr}, batch {cfg.train.batch_size}; DEL: alpha "
        f"{args.alpha} of the lora_B parameters, {args.del_epochs} epoch(s) over the retain set; GA/GradDiff/NPO/NPO+RT: "
        f"{args.ga_epochs} epochs over the forget set (NPO beta {args.beta}), lr "
        f"{args.ga_lr if args.ga_lr is not None else lr}, all LoRA tensors trainable. "
        + reset_txt, "",
        table, "",
        "Losses: mean completion-token NLL (lower = better fit). Membership AUC: loss-threshold attack, forget "
        "samples (members) vs held-out (non-members); 0.5 = the loss does not tell them apart; with "
        f"{len(ids)} x {len(heldout)} pairs its noise is several hundredths. |forget - oracle|: distance of the "
        "forget loss to the retrained model's (0 is the target; over-forgetting counts too). "
        + (f"Zero-shot accuracy (%): {', '.join(f'{t.name} on {len(t)} items' for t in ZERO_SHOT)} (a fixed seeded "
           f"subset; binomial standard error about ±{100 * (0.25 / max(1, min(len(t) for t in ZERO_SHOT))) ** 0.5:.0f} "
           "points)." if ZERO_SHOT else ""), "",
        "Only the S3T rows carry a guarantee: the served adapter's blocks provably never saw a deleted sample "
        "(the deletion certificate lists their training samples). The approximate rows are a model that did see "
        "them, then edited: matching the oracle's losses on average is evidence, not proof.",
    ]
    C.write_result("\n".join(lines) + "\n", args.out)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
