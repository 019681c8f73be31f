"""Stage training on a tiny random Llama: the exactness invariants, with numbers."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

from s3t_llm.adapters import layer_of  # noqa: E402
from s3t_llm.config import ConfigError, load_config  # noqa: E402
from s3t_llm.run import DATASET, Run, split_blocks  # noqa: E402
from s3t_llm.training import StageTrainer, stage_plan, train_run  # noqa: E402


def make_cfg(tmp_path, model_dir, data_path, name="t", extra=()):
    return load_config(None, [
        f"name={name}", f"output_dir={tmp_path / 'runs'}", f"model.name={model_dir}", f"data.path={data_path}",
        "data.max_length=160", "data.heldout=0", "s3t.shards=1", "s3t.slices=3", "s3t.budget=1",
        "train.batch_size=4", "train.learning_rate=0.001", *extra,
    ])


def block_sha(run, prefix, shard=0):
    return run.store.manifest(shard, tuple(prefix))["sha256"]


def test_layer_index_is_parsed_not_substring_matched():
    assert layer_of("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight") == 1
    assert layer_of("base_model.model.model.layers.10.mlp.up_proj.lora_B.weight") == 10
    assert layer_of("model.embed_tokens.weight") is None


def test_blocks_split_top_down():
    assert split_blocks(list(range(4)), 3) == [[2, 3], [1], [0]]
    assert split_blocks(list(range(18, 30)), 3) == [[26, 27, 28, 29], [22, 23, 24, 25], [18, 19, 20, 21]]
    with pytest.raises(ConfigError, match="larger than the 4 LoRA layers"):
        split_blocks(list(range(4)), 5)


def test_prefix_tree_shares_blocks_when_budget_exceeds_slices(tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:36])
    run = Run.create(make_cfg(tmp_path, tiny_llama, data, extra=["s3t.budget=6"]))
    assert len(run.sequences) == 6 and len({tuple(s) for s in run.sequences}) == 6
    plan = stage_plan(run)
    # 3 distinct first slices + 6 distinct 2-prefixes + 6 full sequences, instead of 6 * 3 = 18 stages.
    assert len(plan) == 15
    assert len(set(plan)) == len(plan)


def test_stage_k_changes_only_block_k(tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:36])
    run = Run.create(make_cfg(tmp_path, tiny_llama, data))
    tr = StageTrainer(run)
    seq = tuple(run.sequences[0])
    tr.train_stage(0, seq[:1])
    before = {n: t.detach().clone() for n, t in tr.model.state_dict().items()}
    tr.train_stage(0, seq[:2])
    after = tr.model.state_dict()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    block2 = {n for n, _ in tr.block_params[2]}
    block2_sd = {n for n in after if "lora_" in n and layer_of(n) in run.blocks[1]}
    assert block2_sd and changed == block2_sd
    assert len(block2) == len(block2_sd)
    n_base = sum(1 for n in after if "lora_" not in n)
    assert n_base > 20  # the base weights were all compared, and none moved
    # Block 3 is absent: all-zero tensors.
    assert all(float(p.abs().sum()) == 0.0 for _, p in tr.block_params[3])


def test_exported_prefix_adapter_reloads_with_equal_logits(tmp_path, tiny_llama, alpaca_sample, write_records):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_records(alpaca_sample[:36])
    run = Run.create(make_cfg(tmp_path, tiny_llama, data))
    summary = train_run(run, progress=False)
    assert summary["stages_trained"] == 3
    for b in summary["blocks"]:  # train() by phase (benchmarks/train_cache.py reports it): measured, within train()
        assert b["forward_s"] > 0 and b["backward_s"] > 0 and b["optimizer_s"] > 0, b
        assert b["forward_s"] + b["backward_s"] + b["optimizer_s"] <= b["seconds"] + 0.01, b
    seq = tuple(run.sequences[0])
    tr = StageTrainer(run)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    logits = {}
    for depth in (1, 2, 3):
        path = run.store.materialise(f"pfx{depth}", 0, seq[:depth], base_model=run.model_path, lora=run.lora_dict())
        cfg = json.loads((path / "adapter_config.json").read_text())
        assert sorted(cfg["layers_to_transform"]) == sorted(i for b in run.blocks[:depth] for i in b)
        tr.set_stack(0, seq[:depth], fresh_top=False)
        tr.model.eval()
        with torch.no_grad():
            mem = tr.model(input_ids=ids).logits
            base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
            disk = PeftModel.from_pretrained(base, str(path)).eval()(input_ids=ids).logits
        assert torch.allclose(mem, disk, atol=1e-5, rtol=0), float((mem - disk).abs().max())
        logits[depth] = disk
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)(input_ids=ids).logits
    # Each block does something: the prefixes differ from each other and from the base.
    assert float((logits[1] - plain).abs().max()) > 1e-4
    assert float((logits[2] - logits[1]).abs().max()) > 1e-4
    assert float((logits[3] - logits[2]).abs().max()) > 1e-4


def test_prefix_blocks_never_depend_on_later_slices(tmp_path, tiny_llama, alpaca_sample, write_records):
    recs = alpaca_sample[:36]
    run_a = Run.create(make_cfg(tmp_path, tiny_llama, write_records(recs, "a.json"), name="a"))
    seq = tuple(run_a.sequences[0])
    with run_a.ledger() as led:
        last_ids = [sid for sid, _ in led.slice_samples(DATASET, 0, seq[2])]
    assert len(last_ids) == 12
    # b: the last slice's records are changed (same ids, so every cell stays put).
    changed = [dict(r, output="EDITED: " + r["output"]) if r["id"] in last_ids else r for r in recs]
    run_b = Run.create(make_cfg(tmp_path, tiny_llama, write_records(changed, "b.json"), name="b"))
    # c: half of the last slice's samples are deleted before training.
    run_c = Run.create(make_cfg(tmp_path, tiny_llama, write_records(recs, "c.json"), name="c"))
    with run_c.ledger() as led:
        led.journal_deletion(DATASET, last_ids[:6])
    for r in (run_a, run_b, run_c):
        assert r.sequences[0] == list(seq)
        train_run(r, progress=False)
    for depth in (1, 2):
        assert block_sha(run_a, seq[:depth]) == block_sha(run_b, seq[:depth]) == block_sha(run_c, seq[:depth])
    assert block_sha(run_a, seq) != block_sha(run_b, seq)
    assert block_sha(run_a, seq) != block_sha(run_c, seq)
    assert run_c.store.manifest(0, seq)["n_samples"] == 30


def test_deletion_invalidates_exactly_the_blocks_after_the_slice(tmp_path, tiny_llama, alpaca_sample, write_records):
    run = Run.create(make_cfg(tmp_path, tiny_llama, write_records(alpaca_sample[:36]), extra=["s3t.budget=3"]))
    train_run(run, progress=False)
    assert run.best_prefixes()[0][1] == 3
    seq0 = tuple(run.sequences[0])
    with run.ledger() as led:
        victim = led.slice_samples(DATASET, 0, seq0[1])[0][0]
        led.journal_deletion(DATASET, [victim])
    hashes = run.slice_hashes()
    for seq in run.sequences:
        pos = seq.index(seq0[1])
        for k in range(1, 4):
            assert run.block_is_valid(0, tuple(seq[:k]), hashes) == (k <= pos)
    qi, depth = run.best_prefixes()[0]
    assert depth == 2 and seq0[1] not in run.sequences[qi][:depth]
    # Retraining rebuilds only the invalid blocks, on data without the deleted sample.
    summary = train_run(run, progress=False)
    # Exactly the blocks at or after the hit slice in each sequence: 2 + 3 + 1 of the 9.
    assert summary["stages_trained"] == sum(3 - seq.index(seq0[1]) for seq in run.sequences) == 6
    assert run.best_prefixes()[0][1] == 3
    for s, p in run.store.blocks():
        man = run.store.manifest(s, p)
        if seq0[1] in p:
            assert man["n_samples"] == 12 * len(p) - 1


def test_eight_bit_training_through_trl(tmp_path, tiny_llama, alpaca_sample, write_records):
    bnb = pytest.importorskip("bitsandbytes")
    run = Run.create(make_cfg(tmp_path, tiny_llama, write_records(alpaca_sample[:24]),
                              extra=["model.precision=8bit", "s3t.slices=2"]))
    tr = StageTrainer(run)
    n8 = sum(isinstance(m, bnb.nn.Linear8bitLt) for m in tr.model.modules())
    assert n8 >= 4 * 7  # every projection of every layer is int8
    before = {n: p.detach().clone() for n, p in tr.block_params[1]}
    man = tr.train_stage(0, tuple(run.sequences[0][:1]))
    assert man["precision"] == "8bit" and man["n_samples"] == 12 and man["train_loss"] > 0
    assert man["steps"] == -(-man["n_used"] // 4) >= 2
    assert all(not torch.equal(before[n], p) for n, p in tr.block_params[1] if "lora_B" in n)


def test_killed_run_resumes_and_matches_an_uninterrupted_one(tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:36])
    common = ["train.epochs=4"]
    ref = Run.create(make_cfg(tmp_path, tiny_llama, data, name="ref", extra=common))
    train_run(ref, progress=False)
    cfg = make_cfg(tmp_path, tiny_llama, data, name="killed", extra=common)
    Run.create(cfg)
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    proc = subprocess.Popen([sys.executable, "-m", "s3t_llm.cli", "train", str(recipe), "--no-export"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    first = cfg.run_dir / "blocks" / "shard0" / f"p{ref.sequences[0][0]}" / "manifest.json"
    deadline = time.time() + 120
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the training subprocess never finished its first stage"
    run = Run.open(cfg.run_dir)
    # A partial artifact as a kill would leave it: never mistaken for a finished block.
    junk = run.store.blocks_dir / "shard0" / ".staging-p9-deadbeef"
    junk.mkdir(parents=True, exist_ok=True)
    (junk / "adapter_block.safetensors").write_bytes(b"partial")
    n_before = len(run.store.blocks())
    assert 1 <= n_before < 3
    summary = train_run(run, progress=False)
    assert summary["stages_reused"] == n_before and summary["stages_trained"] == 3 - n_before
    assert not junk.exists()
    seq = ref.sequences[0]
    for k in (1, 2, 3):
        assert block_sha(run, seq[:k]) == block_sha(ref, seq[:k])


def test_bad_inputs_fail_before_training(tmp_path, tiny_llama, alpaca_sample, write_records):
    from transformers import GPT2Config, GPT2LMHeadModel

    from s3t_llm.models import ModelError
    from s3t_llm.records import RecordError

    data = write_records(alpaca_sample[:36])
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)).save_pretrained(gpt2)
    with pytest.raises(ModelError, match="not Llama-architecture"):
        Run.create(make_cfg(tmp_path, gpt2, data, name="g"))
    with pytest.raises(ConfigError, match="s3t.slices=5 is larger than the 4 LoRA layers"):
        Run.create(make_cfg(tmp_path, tiny_llama, data, name="l", extra=["s3t.slices=5"]))
    bad = write_records([{"instruction": "x"}], "bad.json")
    with pytest.raises(RecordError, match="output"):
        Run.create(make_cfg(tmp_path, tiny_llama, bad, name="r"))
    with pytest.raises(ConfigError, match=r"train.epochs='three': expected a number"):
        make_cfg(tmp_path, tiny_llama, data, extra=["train.epochs=three"])
    with pytest.raises(ConfigError, match="unknown field"):
        make_cfg(tmp_path, tiny_llama, data, extra=["train.epoch=3"])
    assert not (tmp_path / "runs" / "g").exists() and not (tmp_path / "runs" / "l" / "run.json").exists()
    assert not (tmp_path / "runs" / "r" / "run.json").exists()


def test_pretokenised_stages_equal_trls_own_preparation_and_tokenise_once(tmp_path, tiny_llama, alpaca_sample,
                                                                          write_records, monkeypatch):
    from trl import SFTTrainer

    data = write_records(alpaca_sample[:24])
    extra = ["train.logging_steps=1", "s3t.budget=2"]
    legacy = Run.create(make_cfg(tmp_path, tiny_llama, data, name="legacy", extra=extra))
    pretok = Run.create(make_cfg(tmp_path, tiny_llama, data, name="pretok", extra=extra))
    rows = []
    orig = SFTTrainer._prepare_dataset

    def counting(self, dataset, *a, **kw):
        rows.append(len(dataset))
        return orig(self, dataset, *a, **kw)

    monkeypatch.setattr(SFTTrainer, "_prepare_dataset", counting)
    out = {}
    for run, pre in ((legacy, False), (pretok, True)):
        tr = StageTrainer(run)
        tr.pretokenize = pre
        rows.clear()
        res = []
        # Stages (a), (a, b) of sequence 0 and (b) of sequence 1: slices a and b are each used twice.
        for prefix in (run.sequences[0][:1], run.sequences[0][:2], run.sequences[1][:1]):
            man = tr.train_stage(0, tuple(prefix))
            res.append((man["sha256"], [x["loss"] for x in tr.last_fit["log"] if "loss" in x]))
        out[pre] = (res, list(rows))
    # The same blocks, bit for bit, and the same loss at every logged step.
    assert [r[0] for r in out[True][0]] == [r[0] for r in out[False][0]]
    assert [r[1] for r in out[True][0]] == [r[1] for r in out[False][0]]
    assert sum(len(r[1]) for r in out[True][0]) == 2 + 4 + 2
    # TRL's preparation ran on 8 + 16 + 8 rows per stage before; now each of the 16 samples once (8 new, 8 new).
    assert out[False][1] == [8, 16, 8]
    assert out[True][1] == [8, 8]


def test_tokenise_once_matches_trl_for_the_chat_template(tmp_path, tiny_llama, alpaca_sample, write_records):
    from datasets import Dataset
    from trl import SFTTrainer

    from s3t_llm.prompts import to_example

    run = Run.create(make_cfg(tmp_path, tiny_llama, write_records(alpaca_sample[:24]), name="chat",
                              extra=["data.template=chat"]))
    tr = StageTrainer(run)
    tr.tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>"
                                  "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    examples = [to_example(r, "chat", tr.tokenizer) for r in alpaca_sample[:12]]
    mine = tr.tokenize(examples)
    trainer = SFTTrainer(model=tr.model, args=tr._sft_args(tmp_path / "o", 0), train_dataset=Dataset.from_list(examples),
                         processing_class=tr.tokenizer)
    theirs = [(list(r["input_ids"]), list(r["labels"])) for r in trainer.train_dataset]
    assert [m for m in mine if m is not None] == theirs and len(theirs) >= 10
    assert any(l == -100 for _, lab in theirs for l in lab) and any(l != -100 for _, lab in theirs for l in lab)


def test_optimizer_and_clipping_reach_the_trainer_and_paper_recipes_match_the_reference(tmp_path, tiny_llama,
                                                                                        alpaca_sample, write_records):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for name in ("llama2_7b_alpaca", "llama2_13b_alpaca", "llama3_8b_alpaca"):
        t = load_config(root / "recipes" / f"{name}.yaml").train
        assert (t.learning_rate, t.optim, t.weight_decay, t.max_grad_norm, t.lr_scheduler, t.warmup_ratio,
                t.epochs) == (2e-5, "paged_adamw_32bit", 0.001, 0.3, "linear", 0.03, 3.0), name
    # Defaults = what transformers chose before these fields existed (no change for existing runs).
    d = load_config(None).train
    assert (d.optim, d.max_grad_norm, d.cache_activations) == ("adamw_torch_fused", 1.0, False)
    run = Run.create(make_cfg(tmp_path, tiny_llama, write_records(alpaca_sample[:12]), name="opt", extra=[
        "s3t.slices=1", "train.optim=sgd", "train.max_grad_norm=0.3", "train.weight_decay=0.001",
        "train.lr_scheduler=linear", "train.warmup_ratio=0.03"]))
    args = StageTrainer(run)._sft_args(tmp_path / "o", 0)
    assert (args.optim, args.max_grad_norm, args.weight_decay, args.lr_scheduler_type, args.warmup_steps) == \
        ("sgd", 0.3, 0.001, "linear", 0.03)
    with pytest.raises(ConfigError, match="train.optim='adamw_fast'"):
        make_cfg(tmp_path, tiny_llama, "x.json", extra=["train.optim=adamw_fast"])
    with pytest.raises(ConfigError, match="train.max_grad_norm=-1.0"):
        make_cfg(tmp_path, tiny_llama, "x.json", extra=["train.max_grad_norm=-1"])
    if not torch.cuda.is_available():
        paged = Run.create(make_cfg(tmp_path, tiny_llama, write_records(alpaca_sample[:12]), name="paged",
                                    extra=["s3t.slices=1", "train.optim=paged_adamw_32bit"]))
        with pytest.raises(RuntimeError, match="needs CUDA"):
            StageTrainer(paged)


def test_the_recipes_ray_section_is_checked_and_the_command_line_wins():
    from s3t_llm.config import ConfigError, load_config
    from s3t_llm.distributed import ray_options

    RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes")

    cfg = load_config(RECIPES + "/cpu_smollm2.yaml", ["ray.threads=2", "ray.workers=3", "ray.address=auto"])
    assert ray_options(cfg.ray) == {"address": "auto", "threads": 2, "workers": 3, "gpus_per_stage": None,
                                    "max_retries": 3, "resubmits": 2}
    got = ray_options(cfg.ray, address="10.1.2.3:6379", threads=1)
    assert (got["address"], got["threads"], got["workers"]) == ("10.1.2.3:6379", 1, 3)
    assert load_config(RECIPES + "/llama3_8b_alpaca.yaml").ray.gpus_per_stage == 1.0
    for bad, msg in (("ray.threads=0", "ray.threads=0: must be >= 1"), ("ray.address=nowhere", "ray.address"),
                     ("ray.gpus_per_stage=-1", "ray.gpus_per_stage"), ("ray.max_retries=-1", "ray.max_retries"),
                     ("ray.fast=true", "unknown field(s) ray.fast")):
        with pytest.raises(ConfigError, match=re.escape(msg)):
            load_config(RECIPES + "/cpu_smollm2.yaml", [bad])
    with pytest.raises(ValueError, match="--ray-workers=0"):
        ray_options(cfg.ray, workers=0)


def test_the_compact_lm_head_gives_trls_own_cpu_loss_and_gradients_bit_for_bit(tiny_llama):
    """training._compact_lm_head makes TRL's fused LM head project only the labelled positions on CPU: the loss
    and the gradients into the inputs must be exactly those of TRL's own every-position CPU path."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    from s3t_llm import training

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "is_top1"))
    for q in m.parameters():
        q.requires_grad_(False)
    ids = torch.randint(0, m.config.vocab_size, (3, 40))
    lab = ids.clone()
    lab[:, :15] = -100
    lab[1:, 30:] = -100
    got = {}
    calls = []
    import trl.trainer.utils as tu

    orig = tu._use_triton
    for mode in (False, True):
        training.COMPACT_LM_HEAD = mode
        try:
            with training._compact_lm_head():
                calls.append(tu._use_triton(torch.device("cpu")))
                x = m.get_input_embeddings()(ids).detach().requires_grad_(True)
                out = m(inputs_embeds=x, labels=lab, fused_lm_head=True)
                out.loss.backward()
                got[mode] = (out.loss.detach(), x.grad.clone())
        finally:
            training.COMPACT_LM_HEAD = True
    assert calls == [False, True] and tu._use_triton is orig   # the switch took effect, and was undone
    assert torch.equal(got[False][0], got[True][0]) and torch.equal(got[False][1], got[True][1])
    assert got[True][1].abs().sum() > 0
