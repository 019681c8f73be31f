"""The unlearning audit suite (``s3t_llm.evaluation.audit``) on a memorising setting: before and after an S3T exact deletion
of >= 32 samples, against the oracle (the run retrained without them) and the base model.

    python benchmarks/audit_suite.py --threads 2                   # tiny random Llama, memorising; minutes on CPU
    python benchmarks/audit_suite.py --model smollm2-135m-instruct --epochs 6 --lr 3e-3 --lora-r 8 --lora-layers 6

Setting: one shard, two slices, one sequence (B=1), ``--train`` samples trained for many epochs at a high learning
rate so that the attacks have power before deletion; the forget set is ``--forget`` samples of the sequence's last
slice. Rows:

* before deletion: the served prefix (both slices) trained on the forget set - the attacks must see it;
* after S3T deletion: the served prefix right after ``apply_deletion`` (the first slice's block only; exact);
* oracle: a copy of the deleted run retrained by ``train_run`` (the last stage trained again on the live data),
  i.e. the model S3T trains when the forget set was never there. PrivLeak and forget quality compare with it.

Each AUC: forget samples vs ``--heldout`` never-seen held-out samples of the ledger, 95% bootstrap CI
(``s3t_llm.evaluation.audit.auc_with_ci``). The same numbers come from ``s3t audit RUN --ids FILE --data FILE --oracle RUN``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny",
                    help="'tiny' (a random 4-layer Llama built here, init std 0.15) or a model alias or path")
    ap.add_argument("--train", type=int, default=72, help="training samples (two slices of half each)")
    ap.add_argument("--forget", type=int, default=32, help="forget samples, from the sequence's last slice")
    ap.add_argument("--heldout", type=int, default=64, help="never-seen held-out samples (non-members)")
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-layers", default="all", help="LoRA on the top N layers, or 'all'")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out", default=str(C.RESULTS / "audit_suite.md"))
    return ap


TINY_STD = 0.15


def tiny_model(work: Path) -> Path:
    """A random 4-layer Llama (hidden 128) with weights of std 0.15: with the default 0.02 the final RMSNorm and the
    frozen random output head cap the logits near uniform (loss ~ln V), and no LoRA can memorise anything."""
    from s3t_llm.models import build_tiny_llama

    corpus = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in C.alpaca_records(2000, seed=1)]
    return build_tiny_llama(work / "tiny-llama", corpus=corpus, num_layers=4, hidden_size=128, vocab_size=2048,
                            init_std=TINY_STD)


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.setup_device("cpu", args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from s3t_llm.evaluation.audit import ATTACKS, ATTACK_LABEL, audit_run
    from s3t_llm.config import load_config
    from s3t_llm.deletion import apply_deletion, publish
    from s3t_llm.models import resolve_model
    from s3t_llm.run import DATASET, Run
    from s3t_llm.training import train_run

    if args.forget < 32:
        print("note: fewer than 32 forget samples give CIs that say little", file=sys.stderr)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="audit-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model = str(tiny_model(work)) if args.model == "tiny" else resolve_model(args.model)
    data = C.write_records(C.alpaca_records(args.train + args.heldout, seed=0), work / "data.json")
    overrides = [f"name=audit-bench", f"output_dir={work / 'runs'}", f"model.name={model}", f"data.path={data}",
                 f"data.heldout={args.heldout}", f"data.max_length={args.max_length}", "s3t.shards=1", "s3t.slices=2",
                 "s3t.budget=1", f"train.epochs={args.epochs}", f"train.learning_rate={args.lr}",
                 f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}", f"lora.layers={args.lora_layers}",
                 "train.batch_size=8"]
    run = Run.create(load_config(None, overrides))
    t0 = time.perf_counter()
    train_run(run, progress=True)
    publish(run)
    t_train = time.perf_counter() - t0
    last = run.sequences[0][-1]
    with run.ledger() as led:
        cell = led.slice_samples(DATASET, 0, last)
    if len(cell) <= args.forget:
        raise SystemExit(f"the last slice holds {len(cell)} samples; --forget {args.forget} must leave some")
    forget = cell[:args.forget]
    ids = [sid for sid, _ in forget]
    records = {sid: rec for sid, rec in forget}  # kept in memory only: the deletion erases them from the ledger
    after = Run.open(shutil.copytree(run.dir, work / "after"))
    t0 = time.perf_counter()
    apply_deletion(after, ids)
    t_del = time.perf_counter() - t0
    oracle = Run.open(shutil.copytree(after.dir, work / "oracle"))
    t0 = time.perf_counter()
    train_run(oracle, progress=True)
    publish(oracle)
    t_oracle = time.perf_counter() - t0
    kw = dict(unseen=args.heldout, oracle=oracle.dir, n_boot=args.n_boot, max_new_tokens=args.max_new_tokens,
              echo=print)
    t0 = time.perf_counter()
    res_before = audit_run(run.dir, ids, **kw)
    res_after = audit_run(after.dir, ids, records, **kw)
    t_audit = time.perf_counter() - t0
    (work / "audit_before.json").write_text(json.dumps(res_before, indent=1))
    (work / "audit_after.json").write_text(json.dumps(res_after, indent=1))

    def auc(x):
        return "n/a" if not x or x.get("auc") is None else f"{x['auc']:.3f} [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"

    def pl(res, a):
        p = (res.get("privleak") or {}).get(a)
        return f"{100 * p['privleak']:+.1f}%" if p else "n/a"

    rows = [("before deletion (prefix " + "-".join(map(str, run.sequences[0])) + ")", res_before, "served"),
            ("after S3T deletion (prefix " + "-".join(map(str, res_after["served_adapters"]["0"]["prefix"])) + ")",
             res_after, "served"),
            ("oracle (retrained without the forget set)", res_after, "oracle"),
            ("base model (no fine-tuning)", res_after, "base")]
    k = f"{100 * res_after['k']:g}%"
    head = ["model"] + [ATTACK_LABEL[a].format(k=k) for a in ATTACKS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, res, col in rows:
        lines.append("| " + " | ".join([label] + [auc(res["attacks"][col].get(a)) if a in res["attacks"][col]
                                                   else "-" for a in ATTACKS]) + " |")
    lines2 = ["| model | PrivLeak (Min-K%) | PrivLeak (loss) | forget quality (KS p) | ROUGE-L F (greedy) | "
              "mean forget loss |", "|---|---|---|---|---|---|"]
    for label, res, col in rows:
        if col == "served":
            fq = f"{res['forget_quality']['pvalue']:.3g}"
            p1, p2 = pl(res, "min_k"), pl(res, "loss")
        elif col == "oracle":
            fq, p1, p2 = "1 (itself)", "0", "0"
        else:
            fq = p1 = p2 = "-"
        vb = res.get("verbatim", {}).get(col)
        lines2.append(f"| {label} | {p1} | {p2} | {fq} | {vb['rouge_l_f_mean']:.3f} | "
                      f"{res['mean_member_loss'][col]:.4f} |" if vb else f"| {label} | {p1} | {p2} | {fq} | - | - |")
    cmd = "python benchmarks/audit_suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        "# Unlearning audit suite on a memorising setting", "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {time.strftime('%Y-%m-%d')}; machine: {C.machine()}.", "",
        f"Base model: {f'a random 4-layer Llama (hidden 128, weights of std {TINY_STD}, BPE vocabulary 2048 trained on Alpaca)' if args.model == 'tiny' else args.model}; "
        f"{args.train} Alpaca training samples in 1 shard x 2 slices (B=1), LoRA r={args.lora_r} on "
        f"{'all' if args.lora_layers == 'all' else 'the top ' + args.lora_layers} layers, "
        f"{args.epochs:g} epochs at lr {args.lr:g}, max length {args.max_length} (memorising on purpose). Forget set: "
        f"{len(ids)} samples of the last slice; non-members: {res_after['n_unseen']} never-seen held-out samples of "
        f"the ledger. Training {t_train:.0f} s, deletion {t_del:.2f} s, oracle retraining {t_oracle:.0f} s, both "
        f"audits {t_audit:.0f} s, all {time.perf_counter() - t_all:.0f} s.", "",
        "## Membership AUC of the forget set against never-seen samples (95% bootstrap CI)", "",
        "AUC = P(forget score < never-seen score), ties 1/2: 1.0 = every forget sample recognised, 0.5 = "
        "indistinguishable. Scores: loss; zlib ratio (loss / zlib length of the response); Min-K% and Min-K%++ "
        f"(k={k}; Min-K%++ needs the full-vocabulary log-probabilities: offline backend); reference = loss minus the "
        "base model's loss.", "", *lines, "",
        "## PrivLeak, forget quality, verbatim memorisation", "",
        "PrivLeak = (AUC_model - AUC_oracle) / AUC_oracle (positive = leaks more than the oracle; MUSE's paper "
        "reports 1 - AUC, hence the opposite sign there). Forget quality: KS-test p-value between the per-sample "
        "mean token losses of the forget set under the model and under the oracle (TOFU). ROUGE-L F: greedy "
        f"completion of each forget prompt (as many tokens as the answer, at most {args.max_new_tokens}) against "
        "the answer (MUSE VerbMem).", "", *lines2, "",
        "The same numbers for one run: `s3t audit RUN --ids FILE --data FORGET_RECORDS --oracle ORACLE_RUN "
        "--output audit.json` (here `audit_before.json` / `audit_after.json` in the work directory "
        f"`{work}`).", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(md))
    print("\n".join(md))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
