"""`s3t train` under `accelerate launch` with several processes (DDP inside a stage; gloo on CPU): it finishes
(no deadlock between the ranks), trains the same stages as one process with the same global batch, and one
process under accelerate gives the very same bytes as a plain `s3t train`.

On a CPU machine `accelerate launch --cpu` starts ONE process (its simple launcher; several CPU processes need
mpirun), so the multi-process runs use accelerate's torchrun launcher (`--multi_gpu`, or `--use_deepspeed`): each
rank's Trainer has `use_cpu=True`, and accelerate's PartialState(cpu=True) makes a gloo group (MULTI_CPU).
A probe wrapped around `Trainer.train` records what each rank actually ran (distributed type, wrapper, batch).

Why the global batches are the same samples: transformers' Trainer draws one seeded RandomSampler order; with
two processes accelerate shards the batches of that order (rank r takes batches r, r+2, ...; each rank draws the
same permutation from the same seed), so global batch i of 2 ranks x 2 samples is batch i of 1 process x 4
samples. Every stage here has a multiple of 4 samples (12, 24), so no rank pads a short last batch with repeats.
The loss is normalised by the token count of the global batch on both paths (average_tokens_across_devices), and
DDP averages the ranks' gradients: the same gradient up to float32 summation order and padding length.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("accelerate")

from safetensors.torch import load_file  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 300  # a hang (ranks waiting on each other) fails the test with the launcher's output
LOSS_RTOL = 1e-5  # measured: 2-5e-8 relative (1 vs 2 processes)
# Block tensors: measured max |diff| 3.9e-7 (block 1) and 3.5e-7 (block 2) for DDP, 8e-7 for DeepSpeed ZeRO-2, on
# values up to 0.09. The differences are float32 summation order (gradient all-reduce, padding to 2 vs 4 rows)
# amplified by Adam (an update is ~lr * m / sqrt(v), |update| <= ~lr = 1e-3 per step). atol 1e-5 is ~25x the
# measured difference and 1% of one optimizer step: a wrong batch, a missing rank's gradient or a doubled loss
# scale moves entries by O(lr) and fails it.
TENSOR_ATOL = 1e-5

PROBE = textwrap.dedent('''
    """`python -m s3t_llm.cli` with a probe on Trainer.train: each rank appends what it ran to $S3T_PROBE."""
    import json, os, sys

    import transformers

    _train = transformers.Trainer.train

    def train(self, *args, **kwargs):
        out = _train(self, *args, **kwargs)
        acc = self.accelerator
        ds = getattr(acc.state, "deepspeed_plugin", None)
        rec = {"pid": os.getpid(), "rank": acc.process_index, "world": acc.num_processes,
               "type": getattr(acc.distributed_type, "value", str(acc.distributed_type)),
               "wrapped": type(self.model_wrapped).__name__,
               "per_device": self.args.per_device_train_batch_size, "steps": self.state.global_step,
               "zero_stage": ds.zero_stage if ds is not None else None}
        with open(os.path.join(os.environ["S3T_PROBE"], f"rank{acc.process_index}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\\n")
        return out

    transformers.Trainer.train = train
    from s3t_llm.cli import main

    sys.exit(main())
''')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED"):
        env.pop(k, None)
    return env


def _run(cmd, env, what) -> str:
    """Run ``cmd`` in its own process group; on a timeout kill the whole group (the launcher's workers too)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for script in (a for a in cmd if a.endswith(".py")):   # the elastic agent may leave ranks outside the group
            _kill_strays(script)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # a stray still holds the pipe: give up on its output, not the test run
            proc.stdout.close()
            out = ""
        pytest.fail(f"{what} did not finish in {TIMEOUT_S} s (deadlocked ranks?); output tail:\n{out[-6000:]}")
    assert proc.returncode == 0, f"{what} failed (rc {proc.returncode}); output tail:\n{out[-6000:]}"
    return out


def _kill_strays(probe: str) -> None:
    """SIGKILL every process whose command line runs this test's probe (ranks the launcher's group kill missed:
    after the elastic agent exits they are re-parented to init and would keep the output pipe open forever)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if probe.encode() in argv:
            try:
                os.kill(int(d.name), signal.SIGKILL)
            except OSError:
                pass


def _launch(work: Path, recipe: Path, name: str, flags: list[str], nproc: int, overrides=(),
            tag: str = "") -> tuple[Path, list]:
    probe_dir = work / f"probe-{name}{tag}"
    probe_dir.mkdir()
    probe = work / "probe_cli.py"
    if not probe.exists():
        probe.write_text(PROBE)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *flags, "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           str(probe), "train", str(recipe), f"name={name}", *overrides, "--no-export"]
    _run(cmd, _env(S3T_PROBE=str(probe_dir)), f"accelerate launch ({name}, {nproc} process(es))")
    recs = [json.loads(line) for f in sorted(probe_dir.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    return work / "runs" / name, recs


def _blocks(run_dir: Path) -> dict:
    out = {}
    for mf in sorted((run_dir / "blocks").glob("shard*/p*/manifest.json")):
        out[mf.parent.name] = (json.loads(mf.read_text()), load_file(str(mf.parent / "adapter_block.safetensors")))
    return out


def _tensor_sha(tensors: dict) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].numpy().tobytes())
    return h.hexdigest()


def _summary_losses(run_dir: Path) -> dict:
    s = json.loads((run_dir / "train_summary.json").read_text())
    return {"p" + "-".join(map(str, b["prefix"])): b["loss"] for b in s["blocks"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_llama, alpaca_sample):
    """A recipe (2 slices of 12 records: stages of 12 and 24 samples, per-device batch 4) and the reference:
    `s3t train` in this process, on one thread like the launched ranks."""
    import yaml

    from s3t_llm.cli import main

    d = tmp_path_factory.mktemp("accel")
    data = d / "data.json"
    data.write_text(json.dumps(alpaca_sample[:24]))
    recipe = d / "recipe.yaml"
    # logging_steps=2: stage 1 (3 steps) ends between logging steps, stage 2 (6 steps) on one (see the DDP test).
    recipe.write_text(yaml.safe_dump({
        "name": "plain", "output_dir": str(d / "runs"), "model": {"name": str(tiny_llama)},
        "data": {"path": str(data), "max_length": 160, "heldout": 0},
        "s3t": {"shards": 1, "slices": 2, "budget": 1},
        "train": {"batch_size": 4, "learning_rate": 0.001, "logging_steps": 2}}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(recipe), "--no-export"]) == 0
    finally:
        torch.set_num_threads(threads)
    plain = _blocks(d / "runs" / "plain")
    assert len(plain) == 2  # one sequence of 2 slices: blocks p<a> and p<a>-<b>
    assert sorted(m["n_used"] for m, _ in plain.values()) == [12, 24]  # nothing truncated: batches of 4 exactly
    return d, recipe, plain


def _assert_same_training(plain: dict, other: dict, other_dir: Path, plain_dir: Path, what: str) -> None:
    assert sorted(other) == sorted(plain), what
    report = []
    for key, (pm, pt) in plain.items():
        om, ot = other[key]
        for f in ("sample_ids", "slice_hashes", "n_used", "steps", "seed", "tokens"):
            assert om[f] == pm[f], (what, key, f)
        assert sorted(ot) == sorted(pt)
        diff = max(float((ot[k] - pt[k]).abs().max()) for k in pt)
        report.append((key, diff))
        assert all(torch.allclose(ot[k], pt[k], rtol=0, atol=TENSOR_ATOL) for k in pt), (what, key, diff)
    # The stage's loss as the run reports it (train_summary.json): the mean over the ranks.
    pl, ol = _summary_losses(plain_dir), _summary_losses(other_dir)
    assert sorted(pl) == sorted(ol)
    for key in pl:
        assert abs(ol[key] - pl[key]) <= LOSS_RTOL * abs(pl[key]), (what, key, ol[key], pl[key])
    print(f"{what}: max |tensor diff| per block {report}; losses {ol} vs {pl}")


def test_two_processes_ddp_train_the_same_stages_as_one(work):
    d, recipe, plain = work
    run_dir, probe = _launch(d, recipe, "ddp2", ["--multi_gpu"], 2, ["train.batch_size=2"])
    # Both ranks trained both stages, as DDP over a 2-process gloo group, 2 samples per rank and step.
    assert sorted((r["rank"], r["steps"]) for r in probe) == [(0, 3), (0, 6), (1, 3), (1, 6)]
    assert {(r["world"], r["type"], r["wrapped"], r["per_device"]) for r in probe} == \
        {(2, "MULTI_CPU", "DistributedDataParallel", 2)}
    other = _blocks(run_dir)
    _assert_same_training(plain, other, run_dir, d / "runs" / "plain", "2 processes (DDP)")
    # The manifest's train_loss is rank 0's `training_loss`: exact where the stage's last step is a logging step
    # (stage 2: 6 steps, logging_steps=2). Stage 1 (3 steps) ends with a rank-local tail that transformers does
    # not reduce, so its manifest value is rank 0's alone (the summary above carries the ranks' mean).
    deep = max(plain, key=len)
    pm, om = plain[deep][0], other[deep][0]
    assert pm["steps"] == 6
    assert abs(om["train_loss"] - pm["train_loss"]) <= LOSS_RTOL * abs(pm["train_loss"])
    assert len(list((run_dir / "blocks" / "shard0").glob(".staging-*"))) == 0

    # Resuming under 2 processes: rank 0 finds both blocks valid, every rank follows (nothing trained, no hang).
    _, probe2 = _launch(d, recipe, "ddp2", ["--multi_gpu"], 2, ["train.batch_size=2"], tag="-resume")
    assert probe2 == []
    s = json.loads((run_dir / "train_summary.json").read_text())
    assert (s["stages_trained"], s["stages_reused"]) == (0, 2)
    assert {k: _tensor_sha(t) for k, (_, t) in _blocks(run_dir).items()} == \
        {k: _tensor_sha(t) for k, (_, t) in other.items()}


def test_one_process_under_accelerate_is_byte_identical_to_plain_training(work):
    d, recipe, plain = work
    run_dir, probe = _launch(d, recipe, "acc1", [], 1)
    assert {(r["world"], r["type"], r["per_device"]) for r in probe} == {(1, "NO", 4)}
    other = _blocks(run_dir)
    assert sorted(other) == sorted(plain)
    for key, (pm, pt) in plain.items():
        om, ot = other[key]
        assert _tensor_sha(ot) == _tensor_sha(pt), key
        assert om["sha256"] == pm["sha256"] and om["train_loss"] == pm["train_loss"], key
    _assert_same_training(plain, other, run_dir, d / "runs" / "plain", "1 process under accelerate")


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (optional: `pip install --no-build-isolation deepspeed`)")
def test_two_processes_deepspeed_zero2_train_the_same_stages_as_one(work):
    d, recipe, plain = work
    flags = ["--use_deepspeed", "--zero_stage", "2", "--gradient_accumulation_steps", "1", "--gradient_clipping",
             "1.0", "--offload_optimizer_device", "none", "--offload_param_device", "none",
             "--zero3_init_flag", "false"]
    run_dir, probe = _launch(d, recipe, "ds2", flags, 2, ["train.batch_size=2"])
    assert sorted((r["rank"], r["steps"]) for r in probe) == [(0, 3), (0, 6), (1, 3), (1, 6)]
    assert {(r["world"], r["type"], r["wrapped"], r["zero_stage"], r["per_device"]) for r in probe} == \
        {(2, "DEEPSPEED", "DeepSpeedEngine", 2, 2)}
    _assert_same_training(plain, _blocks(run_dir), run_dir, d / "runs" / "plain", "2 processes (DeepSpeed ZeRO-2)")
