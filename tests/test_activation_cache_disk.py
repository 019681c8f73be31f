"""The activation cache's disk tier: the same bits as memory, in the trainer's scratch under the run, and erased
like any other artifact (a deletion destroys the deleted slice's groups and every group computed through a block
that is no longer valid; `s3t verify` fails on a stale group or a dead trainer's cache)."""

import os
import stat
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from s3t_llm.activation_cache import MissingEntry, stale_groups, token_key  # noqa: E402
from s3t_llm.deletion import apply_deletion  # noqa: E402
from s3t_llm.prompts import to_example  # noqa: E402
from s3t_llm.run import DATASET, Run, StaleStageError  # noqa: E402
from s3t_llm.training import StageTrainer  # noqa: E402
from s3t_llm.verify import verify_run  # noqa: E402
from tests.test_activation_cache import bottom_up_cfg, train_stages  # noqa: E402

# Bottom-up, 4 layers, LoRA on the top 3: blocks [[1], [2], [3]], so the three stages of a sequence cache at layers
# 1 (base below), 2 (through block 1) and 3 (through blocks 1-2). 24 samples in 3 slices of 8; an entry is
# ~100 tokens x hidden 64 x 4 bytes (~25 KiB): 60 KiB of memory holds two, the rest spills.
MEMORY = ["train.cache_activations=true", "lora.dropout=0.0"]
SPILL = MEMORY + ["train.activation_cache_gb=0.000056", "train.activation_cache_disk_gb=0.05"]


def groups_of(run):
    return sorted(p.name for p in Path(run.dir).glob(".trainer-*/act/*"))


def test_disk_tier_gives_the_same_blocks_as_memory_and_lives_in_a_private_scratch_under_the_run(
        tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    mem = Run.create(bottom_up_cfg(tmp_path, tiny_llama, data, "dmem", MEMORY))
    disk = Run.create(bottom_up_cfg(tmp_path, tiny_llama, data, "ddisk", SPILL))
    tr_mem, _, mans_mem, _ = train_stages(mem, 3)
    tr, _, mans_disk, _ = train_stages(disk, 3)
    c = tr.act_cache
    assert [m["activation_cache_layer"] for m in mans_disk] == [1, 2, 3]
    assert c.stats["spilled"] >= 40 and c.stats["disk_reads"] > 0, c.stats
    assert c.nbytes <= c.limit_bytes and c.disk_bytes > 0 and tr_mem.act_cache.stats["spilled"] == 0
    # Same entries, same bits: the trained blocks are byte-identical to the memory-only cached run's.
    assert [m["sha256"] for m in mans_disk] == [m["sha256"] for m in mans_mem]
    d = c.disk_dir
    assert d.parent == Path(disk.dir) and d.name.startswith(f".trainer-pid{os.getpid()}-")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    seq = disk.sequences[0]
    names = groups_of(disk)
    assert {n.split("-")[0] for n in names} == {"L1", "L2", "L3"}
    assert all(n.endswith("-base") for n in names if n.startswith("L1"))
    assert all(f"-q{seq[0]}-" in n for n in names if n.startswith("L2"))
    assert all(f"-q{seq[0]}-{seq[1]}-" in n for n in names if n.startswith("L3"))
    with disk.ledger() as led:
        hashes = {(0, s): led.slice_hash(DATASET, 0, s) for s in range(3)}
    from s3t_llm import exactness

    blocks = disk.block_manifests()
    assert stale_groups(disk.dir, hashes, blocks, exactness.valid_blocks(blocks, hashes)) == []
    assert verify_run(disk.dir)["problems"] == []
    c.clear()
    assert not d.exists() and c.disk_bytes == 0 and len(c) == 0


def test_a_deletion_destroys_the_spilled_entries_of_its_slice_and_those_through_invalid_blocks(
        tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    run = Run.create(bottom_up_cfg(tmp_path, tiny_llama, data, "derase",
                                   MEMORY + ["train.activation_cache_gb=0.00000001", "train.activation_cache_disk_gb=0.05"]))
    tr, _, _, _ = train_stages(run, 3)  # a live trainer (this process) whose every entry is on disk
    a, b, c = run.sequences[0]
    assert tr.act_cache.nbytes == 0 and tr.act_cache.stats["spilled"] == len(tr.act_cache) == 8 + 16 + 24
    before = groups_of(run)
    assert len(before) == 1 + 2 + 3
    with run.ledger() as led:
        victim_id, victim = led.slice_samples(DATASET, 0, b)[0]
    ids = tr.tokenize([to_example(victim, run.config.data.template, tr.tokenizer)])[0][0]
    tk = token_key(ids)[:40]
    victim_files = [p for p in Path(run.dir).rglob(f"{tk}.safetensors")]
    assert len(victim_files) == 2  # slice b's entries at layers 2 and 3

    cert = apply_deletion(run, [victim_id])
    destroyed = [x for x in cert["destroyed"] if x["kind"] == "activation-cache"]
    # Gone: slice b's groups (its hash changed) and every group computed through block (a, b), which was trained
    # on b; kept: the base states of a, and a's states through block (a), which never saw b.
    left = groups_of(run)
    assert sorted(Path(x["path"]).name for x in destroyed) == sorted(set(before) - set(left))
    assert sorted(n.split("-")[0] + ("" if n.endswith("-base") else "q") for n in left) == ["L1", "L2q"]
    assert all(f"-x{a}-" in n for n in left)
    assert {x["problem"] for x in destroyed} == {"its slice changed", "computed through a block that is no longer valid"}
    assert not any(p.exists() for p in victim_files) and not list(Path(run.dir).rglob(f"{tk}*"))
    assert verify_run(run.dir)["problems"] == []
    # The live trainer, reading an entry the deletion destroyed, stops the stage as stale (never a silent miss).
    cell3 = next(k for k in tr.act_cache._entries if k[0] == 3)
    with pytest.raises(MissingEntry) as e:
        tr.act_cache._value(tr.act_cache._entries[cell3])
    assert isinstance(e.value, StaleStageError) and "destroyed" in str(e.value)
    # Nor does it write into a destroyed group again (its entries would be of the pre-deletion slice).
    gone_key = next(k for k in tr.act_cache._entries if k[0] == 3 and k[1][1] == b)
    with pytest.raises(MissingEntry):
        tr.act_cache._put(gone_key, torch.zeros(2, 3))
    # A group it never created, of the changed slice (a stage still running on the pre-deletion data): refused
    # from the ledger when it would be created (under the run's writer lock, which the deletion holds throughout).
    with pytest.raises(MissingEntry, match="no longer current"):
        tr.act_cache._put((1,) + gone_key[1:], torch.zeros(2, 3))
    assert sorted(groups_of(run)) == sorted(left)
    tr.clear_caches()
    assert not list(Path(run.dir).glob(".trainer-*"))


def test_verify_fails_on_a_dead_trainers_cache_and_the_next_training_removes_it(
        tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:12])
    run = Run.create(bottom_up_cfg(tmp_path, tiny_llama, data, "ddead", MEMORY))
    with run.ledger() as led:
        h = led.slice_hash(DATASET, 0, 0)
    dead = 2**22 + 12345  # above pid_max on this machine: no such process
    g = Path(run.dir) / f".trainer-pid{dead}-abcdefgh" / "act" / f"L1-s0-x0-{h}-base"
    g.mkdir(parents=True)
    (g / "x.safetensors").write_bytes(b"derived from samples")
    problems = verify_run(run.dir)["problems"]
    assert any("activation cache of a dead trainer" in p for p in problems), problems
    stale = g.parent / "L1-s0-x0-0000-base"
    stale.mkdir()
    problems = verify_run(run.dir)["problems"]
    assert any("L1-s0-x0-0000-base" in p and "its slice changed" in p for p in problems), problems
    assert run.store.clean_staging() >= 1
    assert not g.parent.parent.exists() and verify_run(run.dir)["problems"] == []
    # A fresh trainer works as before.
    assert isinstance(StageTrainer(run).act_cache.capacity, int)
