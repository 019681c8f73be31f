"""Scale-out S3T training on Ray: the shared-prefix stage tree as Ray tasks (``s3t train RECIPE --ray``).

The driver (the ``s3t train`` process) is the only process that touches the run directory: it owns the
ledger and the block store. For every stage ``(shard, prefix)`` whose parent block is valid, it reads the
stage's live samples and their slice hashes from the ledger and submits one Ray task with

* the run's frozen description (``run.json``'s content: config, base model path, block layout), put once;
* the stage's samples, grouped by slice, with the slice hashes they were read under;
* the tensors of blocks ``1..k-1`` (in the object store: memory, never a file the worker opens).

A worker process builds one :class:`~s3t_llm.training.StageTrainer` (the base model, loaded once per
process and reused for its next stages) on an in-memory stand-in of the run (:class:`_WorkerRun`: a ledger
that answers from the samples sent, a store that answers from the parent tensors sent, a scratch directory
outside the run) and runs the unchanged ``StageTrainer.train_stage`` on it, so a stage trained on Ray is the
same computation as a serial one: with the same thread count its block is byte-identical (tested). It
returns block k's tensors and manifest; the driver checks them (the slice hashes and sample ids are those it
sent, the parent digest is the stored parent's, the tensors cover exactly block k's layers, the blocks below
were returned untouched and the blocks above are zero) and writes them through ``Run.write_block``, which
re-checks under the run's writer lock that the slices are still current and the parent still valid (the
exactness rule). A stage that went stale while it trained (a deletion landed) is discarded and scheduled
again on the new data.

Workers never open a path under the run directory: every task installs a Python audit hook that refuses
(``PermissionError``) and records any open / listdir / mkdir / remove / rename / sqlite connect under it,
and reports the file descriptors it holds there at the end of the task; the driver fails the run on any.

A worker that dies mid-stage loses nothing: nothing is written until the driver has the whole result, Ray
retries the task (``max_retries``), and where Ray gives up the driver submits the stage again
(``resubmits``). Each attempt registers with a small progress actor, which numbers the attempts of every
stage (the summary and the block manifest record the attempt that produced the block, its node and pid).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import exactness
from .adapters import layer_of
from .locking import hold
from .run import DATASET, Run, StaleStageError

__all__ = ["train_run_ray", "ray_options", "tensor_digest", "connect", "local_resources", "GuardViolation"]

logger = logging.getLogger(__name__)

Key = tuple[int, tuple[int, ...]]


def _key_str(key: Key) -> str:
    return f"s{key[0]}/p{'-'.join(map(str, key[1]))}"


def tensor_digest(tensors: dict) -> str:
    """sha256 over a block's tensors (names, dtypes, shapes, raw bytes), independent of any file format."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ===== the worker side ===========================================================================
class GuardViolation(PermissionError):
    """A worker tried to touch the run directory."""


_GUARD: dict = {"forbid": (), "violations": [], "events": 0, "installed": False}
_AUDITED = {"open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rmdir", "os.rename", "os.chdir",
            "os.chmod", "os.link", "os.symlink", "os.truncate", "os.utime", "shutil.rmtree", "shutil.copyfile",
            "shutil.move", "sqlite3.connect", "glob.glob", "os.walk"}


def _under(path: str, roots) -> bool:
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def _audit(event: str, args) -> None:
    roots = _GUARD["forbid"]
    if not roots or event not in _AUDITED or not args:
        return
    p = args[0]
    if not isinstance(p, (str, bytes, os.PathLike)):
        return
    _GUARD["events"] += 1
    try:
        full = os.path.abspath(os.fsdecode(p))
    except (TypeError, ValueError):
        return
    if _under(full, roots):
        _GUARD["violations"].append(f"{event} {full}")
        raise GuardViolation(f"s3t worker: {event} of {full} refused: workers never touch the run directory")


def install_guard(forbid: list[str]) -> None:
    """Refuse (and record) every file-system access under ``forbid`` in this process from now on."""
    roots = set()
    for r in forbid:
        roots.add(os.path.abspath(r))
        roots.add(os.path.realpath(r))
    _GUARD["forbid"] = tuple(sorted(roots))
    _GUARD["violations"] = []
    _GUARD["events"] = 0
    if not _GUARD["installed"]:
        sys.addaudithook(_audit)  # cannot be removed; inert while ``forbid`` is empty
        _GUARD["installed"] = True


def open_fds_under(roots) -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if _under(target, roots):
                    out.append(target)
    return out


class _WorkerLedger:
    """Answers ``StageTrainer.stage_examples`` from the samples the driver sent (no SQLite file)."""

    def __init__(self, job: dict):
        self.job = job

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def _check(self, name, shard, sl):
        if name != DATASET or int(shard) != self.job["shard"] or str(int(sl)) not in self.job["hashes"]:
            raise RuntimeError(f"worker ledger: ({name}, {shard}, {sl}) was not sent for stage {self.job['key']}")

    def slice_hash(self, name, shard, sl):
        self._check(name, shard, sl)
        return self.job["hashes"][str(int(sl))]

    def slice_samples(self, name, shard, sl, **kw):
        self._check(name, shard, sl)
        return [(sid, dict(rec)) for sid, rec in self.job["samples"][str(int(sl))]]


class _WorkerStore:
    """Answers ``set_stack`` / ``train_stage`` from the parent tensors the driver sent."""

    def __init__(self, job: dict, parents: tuple):
        self.job = job
        self.parents = {}
        shard, prefix = job["shard"], tuple(job["prefix"])
        for k, (tensors, meta) in enumerate(zip(parents, job["parents"]), start=1):
            if tuple(meta["prefix"]) != prefix[:k]:
                raise RuntimeError(f"worker store: parent {k} is {meta['prefix']}, expected {prefix[:k]}")
            self.parents[(shard, prefix[:k])] = (tensors, meta)

    def _get(self, shard, prefix):
        key = (int(shard), tuple(int(x) for x in prefix))
        if key not in self.parents:
            raise RuntimeError(f"worker store: block {key} was not sent")
        return self.parents[key]

    def manifest(self, shard, prefix) -> dict:
        return {"sha256": self._get(shard, prefix)[1]["sha256"]}

    def load_block(self, shard, prefix) -> dict:
        tensors, meta = self._get(shard, prefix)
        if tensor_digest(tensors) != meta["digest"]:
            raise RuntimeError(f"worker store: block {(shard, prefix)} arrived corrupted (digest mismatch)")
        return {k: v.clone() for k, v in tensors.items()}


def worker_info(run) -> dict:
    """What a worker's ``_WorkerRun`` knows of the run: the parts of run.json that ``StageTrainer`` reads
    (``block_order`` decides the frozen lower blocks' dropout; a run.json from before it reads as top-down)."""
    info = {k: run.info[k] for k in ("config", "model_path", "base_fingerprint", "num_layers", "blocks", "sequences")}
    info["block_order"] = run.block_order
    return info


class _WorkerRun:
    """The parts of :class:`~s3t_llm.run.Run` that ``StageTrainer`` reads, from what the driver sent."""

    def __init__(self, info: dict, scratch: Path):
        from .config import load_config

        self.info = info
        self.config = load_config(info["config"])
        self.dir = scratch  # temporary trainer output only; never the run directory
        self._job = None
        self._parents = ()
        self.captured = None

    model_path = property(lambda self: self.info["model_path"])
    blocks = property(lambda self: self.info["blocks"])
    block_order = property(lambda self: self.info.get("block_order", "top_down"))
    sequences = property(lambda self: [list(s) for s in self.info["sequences"]])
    shards = property(lambda self: self.config.s3t.shards)

    def begin(self, job: dict, parents: tuple) -> None:
        self._job, self._store, self.captured = job, _WorkerStore(job, parents), None

    def ledger(self):
        return _WorkerLedger(self._job)

    @property
    def store(self):
        return self._store

    def lora_dict(self) -> dict:
        c = self.config.lora
        return {"r": c.r, "alpha": c.alpha, "rslora": c.rslora, "target_modules": list(c.target_modules),
                "dropout": c.dropout}

    def write_block(self, shard, prefix, tensors, manifest):
        # Not a write: the result goes back to the driver, which checks it and writes it.
        self.captured = (int(shard), tuple(int(x) for x in prefix), tensors, dict(manifest))
        return dict(manifest)

    def __getattr__(self, name):
        raise AttributeError(f"a Ray worker has no access to the run's {name!r} (it never opens the run directory)")


_WORKER: dict = {"key": None, "trainer": None, "run": None, "scratch": None, "current": None, "patched": False}


def _worker_trainer(spec: dict):
    import torch

    torch.set_num_threads(int(spec["threads"]))
    key = hashlib.sha256(repr((spec["info"], spec["precision"])).encode()).hexdigest()
    if _WORKER["key"] != key:
        from .training import StageTrainer

        if _WORKER["trainer"] is not None:
            _WORKER["trainer"].clear_caches()
        scratch = Path(tempfile.mkdtemp(prefix=f"s3t-ray-worker-pid{os.getpid()}-"))
        wrun = _WorkerRun(spec["info"], scratch)
        t0 = time.perf_counter()
        _WORKER.update(trainer=StageTrainer(wrun, spec["precision"]), run=wrun, scratch=scratch, key=key,
                       load_s=time.perf_counter() - t0)
    else:
        _WORKER["load_s"] = 0.0
    return _WORKER["trainer"], _WORKER["run"]


def _patch_steps() -> None:
    """Report every optimizer step of the current stage to the hook (installed only when a hook is given)."""
    if _WORKER["patched"]:
        return
    from transformers import Trainer

    orig = Trainer.training_step

    def training_step(self, *a, **kw):
        out = orig(self, *a, **kw)
        cur = _WORKER["current"]
        if cur is not None and cur.get("hook") is not None:
            cur["step"] += 1
            cur["hook"]("step", cur["key"], cur["step"])
        return out

    Trainer.training_step = training_step
    _WORKER["patched"] = True


def _run_stage(spec: dict, job: dict, *parents) -> dict:
    """One stage in a Ray worker: train block k of ``job`` on the samples and parent tensors sent."""
    import ray
    import torch

    ctx = ray.get_runtime_context()
    pid, node, task_id = os.getpid(), ctx.get_node_id(), ctx.get_task_id()
    # Never ray.get inside a stage: a task blocked in ray.get gives its CPUs back to Ray, which would then start
    # another stage (and another worker process with its own model) beside it. The attempt number is resolved by
    # the driver from this token (the actor numbers the starts of each stage in arrival order).
    import uuid

    token = uuid.uuid4().hex
    spec["progress"].started.remote(job["key"], pid, node, task_id, token)
    install_guard(spec["forbid"])
    hook = spec.get("hook")
    t0 = time.perf_counter()
    trainer, wrun = _worker_trainer(spec)
    load_s = _WORKER["load_s"]
    if hook is not None:
        _patch_steps()
    _WORKER["current"] = {"key": job["key"], "hook": hook, "step": 0}
    try:
        if hook is not None:
            hook("start", job["key"], 0)
        wrun.begin(job, parents)
        shard, prefix = job["shard"], tuple(job["prefix"])
        trainer.train_stage(shard, prefix)
        if wrun.captured is None:
            raise RuntimeError("the stage trainer returned without a block (is RANK set in the worker?)")
        _, _, tensors, manifest = wrun.captured
        k = len(prefix)
        below = {b: tensor_digest(trainer.block_tensors(b)) for b in range(1, k)}
        above = {b: float(sum(float(p.detach().abs().sum()) for _, p in trainer.block_params[b]))
                 for b in trainer.block_params if b > k}
        fit = dict(trainer.last_fit)
        fit.pop("log", None)
    finally:
        _WORKER["current"] = None
    violations = list(_GUARD["violations"]) + [f"fd {t}" for t in open_fds_under(_GUARD["forbid"])]
    events = _GUARD["events"]
    spec["progress"].finished.remote(job["key"], token)
    return {"key": job["key"], "tensors": {n: t.contiguous() for n, t in tensors.items()}, "manifest": manifest,
            "attempt": None, "token": token, "pid": pid, "node": node, "task_id": task_id,
            "ip": ray.util.get_node_ip_address(), "below": below, "above": above, "violations": violations,
            "guard_events": events, "load_s": load_s, "wall_s": time.perf_counter() - t0, "fit": fit,
            "threads": torch.get_num_threads()}


def _progress_actor():
    import ray

    @ray.remote(num_cpus=0, max_restarts=0)
    class Progress:
        """Numbers the attempts of each stage and knows which are running where."""

        def __init__(self):
            self.attempts: dict[str, list] = {}
            self.running: dict[str, dict] = {}

        def started(self, key, pid, node, task_id, token):
            self.attempts.setdefault(key, []).append({"pid": pid, "node": node, "task_id": task_id,
                                                      "at": time.time(), "token": token})
            self.running[key] = {"pid": pid, "node": node, "attempt": len(self.attempts[key]), "since": time.time(),
                                 "token": token}
            return len(self.attempts[key])

        def finished(self, key, token):
            if self.running.get(key, {}).get("token") == token:
                self.running.pop(key, None)

        def attempt_of(self, key, token):
            for i, a in enumerate(self.attempts.get(key, []), start=1):
                if a["token"] == token:
                    return i
            return None

        def state(self):
            return {"attempts": self.attempts, "running": self.running}

    return Progress.options(name=None).remote()


# ===== the driver side ===========================================================================
def local_resources(threads: int = 1, workers: int | None = None) -> dict:
    """What a local Ray instance gets: one stage per GPU, else CPU workers of ``threads`` threads each."""
    try:
        n_cpu = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n_cpu = os.cpu_count() or 1
    n_gpu = 0
    with contextlib.suppress(Exception):
        import torch

        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpu:
        n = workers or n_gpu
        return {"num_cpus": max(n * threads, 1), "num_gpus": n_gpu, "workers": n}
    n = workers or max(1, n_cpu // max(1, threads))
    return {"num_cpus": n * threads, "num_gpus": 0, "workers": n}


def ray_options(section, *, address: str | None = None, threads: int | None = None,
                workers: int | None = None) -> dict:
    """``train_run_ray`` keyword arguments from a recipe's ``ray:`` section (:class:`s3t_llm.config.RayConfig`),
    with the command line's values (not None) taking precedence."""
    for name, v in (("threads", threads), ("workers", workers)):
        if v is not None and v < 1:
            raise ValueError(f"--ray-{name}={v}: must be >= 1")
    return {"address": address if address is not None else section.address,
            "threads": threads if threads is not None else section.threads,
            "workers": workers if workers is not None else section.workers,
            "gpus_per_stage": section.gpus_per_stage, "max_retries": section.max_retries,
            "resubmits": section.resubmits}


def connect(address: str | None, *, threads: int = 1, workers: int | None = None) -> bool:
    """Connect to Ray. ``None``/``"local"``: start a local instance sized to the machine, bound to 127.0.0.1,
    no dashboard, no usage reporting, no object spilling (stage data stays in memory); ``"auto"`` or
    ``HOST:PORT``: an existing cluster. Returns whether this call started Ray (the caller shuts it down)."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    if ray.is_initialized():
        return False
    if address in (None, "", "local"):
        res = local_resources(threads, workers)
        ray.init(num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False,
                 _system_config={"automatic_object_spilling_enabled": False})
    else:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    return True


def _stage_job(run: Run, key: Key, parents: list[dict]) -> dict:
    """The stage's live samples and slice hashes, read consistently (hashes equal before and after)."""
    shard, prefix = key
    for _ in range(5):
        with run.ledger() as led:
            h1 = {str(sl): led.slice_hash(DATASET, shard, sl) for sl in prefix}
            samples = {str(sl): led.slice_samples(DATASET, shard, sl) for sl in prefix}
            h2 = {str(sl): led.slice_hash(DATASET, shard, sl) for sl in prefix}
        if h1 == h2:
            return {"key": _key_str(key), "shard": shard, "prefix": list(prefix), "hashes": h1, "samples": samples,
                    "parents": parents}
    raise StaleStageError(f"the slices of {_key_str(key)} keep changing while they are read")


def _check_result(run: Run, key: Key, job: dict, res: dict) -> None:
    """The driver's own check of a returned block before it is written (Run.write_block re-checks the ledger)."""
    shard, prefix = key
    k = len(prefix)
    man, tensors = res["manifest"], res["tensors"]
    problems = []
    if res["violations"]:
        problems.append(f"the worker touched the run directory: {res['violations'][:3]}")
    if man.get("slice_hashes") != job["hashes"]:
        problems.append("slice hashes differ from the ones sent")
    want_ids = [sid for sl in prefix for sid, _ in job["samples"][str(sl)]]
    if list(man.get("sample_ids") or []) != want_ids:
        problems.append("sample ids differ from the ones sent")
    if man.get("block") != k or list(man.get("slices") or []) != list(prefix):
        problems.append(f"manifest is for block {man.get('block')} slices {man.get('slices')}")
    want_parent = job["parents"][-1]["sha256"] if k > 1 else None
    if man.get("parent_sha256") != want_parent:
        problems.append("parent digest differs from the stored parent's")
    layers = {layer_of(n) for n in tensors}
    if layers != set(run.blocks[k - 1]):
        problems.append(f"tensors cover layers {sorted(x for x in layers if x is not None)}, "
                        f"block {k} is {run.blocks[k - 1]}")
    sent = {b: p["digest"] for b, p in enumerate(job["parents"], start=1)}
    if res["below"] != sent:
        problems.append("blocks below k came back changed")
    if any(v != 0.0 for v in res["above"].values()):
        problems.append("blocks above k are not zero")
    if problems:
        raise RuntimeError(f"Ray stage {_key_str(key)} (attempt {res['attempt']}, pid {res['pid']}) refused: "
                           + "; ".join(problems))


_SYSTEM_ERRORS = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
                  "LocalRayletDiedError", "ObjectFetchTimedOutError", "ObjectReconstructionFailedError",
                  "RaySystemError", "OutOfMemoryError")


def _is_system_error(e: BaseException) -> bool:
    import ray

    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        return cause is not None and type(cause).__name__ in _SYSTEM_ERRORS
    return type(e).__name__ in _SYSTEM_ERRORS


def train_run_ray(run: Run, *, address: str | None = None, shards: list[int] | None = None,
                  sequences: list[int] | None = None, precision: str | None = None, progress: bool = True,
                  threads: int = 1, workers: int | None = None, gpus_per_stage: float | None = None,
                  max_retries: int = 3, resubmits: int = 2, hook: Callable | None = None,
                  on_poll: Callable | None = None) -> dict:
    """Train every missing or stale block of ``run`` as Ray tasks; the same summary as
    :func:`s3t_llm.training.train_run` plus ``where`` (node, pid, attempt of every stage) and ``ray``.

    ``threads``: torch threads per stage (and CPUs a stage reserves); ``workers``: size of a local instance
    (default: the machine's CPUs // threads, or one per GPU); ``gpus_per_stage``: default 1 where the cluster
    has GPUs. ``hook(phase, stage, step)`` runs in the worker (``"start"``, then ``"step"`` after every
    training step): for tests. ``on_poll(state)`` runs in the driver at every scheduler poll.
    """
    import ray

    with hold(run.dir, "train"):
        started = connect(address, threads=threads, workers=workers)
        try:
            return _drive(run, shards=shards, sequences=sequences, precision=precision, progress=progress,
                          threads=threads, gpus_per_stage=gpus_per_stage, max_retries=max_retries,
                          resubmits=resubmits, hook=hook, on_poll=on_poll)
        finally:
            if started:
                ray.shutdown()


def _drive(run: Run, *, shards, sequences, precision, progress, threads, gpus_per_stage, max_retries, resubmits,
           hook, on_poll) -> dict:
    import ray
    from tqdm.auto import tqdm

    from .training import stage_plan

    t_start, t_wall0 = time.perf_counter(), time.time()
    n_clean = run.store.clean_staging()
    if n_clean:
        logger.info("removed %d partial artifacts from an interrupted run", n_clean)
    plan = stage_plan(run, shards, sequences)
    hashes = run.slice_hashes()
    manifests = run.block_manifests()
    valid = exactness.valid_blocks(manifests, hashes)
    todo = [key for key in plan if key not in valid]
    summary = {"stages_total": len(plan), "stages_reused": len(plan) - len(todo), "stages_trained": 0,
               "stages_discarded": 0, "tokens": 0, "seconds": 0.0, "blocks": [], "where": []}
    if not todo:
        return summary
    res = ray.cluster_resources()
    if gpus_per_stage is None:
        gpus_per_stage = 1.0 if res.get("GPU", 0) > 0 else 0.0
    # A stage no node can hold would wait forever: refuse it now, naming the resource.
    if gpus_per_stage > res.get("GPU", 0):
        raise RuntimeError(f"a stage reserves {gpus_per_stage:g} GPU(s) (ray.gpus_per_stage) but the Ray cluster has "
                           f"{res.get('GPU', 0):g}; set ray.gpus_per_stage=0 to train on CPUs")
    if threads > res.get("CPU", 0):
        raise RuntimeError(f"a stage reserves {threads} CPU(s) (--ray-threads / ray.threads) but the Ray cluster has "
                           f"{res.get('CPU', 0):g}")
    prog = _progress_actor()
    spec = {"info": worker_info(run),
            "precision": precision, "threads": int(threads), "forbid": [str(run.dir.resolve())],
            "progress": prog, "hook": hook}
    spec_ref = ray.put(spec)
    task = ray.remote(_run_stage).options(num_cpus=threads, num_gpus=gpus_per_stage, max_retries=max_retries,
                                          retry_exceptions=False)
    blocks_mem: dict[Key, dict] = {}  # key -> {"ref", "digest", "sha256"}: parents in the object store

    def parent_meta(key: Key) -> dict:
        sha = manifests[key]["sha256"]
        cur = blocks_mem.get(key)
        if cur is None or cur["sha256"] != sha:
            tensors = run.store.load_block(*key)  # checks the file against its manifest digest
            cur = {"ref": ray.put(tensors), "digest": tensor_digest(tensors), "sha256": sha}
            blocks_mem[key] = cur
        return cur

    pending: dict = {}  # ObjectRef -> (key, job, submitted_at)
    submits: dict[Key, int] = {}
    in_flight: set[Key] = set()
    bar = tqdm(total=len(todo), desc="S3T stages (ray)", unit="stage", disable=not progress)
    sched_s = 0.0
    postfix = ""
    try:
        while True:
            t0 = time.perf_counter()
            now = run.slice_hashes()
            if now != hashes:
                logger.info("the ledger changed while training: stale stages are discarded and scheduled again")
                hashes = now
                manifests = run.block_manifests()
                valid = exactness.valid_blocks(manifests, hashes)
                missing = [k for k in plan if k not in valid]
                bar.total = summary["stages_trained"] + len(missing)
                bar.refresh()
            for key in plan:
                if key in valid or key in in_flight:
                    continue
                shard, prefix = key
                if len(prefix) > 1 and (shard, prefix[:-1]) not in valid:
                    continue
                if submits.get(key, 0) > resubmits:
                    raise RuntimeError(f"stage {_key_str(key)} failed {submits[key]} times; giving up")
                metas = [parent_meta((shard, prefix[:j])) for j in range(1, len(prefix))]
                job = _stage_job(run, key, [{"prefix": list(prefix[:j + 1]), "digest": m["digest"],
                                             "sha256": m["sha256"]} for j, m in enumerate(metas)])
                ref = task.remote(spec_ref, job, *[m["ref"] for m in metas])
                pending[ref] = (key, job, time.time())
                in_flight.add(key)
                submits[key] = submits.get(key, 0) + 1
            sched_s += time.perf_counter() - t0
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            t0 = time.perf_counter()
            state = ray.get(prog.state.remote())
            if on_poll is not None:
                on_poll(state)
            for ref in done:
                key, job, _ = pending.pop(ref)
                in_flight.discard(key)
                try:
                    res = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - sorted below
                    if not _is_system_error(e):
                        raise
                    logger.warning("stage %s lost its worker beyond Ray's retries (%s); submitting it again",
                                   _key_str(key), type(e).__name__)
                    continue
                for _ in range(200):  # the worker's start report is asynchronous: wait for it to land
                    res["attempt"] = ray.get(prog.attempt_of.remote(job["key"], res["token"]))
                    if res["attempt"] is not None:
                        break
                    time.sleep(0.05)
                else:
                    raise RuntimeError(f"stage {_key_str(key)}: the progress actor never saw this attempt start")
                _check_result(run, key, job, res)
                tensors = res["tensors"]
                man = dict(res["manifest"])
                man["ray"] = {"node": res["node"], "ip": res["ip"], "pid": res["pid"], "attempt": res["attempt"],
                              "task_id": res["task_id"], "threads": res["threads"]}
                try:
                    man = run.write_block(key[0], key[1], tensors, man)
                except StaleStageError as e:
                    summary["stages_discarded"] += 1
                    logger.info("discarded stage %s: %s", _key_str(key), e)
                    hashes = run.slice_hashes()
                    manifests = run.block_manifests()
                    valid = exactness.valid_blocks(manifests, hashes)
                    continue
                manifests[key] = man
                valid = exactness.valid_blocks(manifests, hashes)
                blocks_mem[key] = {"ref": ray.put(tensors), "digest": tensor_digest(tensors), "sha256": man["sha256"]}
                summary["stages_trained"] += 1
                summary["tokens"] += man["tokens"]
                summary["seconds"] += man["seconds"]
                fit = res["fit"]
                summary["blocks"].append({"shard": key[0], "prefix": list(key[1]), "loss": man["train_loss"],
                                          "seconds": round(man["seconds"], 2),
                                          "setup_s": round(fit.get("setup_s", 0.0), 3),
                                          "cache_fill_s": round(fit.get("cache_fill_s", 0.0), 3),
                                          "cache_layer": fit.get("cache_layer"),
                                          **{k: fit[k] for k in ("forward_s", "backward_s", "optimizer_s") if k in fit}})
                summary["where"].append({"stage": _key_str(key), "shard": key[0], "prefix": list(key[1]),
                                         "node": res["node"], "ip": res["ip"], "pid": res["pid"],
                                         "attempt": res["attempt"], "task_id": res["task_id"],
                                         "sha256": man["sha256"], "worker_wall_s": round(res["wall_s"], 3),
                                         "model_load_s": round(res["load_s"], 3),
                                         "guard_events": res["guard_events"]})
                bar.update(1)
            running = {k: v for k, v in state["running"].items() if any(k == _key_str(x[0]) for x in pending.values())}
            text = (f"running {len(running)} queued {len(pending) - len(running)} | "
                    + " ".join(f"{v['node'][:6]}:{v['pid']}={k}" for k, v in sorted(running.items())))
            if text != postfix:
                postfix = text
                bar.set_postfix_str(text)
            sched_s += time.perf_counter() - t0
    finally:
        bar.close()
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
    state = ray.get(prog.state.remote())
    summary["attempts"] = {k: len(v) for k, v in state["attempts"].items()}
    summary["attempt_log"] = state["attempts"]
    summary["ray"] = {"nodes": sorted({w["node"] for w in summary["where"]}), "threads_per_stage": threads,
                      "gpus_per_stage": gpus_per_stage, "driver_seconds": round(time.perf_counter() - t_start, 2),
                      "scheduler_seconds": round(sched_s, 3), "started_at": t_wall0, "finished_at": time.time()}
    return summary


def format_where(summary: dict) -> str:
    """The summary's table of where each stage ran."""
    rows = ["stage            node      ip              pid      attempt  seconds  sha256"]
    for w in summary.get("where", []):
        rows.append(f"{w['stage']:<16} {w['node'][:8]:<9} {w['ip']:<15} {w['pid']:<8} {w['attempt']:<8} "
                    f"{w['worker_wall_s']:<8.1f} {w['sha256'][:12]}")
    return "\n".join(rows)
