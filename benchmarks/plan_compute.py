"""Total training compute of an S3T plan (m shards, L slices, B sequences) relative to one LoRA fine-tune.

    python benchmarks/plan_compute.py                       # analytic table (no torch needed)
    python benchmarks/plan_compute.py --measure             # + time a real tiny plan, sharing on vs off

Unit: slice-passes (one pass of one (shard, slice) cell's samples), NOT FLOPs. Stage k of a sequence trains
on the cumulative slices pi_1..pi_k of its shard, i.e. k slice-passes (x epochs, the same for every stage and
for the reference). One LoRA fine-tune on all the data = one pass over all m*L cells = m*L slice-passes.

* without prefix sharing: every sequence trains its own L stages: m*B*L stages, m*B*L(L+1)/2 slice-passes.
* with prefix sharing (what ``s3t_llm.training.stage_plan`` / ``train_run`` do): sequences of a shard that
  share a prefix share its blocks, so each distinct prefix of a shard is trained once: stages = m x the
  number of distinct prefixes, slice-passes = m x the sum of their lengths.

A slice-pass does not cost the same at every stage: blocks are top-down (block 1 nearest the output), so the
backward of stage k runs from the output down to block k's lowest layer; deeper stages cost more per token.
The depth-weighted columns use a simple per-token cost model (forward through all N decoder layers + backward,
input gradients only since the base is frozen, through the d_k layers down to block k's bottom, in units of
one layer's forward; embeddings, LM head and attention-score asymmetries ignored), relative to a full LoRA
fine-tune over all n LoRA layers (cost N + n). Measure it on your hardware with train_throughput.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEFAULT_PLANS = [(5, 4, 1), (5, 4, 2), (5, 4, 3), (5, 4, 4), (5, 4, 8), (5, 4, 24), (2, 20, 20), (5, 6, 6), (3, 3, 6)]


def parse_plan(text: str) -> tuple[int, int, int]:
    try:
        m, L, B = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"plan {text!r}: expected m,L,B (e.g. 5,4,8)") from None
    return m, L, B


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", type=parse_plan, action="append", default=None, metavar="m,L,B",
                    help="plans to tabulate (repeatable); default: " + " ".join(",".join(map(str, p)) for p in DEFAULT_PLANS))
    ap.add_argument("--method", default="cyclic", choices=["cyclic", "bms", "random"])
    ap.add_argument("--num-layers", type=int, default=30, help="N: decoder layers, for the depth-weighted columns")
    ap.add_argument("--lora-layers", type=int, default=30, help="n: top layers carrying LoRA (split into L blocks)")
    ap.add_argument("--out", default=str(C.RESULTS / "plan_compute.md"))
    g = ap.add_argument_group("--measure: train a real plan twice, prefix sharing on (train_run) and off")
    g.add_argument("--measure", action="store_true")
    g.add_argument("--measure-plan", type=parse_plan, default=(1, 3, 6), metavar="m,L,B")
    g.add_argument("--per-slice", type=int, default=8, help="samples per (shard, slice) cell")
    g.add_argument("--max-length", type=int, default=256)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--repeats", type=int, default=1, help="sharing on/off pairs, alternating order; medians")
    C.add_model_args(g)
    return ap


# ----- analytic ------------------------------------------------------------------------------------
def cache_cost(m: int, L: int, B: int, N: int = 30, n: int = 30, epochs: float = 1.0, method: str = "cyclic",
               head: float = 0.0, order: str = "top_down") -> dict:
    """Per-token cost in layer-passes (one layer's forward = 1; the input-gradient backward through a layer = 1),
    summed over the shared stage plan, in slice units (x the samples of a cell), blocks split in ``order``
    (``s3t.block_order``) over the top ``n`` of ``N`` layers; ``lo_k`` = block k's lowest layer:

    * uncached stage k: epochs x k slices x (N + N - lo_k): forward through all N layers, backward down to
      block k's bottom;
    * cached stage k (``lo_k > 0``): epochs x k slices x 2 (N - lo_k) (only the layers from the boundary up run,
      forward and backward), plus the fill, independent of epochs. Top-down (only zero blocks below the
      boundary): each sample forwarded once through the layers below the highest boundary it is needed at (the
      lower boundaries are captured on the way). Bottom-up (the trained blocks 1..k-1 below): each sample of the
      stage's slices forwarded through lo_k layers once per parent prefix (siblings in the stage tree share it).
      That is what ``ActivationCache.prepare`` does (per cell, in the cell's canonical batches of
      ``train.batch_size``; the right padding of those batches is not counted, as it is not for training).

    ``head``: the LM head's cost in layer units (forward, and the same again for its input-gradient backward), paid
    by both paths (SmolLM2-135M: vocab 49152 x 576 against ~3.5M weights a layer, about 8).
    """
    from s3t_llm.activation_cache import boundary, lower_blocks
    from s3t_llm.planner import plan_sequences
    from s3t_llm.run import split_blocks
    from s3t_llm.training import stage_plan

    seqs = plan_sequences(L, B, method=method, seed=0)
    plan = stage_plan(types.SimpleNamespace(shards=m, sequences=[list(q) for q in seqs]))
    blocks = split_blocks(list(range(N - n, N)), L, order)
    unc = cac = 0.0
    need: dict[tuple[int, int], int] = {}  # (shard, slice) -> highest base boundary layer needed
    fills: dict[tuple, int] = {}  # (shard, parent prefix, slice) -> boundary, for entries through trained blocks
    for s, p in plan:
        k = len(p)
        lo = min(blocks[k - 1])
        up = N - lo
        unc += epochs * k * (N + up + 2 * head)
        if boundary(blocks, k) is not None:
            cac += epochs * k * (2 * up + 2 * head)
            for sl in p:
                if lower_blocks(blocks, k):
                    fills[(s, tuple(p[:-1]), sl)] = lo
                else:
                    need[(s, sl)] = max(need.get((s, sl), 0), lo)
        else:
            cac += epochs * k * (N + up + 2 * head)
    fill = float(sum(need.values()) + sum(fills.values()))
    return {"uncached": unc, "cached": cac + fill, "fill": fill, "train_cached": cac}


def plan_stats(m: int, L: int, B: int, method: str = "cyclic", N: int = 30, n: int = 30) -> dict:
    from s3t_llm.planner import plan_sequences
    from s3t_llm.run import split_blocks
    from s3t_llm.training import stage_plan

    seqs = plan_sequences(L, B, method=method, seed=0)
    # The real stage order of train_run (stage_plan only reads .shards and .sequences).
    shared = stage_plan(types.SimpleNamespace(shards=m, sequences=[list(s) for s in seqs]))
    unshared = [(s, tuple(q[:k])) for s in range(m) for q in seqs for k in range(1, L + 1)]
    full = m * L
    out = {"m": m, "L": L, "B": B, "stages_no": len(unshared), "stages_sh": len(shared),
           "units_no": sum(len(p) for _, p in unshared), "units_sh": sum(len(p) for _, p in shared), "full": full}
    if L <= n <= N:
        blocks = split_blocks(list(range(N - n, N)), L)
        depth = [sum(len(b) for b in blocks[:k]) for k in range(1, L + 1)]  # layers above block k's bottom, incl.
        cost = lambda p: len(p) * (N + depth[len(p) - 1]) / (N + n)  # noqa: E731
        out["w_no"] = sum(cost(p) for _, p in unshared)
        out["w_sh"] = sum(cost(p) for _, p in shared)
    return out


def analytic_table(plans, method: str, N: int, n: int) -> tuple[str, list[dict]]:
    rows, stats = [], []
    from s3t_llm.planner import PlanError

    for m, L, B in plans:
        try:
            st = plan_stats(m, L, B, method, N, n)
        except PlanError as e:  # e.g. bms supports at most L*(L-1) sequences
            rows.append([m, L, B, f"n/a: {e}", *[""] * 7])
            continue
        stats.append(st)
        f = st["full"]
        w = (f"{st['w_no'] / f:.2f}x", f"{st['w_sh'] / f:.2f}x") if "w_no" in st else ("n/a", "n/a")
        rows.append([m, L, B, st["stages_no"], st["stages_sh"], f"{st['stages_no'] / st['stages_sh']:.2f}",
                     f"{st['units_no']} = {st['units_no'] / f:.2f}x", f"{st['units_sh']} = {st['units_sh'] / f:.2f}x",
                     f"{st['units_no'] / st['units_sh']:.2f}", *w])
    headers = ["m", "L", "B", "stages, no sharing", "stages, sharing", "stage ratio no/with",
               "slice-passes, no sharing (x full FT)", "slice-passes, sharing (x full FT)",
               "compute ratio no/with", f"depth-weighted, no sharing (N={N}, n={n})", "depth-weighted, sharing"]
    return C.md_table(headers, rows), stats


def cache_table(plans, method: str, layouts: list[tuple[int, int]]) -> str:
    """The activation cache's and the block order's modelled cost (``cache_cost``) per plan and (N, n) layout, 1
    and 3 epochs; speed-ups against top-down uncached of the same plan and epochs."""
    from s3t_llm.planner import PlanError

    rows = []
    for N, n in layouts:
        for m, L, B in plans:
            if L > n:
                continue
            try:
                cs = {(o, e): cache_cost(m, L, B, N, n, e, method, order=o)
                      for o in ("top_down", "bottom_up") for e in (1, 3)}
            except PlanError:
                continue
            td1, td3 = cs[("top_down", 1)]["uncached"], cs[("top_down", 3)]["uncached"]
            for o in ("top_down", "bottom_up"):
                c1, c3 = cs[(o, 1)], cs[(o, 3)]
                rows.append([m, L, B, N, n, o, f"{c1['uncached']:.0f}", f"{c1['cached']:.0f} (fill {c1['fill']:.0f})",
                             f"{td1 / c1['uncached']:.2f}x / {td1 / c1['cached']:.2f}x",
                             f"{td3 / c3['uncached']:.2f}x / {td3 / c3['cached']:.2f}x"])
    return C.md_table(["m", "L", "B", "N layers", "n LoRA layers", "block order", "uncached, 1 epoch",
                       "cached, 1 epoch", "speed-up uncached / cached, 1 epoch", "same, 3 epochs"], rows)


# ----- measured ------------------------------------------------------------------------------------
def measure(args) -> tuple[str, dict]:
    C.setup_device(args.device, args.threads)
    import datasets

    from s3t_llm.config import load_config
    from s3t_llm.models import check_llama, load_config as load_model_config
    from s3t_llm.run import Run
    from s3t_llm.training import StageTrainer, train_run

    datasets.disable_progress_bars()
    from trl import SFTConfig, SFTTrainer  # noqa: F401  imported before any timing (the first stage would pay for it)

    m, L, B = args.measure_plan
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="s3t-plan-"))
    model_path = C.resolve_base(args)
    n_layers = check_llama(load_model_config(model_path))
    if L > n_layers:
        raise SystemExit(f"--measure-plan L={L} needs at least {L} decoder layers; the model has {n_layers}")
    data = C.write_records(C.alpaca_records(m * L * args.per_slice, seed=0), work / "data.json")
    common = [f"output_dir={work}", f"model.name={model_path}", f"model.precision={args.precision}",
              f"data.path={data}", f"data.max_length={args.max_length}", "data.heldout=0",
              f"s3t.shards={m}", f"s3t.slices={L}", f"s3t.budget={B}", f"s3t.method={args.method}",
              f"train.batch_size={args.batch_size}", "train.seed=0"]

    def shared(i: int) -> dict:
        run = Run.create(load_config(None, [*common, f"name=shared{i}"]))
        t0 = time.perf_counter()
        summary = train_run(run, progress=False)  # model load + the deduplicated stage plan
        wall = time.perf_counter() - t0
        mans = [run.store.manifest(s, p) for s, p in run.store.blocks()]
        return {"wall": wall, "stages": summary["stages_trained"], "train_s": summary["seconds"],
                "examples": sum(x["n_samples"] for x in mans)}

    def unshared(i: int) -> dict:
        run = Run.create(load_config(None, [*common, f"name=unshared{i}"]))
        t0 = time.perf_counter()
        tr = StageTrainer(run)
        n = train_s = examples = 0
        for s in range(run.shards):
            for seq in run.sequences:
                for k in range(1, len(seq) + 1):  # every sequence's own stages; shared prefixes retrained
                    man = tr.train_stage(s, tuple(seq[:k]))
                    n, train_s, examples = n + 1, train_s + man["seconds"], examples + man["n_samples"]
        return {"wall": time.perf_counter() - t0, "stages": n, "train_s": train_s, "examples": examples}

    res = {"sh": [], "no": []}
    for i in range(args.repeats):
        for which in (("sh", "no") if i % 2 == 0 else ("no", "sh")):
            r = (shared if which == "sh" else unshared)(i)
            res[which].append(r)
            print(f"  measure {'sharing' if which == 'sh' else 'no sharing'}: {r['stages']} stages, "
                  f"{r['examples']} examples trained, wall {r['wall']:.1f}s (train() {r['train_s']:.1f}s)")
    if not args.work_dir:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    st = plan_stats(m, L, B, args.method)
    md = lambda k, key: statistics.median(r[key] for r in res[k])  # noqa: E731
    rows = [["stages trained", st["stages_no"], st["stages_sh"], f"{st['stages_no'] / st['stages_sh']:.2f}",
             md("no", "stages"), md("sh", "stages"), f"{md('no', 'stages') / md('sh', 'stages'):.2f}"],
            ["slice-passes / examples trained", st["units_no"], st["units_sh"], f"{st['units_no'] / st['units_sh']:.2f}",
             md("no", "examples"), md("sh", "examples"), f"{md('no', 'examples') / md('sh', 'examples'):.2f}"],
            ["wall s (incl. one model load)", "", "", "", f"{md('no', 'wall'):.1f}", f"{md('sh', 'wall'):.1f}",
             f"{md('no', 'wall') / md('sh', 'wall'):.2f}"],
            ["train() s (sum over stages)", "", "", "", f"{md('no', 'train_s'):.1f}", f"{md('sh', 'train_s'):.1f}",
             f"{md('no', 'train_s') / md('sh', 'train_s'):.2f}"]]
    model = f"from-config {args.from_config}" if args.from_config else args.model
    text = "\n".join([
        f"## Measured: plan (m={m}, L={L}, B={B}), {args.method}, `{model}` ({n_layers} layers), {args.precision}, "
        f"{args.per_slice} samples per cell, max_length {args.max_length}, batch {args.batch_size}, "
        f"{args.repeats} repeat(s) (medians)", "",
        "Sharing on: `train_run` (the real path; it also checks locks and slice hashes per stage). Sharing off: the "
        "same `StageTrainer.train_stage` called for every stage of every sequence, shared prefixes retrained. Both "
        "walls include one base-model load. A stage's wall also has a fixed part (trainer construction, "
        "tokenisation, block write), so the wall ratio is expected between the compute ratio and the stage ratio (near the stage ratio for a tiny model, where the fixed part dominates), noise aside; the "
        "measured examples are the cells' real sizes (cells need not be exactly equal).", "",
        C.md_table(["", "analytic, no sharing", "analytic, sharing", "analytic ratio",
                    "measured, no sharing", "measured, sharing", "measured ratio"], rows)])
    return text, res


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    plans = args.plan or DEFAULT_PLANS
    table, _ = analytic_table(plans, args.method, args.num_layers, args.lora_layers)
    cmd = "python benchmarks/plan_compute.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [
        "# Training compute of S3T plans relative to one LoRA fine-tune", "",
        f"Command: `{cmd.strip()}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M')}", "",
        f"Sequences: `s3t_llm.planner.plan_sequences(L, B, method='{args.method}')`; shared stages: "
        "`s3t_llm.training.stage_plan` (each distinct prefix of a shard once).", "",
        "Unit: slice-passes, not FLOPs. Stage k trains on k slices of its shard (cumulative), so a sequence costs "
        "L(L+1)/2 slice-passes; one LoRA fine-tune on all the data is m*L slice-passes (1.00x). Epochs multiply "
        "both alike. Prefix sharing only helps when B > L (for cyclic plans with B <= L every sequence starts with "
        "a different slice, so no prefix is shared).", "",
        f"Depth-weighted columns: per-token cost of stage k = (N + d_k) / (N + n), d_k = LoRA layers from the top "
        f"down to block k's bottom (blocks top-down, `split_blocks`), N = {args.num_layers} decoder layers, "
        f"n = {args.lora_layers} LoRA layers (n/a where L > n). A rough FLOPs model (forward of every layer + "
        "input-gradient backward down to block k; embeddings, LM head and LoRA weight gradients ignored): early "
        "stages are cheaper per token than a full fine-tune, later ones as dear.", "",
        table, "",
        "## Activation cache and block order (`train.cache_activations`, `s3t.block_order`)", "",
        "`cache_cost`: layer-passes per token (forward 1, input-gradient backward 1 per layer) summed over the "
        "shared plan. Uncached stage k: N + (N - lo_k), lo_k = block k's lowest layer. Cached (lo_k > 0): "
        "2 (N - lo_k), plus the fill, paid once, not per epoch: top-down, one forward per sample through the layers "
        "below the highest boundary it is needed at (lower boundaries captured on the way); bottom-up, one forward "
        "of each stage's samples through lo_k layers per parent prefix. Speed-ups are against top-down uncached. Embeddings and the LM head are ignored, so on a small model with a large "
        "vocabulary (SmolLM2: the LM head costs about 8 layers) the measured saving is lower.", "",
        cache_table(plans, args.method, [(args.num_layers, args.lora_layers), (30, 6)]),
    ]
    if args.measure:
        mtext, _ = measure(args)
        lines += ["", mtext]
    C.write_result("\n".join(lines) + "\n", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
