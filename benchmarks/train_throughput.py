"""Stage-training throughput of S3T against a plain TRL LoRA fine-tune of the same model on the same data.

    python benchmarks/train_throughput.py --examples 64 --max-length 128 --batch-size 4 --repeats 3

What is compared (one process, calls interleaved plain/S3T/S3T/plain/... because the machine is shared):

* plain: a PEFT LoRA model (same r, alpha, rslora, projections, layers) trained by ``trl.SFTTrainer``
  directly, every LoRA parameter trainable.
* S3T: ``StageTrainer.train_stage`` of a run with ONE slice (s3t.slices=1, so one block = every LoRA layer):
  exactly the same trainable parameters, the same examples in the same order, the same seed (so the
  same LoRA init, batches and losses) and the same number of optimizer steps. The difference is pure
  orchestration: ledger reads, stack set-up, the frozen-block check, the block store write.

Timed (wall clock, with a CUDA synchronize at both ends on a GPU):
* S3T: the whole ``train_stage`` call: ledger reads and prompt formatting (twice), stack set-up,
  ``Dataset.from_list`` + ``SFTTrainer`` construction (tokenisation), ``train()``, the frozen-tensor check,
  the block write (safetensors + sha256 + fsync) and its manifest.
* plain: output-dir creation, ``Dataset.from_list`` + ``SFTTrainer`` construction, ``train()``, clean-up.
  The LoRA re-initialisation before each plain call is not timed (S3T's is).
* Neither includes loading the base model (done once per process for each).

Tokens = sum of ``input_ids`` lengths of the tokenised train dataset (unpadded) x epochs, counted the same
way for both (the S3T manifest's ``tokens``). tokens/s = tokens / wall. Reported: 1 - s3t/plain tokens/s
(median over back-to-back pairs, ratio of medians, best-of), and the orchestration overhead proper: S3T's time outside ``train()`` minus
plain's, over the plain wall. ``train()`` is the same code on the same work in both (the losses match),
so on a noisy machine the raw ratio mostly measures noise; the second number does not. An L=3 run's
per-stage numbers are reported for information: stage k trains block k only and its backward stops at
block k's lowest layer (blocks are top-down), while stage k's data is the first k slices.

GPU (not run in CI): ``--device cuda --from-config 1b --precision bf16`` builds a ~1.04B random Llama.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_model_args(ap)
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--layers", type=int, default=12, help="LoRA on the top N decoder layers (clamped to the model)")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--no-rslora", action="store_true")
    ap.add_argument("--repeats", type=int, default=4, help="timed plain/S3T pairs (medians reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed plain/S3T pairs first")
    ap.add_argument("--stages-L", type=int, default=3, help="slices of the informational per-stage run (0: skip)")
    ap.add_argument("--profile", action="store_true", help="cProfile one extra call of each and report where S3T's time goes")
    ap.add_argument("--out", default=str(C.RESULTS / "train_throughput.md"))
    return ap


class PlainLoRA:
    """The baseline: one PEFT LoRA model over the same layers, trained by trl.SFTTrainer directly."""

    def __init__(self, model_path: str, precision: str, run):
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        from s3t_llm.models import load_base

        cfg = run.config
        base, self.tokenizer = load_base(model_path, precision, for_training=True)
        lc = cfg.lora
        layers = sorted(i for b in run.blocks for i in b)
        self.model = get_peft_model(base, LoraConfig(
            r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, use_rslora=lc.rslora,
            target_modules=list(lc.target_modules), layers_to_transform=layers, layers_pattern="layers",
            bias="none", task_type="CAUSAL_LM"))
        self.lora_modules = sorted((n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer))
        self.cfg = cfg

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def reinit(self, seed: int) -> None:
        """PEFT's init (A random, B = 0) under the stage's seed, in the stage trainer's order."""
        import torch

        with torch.no_grad():
            torch.manual_seed(seed)
            for _, mod in self.lora_modules:
                mod.reset_lora_parameters("default", True)

    def train(self, examples: list[dict], seed: int, work: Path) -> dict:
        import torch
        from datasets import Dataset
        from transformers import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        t, d = self.cfg.train, self.cfg.data
        C.synchronize()
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=".plain-", dir=work))
        # The same SFTConfig as StageTrainer.train_stage, field for field.
        args = SFTConfig(
            output_dir=str(tmp), num_train_epochs=t.epochs, max_steps=t.max_steps,
            per_device_train_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
            weight_decay=t.weight_decay, seed=seed, data_seed=seed, logging_steps=t.logging_steps,
            save_strategy="no", report_to=[], disable_tqdm=True, max_length=d.max_length,
            gradient_checkpointing=t.gradient_checkpointing, bf16=False, fp16=False,
            use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
            completion_only_loss=True, packing=False,
        )
        trainer = SFTTrainer(model=self.model, args=args, train_dataset=Dataset.from_list(examples),
                             processing_class=self.tokenizer)
        trainer.remove_callback(PrinterCallback)
        t1 = time.perf_counter()
        out = trainer.train()
        C.synchronize()
        t2 = time.perf_counter()
        ds = trainer.train_dataset
        del trainer
        shutil.rmtree(tmp, ignore_errors=True)
        t3 = time.perf_counter()
        n_tokens = int(sum(len(x) for x in ds["input_ids"])) * max(1, round(t.epochs))
        return {"wall": t3 - t0, "train": t2 - t1, "tokens": n_tokens, "steps": int(out.global_step),
                "loss": float(out.training_loss)}


def s3t_call(trainer, shard: int, prefix: tuple[int, ...]) -> dict:
    C.synchronize()
    t0 = time.perf_counter()
    man = trainer.train_stage(shard, prefix)
    C.synchronize()
    wall = time.perf_counter() - t0
    return {"wall": wall, "train": man["seconds"], "tokens": man["tokens"], "steps": man["steps"],
            "loss": man["train_loss"], "n_used": man["n_used"]}


def profile_call(fn, names: dict[str, str]) -> tuple[float, dict[str, tuple[int, float]], str]:
    """Run ``fn`` under cProfile; return its wall time, {label: (calls, cumulative s)} and the top of the report."""
    import io

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(fn)
    wall = time.perf_counter() - t0
    st = pstats.Stats(prof)
    found: dict[str, tuple[int, float]] = {}
    for (file, _line, func), (_cc, nc, _tt, ct, _callers) in st.stats.items():
        for label, pattern in names.items():
            pf, _, pfunc = pattern.rpartition(":")
            if func == pfunc and file.replace("\\", "/").endswith(pf):
                c0, t0_ = found.get(label, (0, 0.0))
                found[label] = (c0 + nc, t0_ + ct)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(35)
    return wall, found, buf.getvalue()


PROFILE_NAMES = {
    "train_stage (whole call)": "s3t_llm/training.py:train_stage",
    "stage_examples (ledger reads + prompts, x2)": "s3t_llm/training.py:stage_examples",
    "set_stack (load/zero/init blocks)": "s3t_llm/training.py:set_stack",
    "block_tensors (clone block to CPU)": "s3t_llm/training.py:block_tensors",
    "AdapterStore.write_block (safetensors+sha256+fsync)": "s3t_llm/adapters.py:write_block",
    "torch.equal (frozen-tensor check)": "~:<built-in method torch.equal>",
    "Dataset.from_list": "datasets/arrow_dataset.py:from_list",
    "SFTTrainer.__init__ (incl. tokenisation)": "trl/trainer/sft_trainer.py:__init__",
    "Trainer.train": "transformers/trainer.py:train",
    "tempfile.mkdtemp": "tempfile.py:mkdtemp",
    "shutil.rmtree": "shutil.py:rmtree",
}


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    device = C.setup_device(args.device, args.threads)
    import datasets

    from s3t_llm.config import load_config
    from s3t_llm.models import check_llama, load_config as load_model_config
    from s3t_llm.run import Run
    from s3t_llm.training import StageTrainer, stage_seed

    datasets.disable_progress_bars()
    import logging

    import trl  # noqa: F401  imported before any timing: the first call must not pay for it

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="s3t-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    model_path = C.resolve_base(args)
    n_layers = check_llama(load_model_config(model_path))
    layers = min(args.layers, n_layers)
    data = C.write_records(C.alpaca_records(args.examples, seed=0), work / "data.json")
    common = [f"output_dir={work}", f"model.name={model_path}", f"model.precision={args.precision}",
              f"data.path={data}", f"data.max_length={args.max_length}", "data.heldout=0",
              "s3t.shards=1", "s3t.budget=1", f"lora.r={args.r}", f"lora.alpha={args.alpha}",
              f"lora.rslora={'false' if args.no_rslora else 'true'}", f"lora.layers={layers}",
              f"train.batch_size={args.batch_size}", f"train.epochs={args.epochs}", "train.seed=0"]

    run1 = Run.create(load_config(None, [*common, "name=L1", "s3t.slices=1"]))
    t0 = time.perf_counter()
    s3t = StageTrainer(run1, args.precision)
    load_s3t = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain = PlainLoRA(model_path, args.precision, run1)
    load_plain = time.perf_counter() - t0
    prefix = (0,)
    seed = stage_seed(run1.config.train.seed, 0, prefix)
    examples, _, _ = s3t.stage_examples(0, prefix)
    n_s3t = sum(p.numel() for _, p in s3t.block_params[1])
    if n_s3t != plain.n_trainable():
        raise RuntimeError(f"trainable sets differ: S3T block 1 has {n_s3t}, plain {plain.n_trainable()}")
    print(f"{len(examples)} examples, LoRA on layers {run1.blocks[0][0]}..{run1.blocks[0][-1]} "
          f"({n_s3t} trainable parameters), device {device}, work dir {work}")

    def do(which: str) -> dict:
        if which == "plain":
            plain.reinit(seed)
            r = plain.train(examples, seed, work)
        else:
            r = s3t_call(s3t, 0, prefix)
        r["tok_s"] = r["tokens"] / r["wall"]
        r["tok_s_train"] = r["tokens"] / r["train"]
        return r

    results = {"plain": [], "s3t": []}
    for i in range(args.warmup + args.repeats):
        order = ("plain", "s3t") if i % 2 == 0 else ("s3t", "plain")
        for which in order:
            r = do(which)
            tag = "warm-up" if i < args.warmup else f"repeat {i - args.warmup + 1}"
            print(f"  {tag:9s} {which:5s}: {r['tokens']} tokens, {r['steps']} steps, wall {r['wall']:.2f}s "
                  f"(train() {r['train']:.2f}s) -> {r['tok_s']:.1f} tok/s, loss {r['loss']:.4f}")
            if i >= args.warmup:
                results[which].append(r)
    p, s = results["plain"], results["s3t"]
    if {r["steps"] for r in p} != {r["steps"] for r in s} or {r["tokens"] for r in p} != {r["tokens"] for r in s}:
        raise RuntimeError("plain and S3T did not do the same work (steps or tokens differ)")
    same_loss = all(abs(a["loss"] - b["loss"]) <= 1e-6 * max(1.0, abs(b["loss"])) for a, b in zip(s, p))
    overhead = 1 - med(s, "tok_s") / med(p, "tok_s")
    overhead_train = 1 - med(s, "tok_s_train") / med(p, "tok_s_train")
    overhead_best = 1 - max(r["tok_s"] for r in s) / max(r["tok_s"] for r in p)
    # Paired per repeat too (each pair ran back to back): less exposed to drift on a shared machine.
    paired = [1 - a["tok_s"] / b["tok_s"] for a, b in zip(s, p)]
    # train() runs the same code on the same trainable set and batches in both (identical losses show it), so
    # what S3T adds is what lies outside train(): measured directly it does not drown in train()'s noise.
    extra = [(a["wall"] - a["train"]) - (b["wall"] - b["train"]) for a, b in zip(s, p)]
    orch = statistics.median(extra) / med(p, "wall")

    prof_rows, prof_text = [], ""
    if args.profile:
        plain.reinit(seed)
        w_p, f_p, _ = profile_call(lambda: plain.train(examples, seed, work), PROFILE_NAMES)
        w_s, f_s, prof_text = profile_call(lambda: s3t.train_stage(0, prefix), PROFILE_NAMES)
        for label in PROFILE_NAMES:
            cs, ts = f_s.get(label, (0, 0.0))
            cp, tp = f_p.get(label, (0, 0.0))
            prof_rows.append([label, cs, f"{ts:.3f}", cp, f"{tp:.3f}"])
        prof_rows.append(["(profiled wall of the call)", "", f"{w_s:.3f}", "", f"{w_p:.3f}"])

    stage_rows = []
    if args.stages_L:
        del s3t, plain
        gc.collect()
        run3 = Run.create(load_config(None, [*common, f"name=L{args.stages_L}", f"s3t.slices={args.stages_L}"]))
        tr3 = StageTrainer(run3, args.precision)
        seq = tuple(run3.sequences[0])
        top = max(i for b in run3.blocks for i in b)
        for k in range(1, len(seq) + 1):
            r = s3t_call(tr3, 0, seq[:k])
            blk = run3.blocks[k - 1]
            depth = top - min(blk) + 1
            stage_rows.append([k, "-".join(map(str, seq[:k])), r["n_used"], f"{blk[0]}..{blk[-1]}", depth,
                               r["tokens"], r["steps"], f"{r['wall']:.2f}", f"{r['train']:.2f}",
                               f"{r['tokens'] / r['wall']:.1f}", f"{r['tokens'] / r['train']:.1f}"])
            print(f"  L={args.stages_L} stage {k}: {r['tokens']} tokens in {r['wall']:.2f}s "
                  f"-> {r['tokens'] / r['wall']:.1f} tok/s")

    # ----- report -------------------------------------------------------------------------------
    cmd = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Stage-training throughput: S3T vs plain TRL LoRA SFT", "",
        f"Command: `{cmd.strip()}`  ",
        f"Machine: {C.machine()}  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}", "",
        f"Model: `{args.from_config and 'from-config ' + args.from_config or args.model}` ({n_layers} layers), "
        f"precision {args.precision}; LoRA r={args.r}, alpha={args.alpha}, rslora={not args.no_rslora}, "
        f"7 projections on the top {layers} layers ({n_s3t:,} trainable parameters); "
        f"{len(examples)} Alpaca examples ({s[0]['n_used']} within max_length), max_length {args.max_length}, "
        f"batch {args.batch_size}, {args.epochs:g} epoch(s): {s[0]['steps']} optimizer steps, "
        f"{s[0]['tokens']} tokens per call (unpadded input_ids x epochs).", "",
        f"S3T = `StageTrainer.train_stage` of a 1-slice run (one block = all LoRA layers): same trainable set, "
        f"examples, order, seed and steps as plain. Wall = the whole call (S3T: ledger reads, stack set-up, "
        f"SFTTrainer construction incl. tokenisation, train(), frozen check, block write; plain: SFTTrainer "
        f"construction incl. tokenisation, train()). Base-model load excluded (S3T {load_s3t:.1f}s, plain "
        f"{load_plain:.1f}s, once each). {args.repeats} interleaved repeats after {args.warmup} warm-up pair(s); medians.", "",
        C.md_table(["", "tokens/s (wall)", "tokens/s (train() only)", "wall s", "train() s", "set-up + tear-down s",
                    "final loss"],
                   [["plain TRL", f"{med(p, 'tok_s'):.1f}", f"{med(p, 'tok_s_train'):.1f}", f"{med(p, 'wall'):.2f}",
                     f"{med(p, 'train'):.2f}", f"{statistics.median(r['wall'] - r['train'] for r in p):.2f}",
                     f"{p[0]['loss']:.4f}"],
                    ["S3T train_stage", f"{med(s, 'tok_s'):.1f}", f"{med(s, 'tok_s_train'):.1f}", f"{med(s, 'wall'):.2f}",
                     f"{med(s, 'train'):.2f}", f"{statistics.median(r['wall'] - r['train'] for r in s):.2f}",
                     f"{s[0]['loss']:.4f}"]]),
        "", f"Same work: {s[0]['steps']} steps and {s[0]['tokens']} tokens in every call; final training losses "
        + ("identical (same init, same batches)." if same_loss else "DIFFER between plain and S3T (check the set-up)."),
        "",
        f"**Orchestration overhead of S3T: {100 * orch:+.2f}% of the plain call** (target <= 5%): S3T's time "
        f"outside train() minus plain's, median over pairs ({', '.join(f'{x:+.3f}s' for x in extra)}), over the "
        f"median plain wall ({med(p, 'wall'):.2f}s). train() itself is the same code on the same work in both "
        "(same trainable tensors, batches and seed; the final losses are identical), so differences inside it "
        "are the machine's noise, which the raw tokens/s ratios below include.", "",
        f"**Raw 1 - S3T/plain tokens/s (wall), median over the back-to-back pairs: "
        f"{100 * statistics.median(paired):+.1f}%** (per pair: " + ", ".join(f"{100 * x:+.1f}%" for x in paired)
        + f"). Ratio of the two medians: {100 * overhead:+.1f}% (train() only {100 * overhead_train:+.1f}%); "
        f"best-of: {100 * overhead_best:+.1f}%. The spread of the pairs is the machine's noise (other jobs share "
        "its 2 cores); the paired median is the least exposed to it.", "",
        "Per call (tokens/s, wall): plain " + ", ".join(f"{r['tok_s']:.1f}" for r in p)
        + "; S3T " + ", ".join(f"{r['tok_s']:.1f}" for r in s) + ".",
    ]
    if prof_rows:
        lines += ["", "## Where the time goes (cProfile, one extra call of each; profiling inflates Python-heavy parts)", "",
                  C.md_table(["function", "S3T calls", "S3T cum. s", "plain calls", "plain cum. s"], prof_rows)]
    if stage_rows:
        lines += ["", f"## For information: per-stage throughput of an L={args.stages_L} run (sequence "
                  f"{'-'.join(map(str, seq))}, blocks top-down)", "",
                  "Stage k trains block k only, on slices 1..k (cumulative data); backward runs from the output "
                  "down to block k's lowest layer, so deeper blocks cost more per token.", "",
                  C.md_table(["stage", "prefix", "examples", "block layers", "backward depth (layers)", "tokens",
                              "steps", "wall s", "train() s", "tokens/s (wall)", "tokens/s (train() only)"], stage_rows),
                  "", f"(1-slice plain TRL over all {layers} LoRA layers, backward depth {layers}: "
                  f"{med(p, 'tok_s'):.1f} tokens/s wall, {med(p, 'tok_s_train'):.1f} train() only.)"]
    print()
    out = C.write_result("\n".join(lines) + "\n", args.out)
    if prof_text:
        (out.parent / (out.stem + "_profile.txt")).write_text(prof_text)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
