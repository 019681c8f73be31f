"""Exact S3T deletion against the approximate unlearning methods, every one measured with the full audit suite
(``s3t_llm.evaluation.audit``: loss, zlib, Min-K%, Min-K%++ and reference attacks with bootstrap CIs, MUSE PrivLeak against
the oracle, TOFU forget quality, verbatim memorisation), on the memorising setting of ``audit_suite.py`` where the
attacks have power before deletion, with 32 forget samples.

    python benchmarks/unlearning_audit.py --threads 2          # tiny random Llama, memorising; ~10 minutes on CPU

Rows: the served model before deletion; S3T exact deletion (the shorter prefix); the oracle (the deleted run
retrained on the same plan: the model that never saw the forget set); DEL, DEL with random rows, GA, GradDiff,
NPO, NPO+RT (``s3t_llm.unlearn.unlearn``) applied to the model before deletion. PrivLeak and forget quality
compare each with the oracle; the reference attack uses the base model as reference.
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
from audit_suite import TINY_STD, tiny_model  # noqa: E402

METHODS = ["del", "del_random", "ga", "graddiff", "npo", "npo_rt"]
LABEL = {"del": "DEL (mean, alpha {a})", "del_random": "DEL random rows (alpha {a})", "ga": "GA",
         "graddiff": "GradDiff", "npo": "NPO", "npo_rt": "NPO+RT"}


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=72, help="training samples (two slices of half each)")
    ap.add_argument("--forget", type=int, default=32, help="forget samples, from the sequence's last slice")
    ap.add_argument("--heldout", type=int, default=64, help="never-seen held-out samples (non-members)")
    ap.add_argument("--epochs", type=float, default=10.0)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    ap.add_argument("--alpha", type=float, default=0.3, help="DEL: fraction of lora_B rows reset")
    ap.add_argument("--del-epochs", type=float, default=1.0, help="DEL: passes over the retain set")
    ap.add_argument("--ga-epochs", type=float, default=2.0, help="GA/GradDiff/NPO: passes over the forget set")
    ap.add_argument("--ga-lr", type=float, default=1e-3, help="GA/GradDiff/NPO learning rate")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--out", default=str(C.RESULTS / "unlearning_audit.md"))
    return ap


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    C.setup_device("cpu", args.threads)
    import logging

    logging.basicConfig(level=logging.WARNING)
    from s3t_llm.evaluation.audit import ATTACK_LABEL, ATTACKS, _load_base, _load_served_model, audit_model, compare_to_oracle
    from s3t_llm.config import load_config
    from s3t_llm.deletion import apply_deletion, publish
    from s3t_llm.run import DATASET, Run
    from s3t_llm.training import train_run
    from s3t_llm.unlearn import unlearn

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="unlearn-audit-"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model = str(tiny_model(work))
    data = C.write_records(C.alpaca_records(args.train + args.heldout, seed=0), work / "data.json")
    overrides = ["name=unlearn-audit", f"output_dir={work / 'runs'}", f"model.name={model}", f"data.path={data}",
                 f"data.heldout={args.heldout}", f"data.max_length={args.max_length}", "s3t.shards=1", "s3t.slices=2",
                 "s3t.budget=1", f"train.epochs={args.epochs}", f"train.learning_rate={args.lr}",
                 f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}", "lora.layers=all", "train.batch_size=8"]
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
    ids = [sid for sid, _ in cell[:args.forget]]
    members = [{k: v for k, v in rec.items() if k != "id"} for _, rec in cell[:args.forget]]
    nonmembers = [{k: v for k, v in r.items() if k != "id"} for r in run.heldout()[:args.heldout]]

    # The approximate methods edit the model that saw the forget set (a copy: they write under unlearned/).
    approx = Run.open(shutil.copytree(run.dir, work / "approx"))
    paths, seconds, manifests = {}, {}, {}
    for m in args.methods:
        print(f"{m} ...", flush=True)
        t0 = time.perf_counter()
        paths[m] = unlearn(approx.dir, ids, m, shard=0, alpha=args.alpha,
                           epochs=args.del_epochs if m.startswith("del") else args.ga_epochs,
                           lr=None if m.startswith("del") else args.ga_lr, out_name=f"ua-{m.replace('_', '-')}")
        seconds[m] = time.perf_counter() - t0
    after = Run.open(shutil.copytree(run.dir, work / "after"))
    t0 = time.perf_counter()
    apply_deletion(after, ids)
    seconds["s3t"] = time.perf_counter() - t0
    oracle = Run.open(shutil.copytree(after.dir, work / "oracle"))
    t0 = time.perf_counter()
    train_run(oracle, progress=False)
    publish(oracle)
    seconds["oracle"] = time.perf_counter() - t0

    from peft import PeftModel
    from transformers import AutoTokenizer

    from s3t_llm.evaluation.audit import score_records_hf

    tok = AutoTokenizer.from_pretrained(run.model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    cfg = run.config
    kw = dict(template=cfg.data.template, max_length=cfg.data.max_length, n_boot=args.n_boot,
              max_new_tokens=args.max_new_tokens)
    base = _load_base(run)
    ref = (score_records_hf(base, tok, members, template=cfg.data.template, max_length=cfg.data.max_length),
           score_records_hf(base, tok, nonmembers, template=cfg.data.template, max_length=cfg.data.max_length))
    res = {"base": audit_model(base, tok, members, nonmembers, **kw)}
    del base
    t_audit = time.perf_counter()
    for key, r in (("before", run), ("s3t", after), ("oracle", oracle)):
        print(f"auditing {key} ...", flush=True)
        mdl, a = _load_served_model(r, 0)
        res[key] = audit_model(mdl, tok, members, nonmembers, reference=ref, **kw)
        res[key]["prefix"] = a["prefix"]
        del mdl
    for m in args.methods:
        print(f"auditing {m} ...", flush=True)
        mdl = PeftModel.from_pretrained(_load_base(run), str(paths[m])).eval()
        res[m] = audit_model(mdl, tok, members, nonmembers, reference=ref, **kw)
        del mdl
    t_audit = time.perf_counter() - t_audit
    cmp = {key: compare_to_oracle(res[key], res["oracle"]) for key in res if key not in ("oracle",)}

    def auc(x):
        return "-" if not x or x.get("auc") is None else f"{x['auc']:.3f} [{x['ci'][0]:.2f}, {x['ci'][1]:.2f}]"

    def pl(key, a):
        if key == "oracle":
            return "0"
        p = cmp[key]["privleak"].get(a) if key in cmp else None
        return f"{100 * p['privleak']:+.1f}%" if p else "-"

    order = [("before", f"before deletion (prefix {'-'.join(map(str, res['before']['prefix']))})", "-", "-"),
             ("s3t", f"S3T exact deletion (prefix {'-'.join(map(str, res['s3t']['prefix']))})", "exact",
              f"{seconds['s3t']:.2f}"),
             ("oracle", "oracle (retrained without the forget set)", "exact", f"{seconds['oracle']:.0f}")]
    order += [(m, LABEL[m].format(a=args.alpha), "none", f"{seconds[m]:.0f}") for m in args.methods]
    order += [("base", "base model (no fine-tuning)", "-", "-")]
    k = "20%"
    head = ["method"] + [ATTACK_LABEL[a].format(k=k) for a in ATTACKS]
    t1 = [head, ["---"] * len(head)]
    for key, label, _, _ in order:
        t1.append([label] + [auc(res[key]["attacks"].get(a)) for a in ATTACKS])
    head2 = ["method", "PrivLeak (Min-K%)", "PrivLeak (loss)", "forget quality (KS p)", "ROUGE-L F",
             "mean forget loss", "seconds", "guarantee"]
    t2 = [head2, ["---"] * len(head2)]
    for key, label, guarantee, sec in order:
        fq = "1 (itself)" if key == "oracle" else (f"{cmp[key]['forget_quality']['pvalue']:.3g}" if key in cmp else "-")
        t2.append([label, pl(key, "min_k"), pl(key, "loss"), fq, f"{res[key]['rouge_l_f']:.3f}",
                   f"{res[key]['mean_member_loss']:.3f}", sec, guarantee])
    md_t = lambda rows: "\n".join("| " + " | ".join(r) + " |" for r in rows)  # noqa: E731
    cmd = "python benchmarks/unlearning_audit.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [
        "# Exact S3T deletion vs approximate unlearning, under the full audit suite", "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {C.machine()}; total {time.perf_counter() - t_all:.0f} s "
        f"(training {t_train:.0f} s, audits {t_audit:.0f} s).", "",
        f"Setting (memorising on purpose, as `audit_suite.py`): a random 4-layer Llama (hidden 128, weights of std "
        f"{TINY_STD}), {args.train} Alpaca samples in 1 shard x 2 slices (B=1), LoRA r={args.lora_r} on all layers, "
        f"{args.epochs:g} epochs at lr {args.lr:g}. Forget set: {len(ids)} samples of the last slice; non-members: "
        f"{len(nonmembers)} never-seen held-out samples. Approximate methods (`s3t_llm.unlearn`) start from the model "
        f"before deletion: DEL resets alpha={args.alpha} of the lora_B rows and fine-tunes {args.del_epochs:g} "
        f"epoch(s) on the retain set at the run's lr; GA/GradDiff/NPO/NPO+RT run {args.ga_epochs:g} epochs over the "
        f"forget set at lr {args.ga_lr:g}.", "",
        "## Membership AUC of the forget set against never-seen samples (95% bootstrap CI)", "",
        "1.0 = every forget sample recognised as a member; 0.5 = indistinguishable (the oracle's level is the target); "
        "well below 0.5 = over-forgotten (the forget samples now look *less* likely than unseen text, which an "
        "attacker detects just as well).", "", md_t(t1), "",
        "## PrivLeak, forget quality, verbatim memorisation", "",
        "PrivLeak = (AUC - AUC_oracle) / AUC_oracle (0 is the target; MUSE's paper uses 1 - AUC, hence the opposite "
        "sign). Forget quality: KS-test p-value between the per-sample forget losses under the model and under the "
        "oracle (TOFU; high = indistinguishable from the oracle). ROUGE-L F: greedy completion of each forget prompt "
        f"(at most {args.max_new_tokens} tokens) against its answer.", "", md_t(t2), "",
        "Only the S3T rows carry a guarantee: the served blocks provably never saw a deleted sample. The approximate "
        "rows are a model that saw them, then edited.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(md))
    print("\n".join(md))
    print(f"\nwritten: {args.out}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
