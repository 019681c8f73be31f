"""The ``s3t`` command. Heavy imports happen inside each subcommand, never at import time."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("s3t_llm")


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# ----- simulate -------------------------------------------------------------------------------------
def cmd_simulate(args) -> int:
    from .simulator import budget_table, default_report, format_table, plot_budget_curves

    if args.config:
        configs = []
        for c in args.config:
            try:
                m, L, B = (int(x) for x in c.split(","))
            except ValueError:
                raise SystemExit(f"--config {c!r}: expected m,L,B (three integers)")
            configs.append((m, L, B))
        rows = budget_table(configs, n_trials=args.trials, seed=args.seed)
        print(format_table(rows))
        pairs = sorted({(m, L) for m, L, _ in configs})
        plot_budget_curves(args.plot, pairs, n_trials=args.trials, seed=args.seed, deletion_dist=args.dist)
    else:
        print(default_report(n_trials=args.trials, seed=args.seed, out_png=args.plot))
    print(f"\nplot: {Path(args.plot).resolve()}")
    return 0


# ----- train ----------------------------------------------------------------------------------------
def cmd_train(args) -> int:
    from .config import load_config
    from .run import Run
    from .training import train_run

    from .locking import hold

    cfg = load_config(args.recipe, args.overrides)
    run = Run.create(cfg)
    t0 = time.perf_counter()
    with hold(run.dir, "train"):  # refuses while `s3t serve` holds the run (it is the one writer then)
        if args.ray is not None or cfg.ray.enabled:  # the stage tree on Ray (s3t_llm/distributed.py)
            from .distributed import format_where, ray_options, train_run_ray

            opts = ray_options(cfg.ray, address=args.ray, threads=args.ray_threads, workers=args.ray_workers)
            summary = train_run_ray(run, shards=args.shards, sequences=args.sequences, precision=args.precision,
                                    **opts)
            print(format_where(summary))
        else:
            summary = train_run(run, shards=args.shards, sequences=args.sequences, precision=args.precision)
            from .training import is_main_process

            if not is_main_process():  # accelerate launch / torchrun: rank 0 alone exports and writes the summary
                return 0
        summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
        adapters = export_best(run) if not args.no_export else {}
    print(f"run: {run.dir.resolve()}")
    print(f"stages: {summary['stages_trained']} trained, {summary['stages_reused']} reused "
          f"of {summary['stages_total']} in {summary['wall_seconds']} s")
    for shard, (name, depth) in adapters.items():
        print(f"shard {shard}: prefix adapter {name} (blocks 1..{depth}) at {run.store.adapter_dir(name)}")
    (run.dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    return 0


def export_best(run) -> dict[int, tuple[str, int]]:
    """Materialise, for every shard, the prefix adapter of its longest surviving sequence (if new)."""
    from .deletion import publish

    routing, _ = publish(run)
    return {s: (e["name"], e["depth"]) for s, e in routing.items() if e is not None}


# ----- experiment -----------------------------------------------------------------------------------
def cmd_experiment(args) -> int:
    from .experiment import deletion_stream

    # Flags given on the command line override the recipe's experiment section (as experiment.* overrides do).
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks is not None else None
    deletion_stream(args.recipe, args.overrides, budgets=args.budgets, requests=args.requests, prior=args.prior,
                    skew=args.skew, eval_every=args.eval_every, tasks=tasks, limit=args.limit, heldout=args.heldout,
                    audit=False if args.no_audit else None, reference=False if args.no_reference else None,
                    generations=args.generations, backend=args.backend, out=args.out, seed=args.seed)
    return 0


# ----- status ---------------------------------------------------------------------------------------
def cmd_status(args) -> int:
    from .run import DATASET, Run

    run = Run.open(args.run)
    with run.ledger() as led:
        info = led.dataset(DATASET)
        deleted = led.deleted_cells(DATASET)
    print(f"run {run.config.name}: base {run.model_path}")
    print(f"  {info.n_samples} samples ({info.n_live} live), m={run.shards} shards x L={run.config.s3t.slices} slices, "
          f"B={len(run.sequences)} sequences {run.sequences}")
    print(f"  blocks ({run.block_order}, block 1 first): {run.blocks}")
    best = run.best_prefixes()
    for s in range(run.shards):
        qi, depth = best[s]
        hit = sorted(sl for (sh, sl) in deleted if sh == s)
        state = "DEAD: needs retraining" if depth == 0 else f"serves sequence {qi} prefix {run.sequences[qi][:depth]}"
        print(f"  shard {s}: {state}; slices with deletions: {hit or 'none'}")
    return 0


# ----- serve / delete -------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    from .serving import serve, vllm_command_for

    if args.print_vllm_command:
        print(vllm_command_for(args.run, admin_token=args.upstream_token))
        return 0

    serve(args.run, host=args.host, port=args.port, vllm_port=args.vllm_port, dead_shard=args.dead_shard,
          retrain=args.retrain, token=args.token, replicas=args.replicas, upstreams=args.upstream,
          admin_token=args.upstream_token, ray=args.ray)
    return 0


def _deletion_ids(values: list[str]) -> list[str]:
    from .records import load_sample_ids

    if len(values) == 1 and Path(values[0]).is_file():
        return load_sample_ids(values[0])
    return load_sample_ids(values)


def cmd_delete(args) -> int:
    import uuid

    import requests

    from .ledger import check_request_id
    from .locking import holders
    from .run import DATASET, Run
    from .serving import SERVE_FILE

    run = Run.open(args.run)
    ids = _deletion_ids(args.ids)
    if args.offline:
        from .deletion import apply_deletion, certificate_path

        # Refuses (naming the server) while `s3t serve` holds the run.
        cert = apply_deletion(run, ids, request_id=args.request_id)
        _print_deletion(cert["request_id"], cert["noop"], cert["served_changes"], cert["dead_shards"],
                        cert["deletion_to_effect_seconds"], str(certificate_path(run, cert["request_id"])))
        return 0
    # The request id is chosen here, so that the outcome can be found in the ledger whatever the server does.
    rid = check_request_id(args.request_id or uuid.uuid4().hex)
    server = next((h for h in holders(run.dir) if h.get("role") == "serve"), None)
    sf = run.dir / SERVE_FILE
    if server is None or not sf.exists():
        raise FileNotFoundError(f"run {run.config.name} is not serving (no live `s3t serve` holds it); start it with "
                                f"`s3t serve {args.run}` or apply the deletion to the stored run with --offline")
    info = json.loads(sf.read_text())
    token = args.token or info["token"]
    try:
        r = requests.post(f"{info['url']}/s3t/delete", json={"ids": ids, "request_id": rid},
                          headers={"Authorization": f"Bearer {token}"}, timeout=3600)
    except requests.ConnectionError:
        with run.ledger() as led:
            known = {q.request_id: q for q in led.requests(DATASET)}
        if rid in known:
            print(f"s3t delete: the server stopped while applying request {rid}; the request is journaled "
                  f"(status {known[rid].status}): its samples are deleted in the ledger and it completes when "
                  f"`s3t serve {args.run}` starts again (or with `s3t delete {args.run} --offline --request-id "
                  f"{rid} --ids ...` while no server runs)", file=sys.stderr)
            return 3
        raise FileNotFoundError(f"run {run.config.name} is not serving: nothing answers at {info['url']}; the "
                                f"request {rid} was not journaled") from None
    try:
        body = r.json()
    except ValueError:
        body = {"error": {"message": r.text[:500]}}
    if r.status_code != 200:
        print(f"s3t delete: error ({r.status_code}): {body.get('error', {}).get('message', body)}", file=sys.stderr)
        return 2
    _print_deletion(body["request_id"], body["noop"], body["served_changes"], body["dead_shards"],
                    body["deletion_to_effect_seconds"], body["certificate"])
    return 0


def _print_deletion(rid, noop, changes, dead, seconds, cert) -> None:
    if noop:
        print(f"request {rid}: every sample was already deleted; nothing changed")
    for c in changes:
        print(f"request {rid}: shard {c['shard']}: {c['from']} (depth {c['from_depth']}) -> "
              f"{c['to'] or 'nothing (needs retraining)'}" + (f" (depth {c['to_depth']})" if c['to'] else ""))
    if not changes and not noop:
        print(f"request {rid}: no served adapter depended on these samples; nothing switched")
    if dead:
        print(f"request {rid}: shards {dead} have no surviving prefix and need retraining")
    print(f"request {rid}: effective {seconds:.2f} s after it was received; certificate {cert}")


def cmd_eval(args) -> int:
    from .evaluation import evaluate_offline, evaluate_served
    from .evaluation.ensemble import NoLiveShard
    from .run import Run
    from .serving import SERVE_FILE

    run = Run.open(args.run)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks needs at least one task name")
    sf = run.dir / SERVE_FILE
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if sf.exists() else "offline"
        print(f"s3t eval: backend {backend} ({'the run is serving' if sf.exists() else 'the run is not serving'}; "
              "--backend chooses)", file=sys.stderr)
    kw = {"include_path": args.include_path} if args.include_path else {}
    # both load (and so check) every task before anything is scored
    if backend == "vllm":
        if not sf.exists():
            raise FileNotFoundError(f"run {run.config.name} is not serving; start it with `s3t serve {args.run}` "
                                    "or score the stored run with --backend offline")
        info = json.loads(sf.read_text())
        state = _get_json(f"{info['url']}/s3t/state")
        if not any(s["adapter"] for s in state["shards"]) and not args.base:
            raise NoLiveShard(f"run {run.config.name}: no live shard (every shard needs retraining): nothing to "
                              "score (pass --base to score the base model alone)")
        res = evaluate_served(run, info["url"], tasks=tasks, limit=args.limit or None, heldout=args.heldout,
                              base_url=info["url"] if args.base else None, progress=True, **kw)
        res["backend"] = "vllm"
    else:
        res = evaluate_offline(run, tasks=tasks, limit=args.limit or None, heldout=args.heldout, base=args.base,
                               progress=True, dtype=args.dtype, **kw)
    text = json.dumps(res, indent=2, default=str)
    if args.output:
        Path(args.output).write_text(text + "\n")
        print(f"s3t eval: results in {Path(args.output).resolve()}", file=sys.stderr)
    print(text)
    return 0


def _get_json(url: str) -> dict:
    import requests

    r = requests.get(url, timeout=60)
    r.raise_for_status()
    return r.json()


def cmd_verify(args) -> int:
    from .verify import verify_run

    report = verify_run(args.run, certificate=args.certificate, replay=args.replay, source=args.source,
                        echo=print)
    out = Path(args.output) if args.output else None
    if out:
        out.write_text(json.dumps(report, indent=2, default=str))
    n = len(report["problems"])
    print(f"s3t verify: {'PASS' if not n else 'FAIL'}: {report['checks']} checks, {n} problem(s)"
          + (f"; report {out}" if out else ""))
    for p in report["problems"]:
        print(f"  problem: {p}")
    return 0 if not n else 1


def cmd_migrate(args) -> int:
    from .run import migrate_run

    for line in migrate_run(args.run):
        print(line)
    return 0


def cmd_unlearn(args) -> int:
    from .unlearn import unlearn

    path = unlearn(args.run, _deletion_ids(args.ids), args.method, shard=args.shard, alpha=args.alpha,
                   variant=args.variant, epochs=args.epochs, lr=args.lr, out_name=args.name)
    man = json.loads((path / "unlearn_manifest.json").read_text())
    print(f"{args.method}: approximate unlearning of {man['n_forget']} sample(s) of shard {man['shard']} "
          f"in {man['seconds']:.1f} s (NO guarantee: use `s3t delete` for exact deletion)")
    print(f"adapter: {path} (servable like any PEFT adapter)")
    return 0


def cmd_audit(args) -> int:
    from .evaluation.audit import AuditError, audit_run, format_report, load_ids_and_records

    try:
        ids, given = load_ids_and_records(args.ids, args.data)
        res = audit_run(args.run, ids, given, unseen=args.unseen, oracle=args.oracle, k=args.k, n_boot=args.n_boot,
                        seed=args.seed, max_new_tokens=args.max_new_tokens, generate=not args.no_generate,
                        echo=print)
    except AuditError as e:
        print(f"s3t audit: error: {e}", file=sys.stderr)
        return 2
    print()
    print(format_report(res))
    if args.output:
        Path(args.output).write_text(json.dumps(res, indent=1))
        print(f"\naudit: {Path(args.output).resolve()}")
    return 0


# ----- demo (the main job) --------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.recipe, args.overrides, trials=args.trials, plot=args.plot,
                    n_deletions=args.deletions, simulate_only=args.simulate_only)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="s3t", description="Exact machine unlearning for Llama models with S3T.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("simulate", help="deletion-rate simulator: requests served before retraining, S3T vs SISA")
    sp.add_argument("--config", action="append", metavar="m,L,B", help="a configuration (repeatable); default: the paper's table")
    sp.add_argument("--trials", type=int, default=2000)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--dist", choices=["uniform", "zipf"], default="uniform")
    sp.add_argument("--plot", default="simulate.png", help="PNG path for the plot")
    sp.set_defaults(func=cmd_simulate)

    sp = sub.add_parser("train", help="train (or resume) an S3T run from a YAML recipe")
    sp.add_argument("recipe")
    sp.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.epochs=2")
    sp.add_argument("--shards", type=_ints, help="only these shards (for parallel jobs), e.g. 0,2")
    sp.add_argument("--sequences", type=_ints, help="only these sequence indices")
    sp.add_argument("--precision", choices=["8bit", "bf16", "fp32"], help="override model.precision")
    sp.add_argument("--no-export", action="store_true", help="do not materialise the prefix adapters")
    sp.add_argument("--ray", nargs="?", const="local", default=None, metavar="auto|ADDRESS",
                    help="schedule the stages on Ray: no value starts a local instance sized to the machine; "
                         "'auto' or HOST:PORT joins a running cluster")
    sp.add_argument("--ray-threads", type=int, default=None, metavar="N",
                    help="torch threads (and CPUs reserved) per stage on Ray (default: the recipe's ray.threads, 1)")
    sp.add_argument("--ray-workers", type=int, default=None, metavar="N",
                    help="stages at once on a local Ray instance (default: the recipe's ray.workers, else "
                         "CPUs // threads, or one per GPU)")
    sp.set_defaults(func=cmd_train)

    sp = sub.add_parser("status", help="shards, surviving prefixes and deletions of a run")
    sp.add_argument("run", help="run directory, e.g. runs/smollm2-cpu")
    sp.set_defaults(func=cmd_status)

    sp = sub.add_parser("serve", help="serve a run: vLLM multi-LoRA + the S3T gateway (Ctrl-C stops both)")
    sp.add_argument("run")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--vllm-port", type=int, help="vLLM's own port (loopback); default: a free one")
    sp.add_argument("--dead-shard", choices=["none", "base"], default="none",
                    help="what a shard with no surviving prefix serves (default: nothing)")
    sp.add_argument("--retrain", action="store_true", help="retrain dead shards in the background")
    sp.add_argument("--ray", nargs="?", const="local", default=None, metavar="auto|ADDRESS",
                    help="with --retrain: retrain on Ray (no value: a local instance; 'auto' or HOST:PORT: a "
                         "cluster); default: the run's ray section (ray.enabled)")
    sp.add_argument("--token", help="deletion API token (default: a random one, written to serve.json)")
    sp.add_argument("--replicas", type=int, default=1,
                    help="vLLM replicas behind the gateway (one per GPU, or disjoint CPU cores); a deletion is "
                         "acknowledged when every replica that receives traffic has applied it")
    sp.add_argument("--upstream", nargs="+", metavar="URL",
                    help="attach vLLM servers started elsewhere (instead of starting local ones); they need the "
                         "command --print-vllm-command prints and the run directory at the same path")
    sp.add_argument("--upstream-token", help="admin secret of the --upstream servers (default: $S3T_ADMIN_TOKEN)")
    sp.add_argument("--print-vllm-command", action="store_true",
                    help="print the vLLM command line an --upstream server needs, and exit")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("delete", help="delete samples from a serving run (ids, or a JSON/JSONL/text file of ids)")
    sp.add_argument("run")
    sp.add_argument("--ids", nargs="+", required=True, metavar="FILE|ID")
    sp.add_argument("--request-id", help="idempotency key (default: a fresh uuid)")
    sp.add_argument("--token", help="deletion API token (default: from the run's serve.json)")
    sp.add_argument("--offline", action="store_true",
                    help="apply to the stored run without a server (the next `s3t serve` serves the result)")
    sp.set_defaults(func=cmd_delete)

    sp = sub.add_parser("verify", help="an auditor's independent check of a run (artifacts, lineage, erasure, "
                                       "serving, certificates); exit 1 on any problem")
    sp.add_argument("run")
    sp.add_argument("--certificate", help="check this certificate file in particular")
    sp.add_argument("--replay", action="store_true",
                    help="retrain one served prefix from the ledger's live data and compare with the stored blocks")
    sp.add_argument("--source", help="the user's source file: deleted records found in it (by their keyed HMAC) "
                                     "are searched for in every byte of the run directory")
    sp.add_argument("--output", help="write the full report (JSON) here")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("migrate", help="upgrade a run made by an older s3t in place (ledger schema, held-out "
                                        "records into the ledger, block lineage)")
    sp.add_argument("run")
    sp.set_defaults(func=cmd_migrate)

    sp = sub.add_parser("eval", help="zero-shot scores (shard ensemble) and held-out loss of a run, served or stored")
    sp.add_argument("run")
    sp.add_argument("--tasks", default="arc_easy,piqa",
                    help="comma-separated task names: old names (arc_easy, piqa, ...: aliases of s3t_*), lm-eval tasks (s3t_arc_easy... "
                         "from eval/lm_tasks, lm-eval's own, or --include-path's) or lm-eval task YAML paths; "
                         "multiple_choice tasks only")
    sp.add_argument("--include-path", metavar="DIR", help="a folder of lm-eval task YAMLs (lm-eval's --include_path)")
    sp.add_argument("--limit", type=int, default=100, help="items per task (a fixed seeded subset); 0 for all")
    sp.add_argument("--heldout", type=int, default=64, help="held-out Alpaca records for the loss")
    sp.add_argument("--base", action="store_true", help="also score the base model as a reference")
    sp.add_argument("--backend", choices=["auto", "vllm", "offline"], default="auto",
                    help="vllm: the served adapters through the gateway (bf16 on CPU); offline: the ledger's current "
                         "prefix adapters in this process (transformers + PEFT, --dtype); auto (default): vllm when "
                         "the run is serving, else offline")
    sp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                    help="offline backend: the dtype of the model (float32 = lm-eval's hf model on CPU)")
    sp.add_argument("--output", metavar="FILE.json", help="also write the results to this file")
    sp.set_defaults(func=cmd_eval)

    sp = sub.add_parser("unlearn", help="approximate unlearning (DEL or a gradient baseline) into a new adapter")
    sp.add_argument("run")
    sp.add_argument("--ids", nargs="+", required=True, metavar="FILE|ID")
    sp.add_argument("--method", required=True, choices=["del", "del_random", "ga", "graddiff", "npo", "npo_rt"])
    sp.add_argument("--shard", type=int, help="shard whose served adapter is unlearned (default: the first id's)")
    sp.add_argument("--alpha", type=float, default=0.3, help="DEL: fraction of LoRA-B parameters reset")
    sp.add_argument("--variant", choices=["mean", "topk"], default="mean", help="DEL: channel scoring")
    sp.add_argument("--epochs", type=float, default=1.0)
    sp.add_argument("--lr", type=float)
    sp.add_argument("--name", help="name of the new adapter")
    sp.set_defaults(func=cmd_unlearn)

    sp = sub.add_parser("audit", help="unlearning audit of what a run serves: membership attacks (loss, zlib, Min-K%%, "
                                      "Min-K%%++, reference) as AUCs, PrivLeak and forget quality against an oracle, "
                                      "verbatim memorisation (offline: transformers + PEFT)")
    sp.add_argument("run")
    sp.add_argument("--ids", required=True, metavar="FILE",
                    help="ids to audit (JSON, JSONL or text), or records with their 'id' (the deleted samples' text)")
    sp.add_argument("--data", metavar="FILE", help="JSON/JSONL records keyed by 'id': the text of deleted samples "
                                                   "(the ledger erased it)")
    sp.add_argument("--unseen", type=int, default=64, help="never-seen held-out records of the run's ledger (non-members)")
    sp.add_argument("--oracle", metavar="RUN", help="a run retrained without these samples on the same plan "
                                                    "(adds PrivLeak and forget quality)")
    sp.add_argument("--k", type=float, default=0.2, help="Min-K%% and Min-K%%++ fraction of tokens")
    sp.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--max-new-tokens", type=int, default=128, help="cap of the greedy completions (verbatim)")
    sp.add_argument("--no-generate", action="store_true", help="skip the greedy completions (verbatim memorisation)")
    sp.add_argument("--output", metavar="FILE.json", help="write the full result (ids and numbers only) here")
    sp.set_defaults(func=cmd_audit)

    sp = sub.add_parser("experiment", help="experiments: deletion-stream (quality, latency, audit vs deletions)")
    esub = sp.add_subparsers(dest="experiment", required=True)
    ep = esub.add_parser("deletion-stream", help="S3T (several B) and SISA under the same stream of deletions",
                         description="Options come from the recipe's experiment section (s3t_llm.config."
                                     "ExperimentConfig); a flag given here overrides its field.")
    ep.add_argument("recipe")
    ep.add_argument("overrides", nargs="*", help="section.field=value overrides of the recipe (experiment.* too)")
    ep.add_argument("--budgets", type=_ints, help="sequence budgets B (1 = SISA), e.g. 1,2,3 (default 1,2,3)")
    ep.add_argument("--requests", type=int, help="number of single-sample deletion requests (default 8)")
    ep.add_argument("--prior", choices=["uniform", "skewed"],
                    help="uniform over samples (default), or skewed: slice j hit with weight skew**j")
    ep.add_argument("--skew", type=float, help="default 0.5")
    ep.add_argument("--eval-every", type=int, help="evaluate after every k-th request (default 1)")
    ep.add_argument("--tasks", help="comma-separated zero-shot tasks (lm-eval task names; arc_easy etc. alias "
                                    "s3t_arc_easy etc.; default arc_easy,piqa)")
    ep.add_argument("--limit", type=int, help="items per task (a fixed seeded subset); 0 for all (default 40)")
    ep.add_argument("--heldout", type=int, help="held-out records for the loss (the rest: audit; default 32)")
    ep.add_argument("--no-audit", action="store_true", help="skip the membership audit")
    ep.add_argument("--no-reference", action="store_true", help="skip the full LoRA fine-tune reference")
    ep.add_argument("--generations", type=int, help="held-out prompts for the generation samples (default 3)")
    ep.add_argument("--backend", choices=["vllm", "offline"],
                    help="vllm (default): serve each copy with `s3t serve`; offline: stored run + in-process scoring")
    ep.add_argument("--out", help="experiment directory (default: <output_dir>/<name>-stream)")
    ep.add_argument("--seed", type=int)
    ep.set_defaults(func=cmd_experiment)

    sp = sub.add_parser("demo", help="the main job: simulate, train the CPU default recipe, serve, delete")
    sp.add_argument("overrides", nargs="*", help="section.field=value overrides of the recipe")
    sp.add_argument("--recipe", help="recipe (default: recipes/cpu_smollm2.yaml)")
    sp.add_argument("--deletions", type=int, default=3, help="number of deletion requests to apply")
    sp.add_argument("--trials", type=int, default=2000)
    sp.add_argument("--plot", default="simulate.png")
    sp.add_argument("--simulate-only", action="store_true")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from .adapters import StoreError
    from .config import ConfigError

    from .serving import ServingError

    from .locking import RunBusy

    known = [ConfigError, StoreError, FileNotFoundError, ServingError, RunBusy]
    for mod, name in (("ledger", "LedgerError"), ("records", "RecordError"), ("planner", "PlanError"),
                      ("models", "ModelError"), ("evaluation", "TaskError"),
                      ("evaluation.ensemble", "NoLiveShard")):
        try:
            known.append(getattr(__import__(f"s3t_llm.{mod}", fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    try:
        return args.func(args) or 0
    except tuple(known) as e:
        print(f"s3t {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
