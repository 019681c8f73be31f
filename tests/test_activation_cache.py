"""The activation cache (s3t_llm/activation_cache.py) on a tiny random Llama: the same losses and blocks as the
uncached path, filled per (shard, slice) cell in the cell's canonical batches (the same bits whichever stage fills
them, and nothing outside the cell changes them), bounded, dropped on deletion and when training returns."""

import pytest

torch = pytest.importorskip("torch")

from s3t_llm.activation_cache import (ActivationCache, base_boundary, block_digest, boundary,  # noqa: E402
                                      highest_boundary, lower_blocks, token_key)
from s3t_llm.config import ConfigError, load_config  # noqa: E402
from s3t_llm.run import DATASET, Run, split_blocks  # noqa: E402
from s3t_llm.training import StageTrainer, train_run  # noqa: E402

# Losses: the cached path starts the upper layers from per-sample states that differ from the in-batch ones by
# float rounding only (~1e-7 relative in fp32), so the losses agree to that order; 1e-5 is the bound.
LOSS_RTOL = 1e-5
# Blocks: a few Adam steps carry that rounding into the LoRA tensors. Adam normalises the gradient: where a
# gradient entry is itself near rounding level (m/sqrt(v) near 0/0 in the first steps), a ~1e-7 relative change
# can move that entry by a sizeable fraction of lr, so single entries are not a fair measure; per tensor, the
# relative difference in norm stays orders below the change training makes. Bound: 1e-4 in norm, the size
# of `s3t verify --replay`'s cross-environment tolerance (REPLAY_TOLERANCE = 1e-4).
BLOCK_RTOL = 1e-4


def make_cfg(tmp_path, model_dir, data_path, name, extra=()):
    # 4 layers, LoRA on the top 3, 3 slices: blocks [[3], [2], [1]]; layer 0 is always the frozen base, so every
    # stage has a boundary (3, 2, 1).
    return load_config(None, [
        f"name={name}", f"output_dir={tmp_path / 'runs'}", f"model.name={model_dir}", f"data.path={data_path}",
        "data.max_length=160", "data.heldout=0", "s3t.shards=1", "s3t.slices=3", "s3t.budget=1", "lora.layers=3",
        "train.batch_size=4", "train.learning_rate=0.001", "train.logging_steps=1", *extra,
    ])


def losses(log):
    return [x["loss"] for x in log if "loss" in x]


def train_stages(run, depth, **attrs):
    tr = StageTrainer(run)
    for k, v in attrs.items():
        setattr(tr, k, v)
    seq = tuple(run.sequences[0])
    logs, mans = [], []
    for k in range(1, depth + 1):
        mans.append(tr.train_stage(0, seq[:k]))
        logs.append(losses(tr.last_fit["log"]))
    blocks = {b: {n: p.detach().clone() for n, p in tr.block_params[b]} for b in tr.block_params}
    return tr, logs, mans, blocks


def assert_close_losses(a, b):
    assert [len(x) for x in a] == [len(x) for x in b] and sum(len(x) for x in a) >= 6
    rel = max(abs(x - y) / abs(x) for xa, xb in zip(a, b) for x, y in zip(xa, xb))
    assert rel <= LOSS_RTOL, rel
    return rel


def block_rel(a, b):
    """Largest per-tensor relative difference in norm, ||a - b|| / ||b||."""
    return max(float((a[n] - b[n]).norm() / (b[n].norm() + 1e-12)) for n in b)


def test_boundary_is_block_ks_bottom_and_the_trained_blocks_below_it_key_the_entries():
    top_down = [[26, 27, 28, 29], [22, 23, 24, 25], [18, 19, 20, 21]]
    assert split_blocks(list(range(18, 30)), 3) == top_down
    assert [boundary(top_down, k) for k in (1, 2, 3)] == [26, 22, 18]
    assert [base_boundary(top_down, k) for k in (1, 2, 3)] == [26, 22, 18]  # only zero blocks below
    assert [lower_blocks(top_down, k) for k in (1, 2, 3)] == [[], [], []]
    all_layers = [[2, 3], [1], [0]]
    assert [boundary(all_layers, k) for k in (1, 2, 3)] == [2, 1, None]  # block 3 starts at layer 0: no saving
    # Bottom-up: block 1 nearest the input; the frozen blocks 1..k-1 lie below block k (the uneven layer goes
    # to block 1, as top-down).
    bottom_up = split_blocks(list(range(5)), 3, "bottom_up")
    assert bottom_up == [[0, 1], [2, 3], [4]] and split_blocks(list(range(5)), 3) == [[3, 4], [1, 2], [0]]
    assert [boundary(bottom_up, k) for k in (1, 2, 3)] == [None, 2, 4]
    assert [lower_blocks(bottom_up, k) for k in (1, 2, 3)] == [[], [1], [1, 2]]
    assert [base_boundary(bottom_up, k) for k in (1, 2, 3)] == [None, None, None]
    with pytest.raises(ConfigError, match="block_order"):
        split_blocks(list(range(5)), 3, "sideways")


def test_highest_boundary_is_the_top_stage_a_slice_enters_the_plan_at():
    blocks = [[3], [2], [1]]
    seqs = [[0, 1, 2], [1, 2, 0]]
    assert [highest_boundary(blocks, seqs, s) for s in (0, 1, 2)] == [3, 3, 2]
    assert highest_boundary(blocks, [[0, 1, 2]], 2) == 1 and highest_boundary(blocks, [[0, 1, 2]], 2, 3) == 3


def test_canonical_batches_are_the_cells_rows_in_order_without_duplicates():
    rows = [[1, 2], [3], [1, 2], [4, 5, 6], [7], [8]]
    bs = ActivationCache.canonical_batches(rows, 2)
    assert [[ids for _, ids in b] for b in bs] == [[[1, 2], [3]], [[4, 5, 6], [7]], [[8]]]


def test_cache_is_bounded_and_evicts_only_entries_the_stage_does_not_need():
    c = ActivationCache("fp", limit_bytes=10 * 4 * 4)  # ten tokens of a 4-wide fp32 state
    t = torch.ones(3, 4)
    for i in range(3):
        c._put((1, f"k{i}"), t)
    assert len(c) == 3 and c.nbytes == 3 * 48
    c.clear()
    assert len(c) == 0 and c.nbytes == 0
    assert token_key([1, 2, 3]) == token_key(torch.tensor([1, 2, 3]).tolist()) != token_key([1, 2, 4])


def test_cached_stages_match_uncached_losses_and_blocks(tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    ref = Run.create(make_cfg(tmp_path, tiny_llama, data, "ref", ["lora.dropout=0.0"]))
    on = Run.create(make_cfg(tmp_path, tiny_llama, data, "cache-on", ["lora.dropout=0.0",
                                                                      "train.cache_activations=true"]))
    _, logs_ref, mans_ref, blocks_ref = train_stages(ref, 3)
    tr, logs_on, mans_on, blocks_on = train_stages(on, 3)
    rel = assert_close_losses(logs_ref, logs_on)
    assert [m["activation_cache_layer"] for m in mans_on] == [3, 2, 1]
    assert [m["activation_cache_layer"] for m in mans_ref] == [None, None, None]
    for b in (1, 2, 3):
        assert block_rel(blocks_on[b], blocks_ref[b]) <= BLOCK_RTOL
        assert float(sum(p.abs().sum() for p in blocks_on[b].values())) > 0  # every block trained
    # Fills: each of the 24 samples is forwarded once, in its slice's batches of train.batch_size=4 (2 a slice);
    # the lower boundaries are captured on the way, so the stages at layers 2 and 1 find their first slices'
    # states already there.
    st = tr.act_cache.stats
    u = [m["n_used"] for m in mans_on]
    assert u == [8, 16, 24]
    assert st["fills"] == 24 and st["hits"] == 8 + 16 and st["fill_batches"] == 6
    assert len(tr.act_cache) == 8 * 3 + 8 * 2 + 8 * 1
    # Hits and fills give the same bits: a fresh trainer (empty cache) retrains stage 2 to the same digest.
    cold = StageTrainer(on)
    assert cold.train_stage(0, tuple(on.sequences[0][:2]))["sha256"] == mans_on[1]["sha256"]
    print(f"max loss rel diff {rel:.2e}; block rel diff (norm) "
          f"{max(block_rel(blocks_on[b], blocks_ref[b]) for b in (1, 2, 3)):.2e}; blocks bit-identical: "
          f"{[torch.equal(blocks_on[b][n], blocks_ref[b][n]) for b in (1, 2, 3) for n in blocks_ref[b]].count(True)}"
          f"/{sum(len(v) for v in blocks_ref.values())} tensors")


def test_cached_path_with_dropout_and_gradient_checkpointing_uses_the_same_random_stream(
        tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    extra = ["lora.dropout=0.1", "train.gradient_checkpointing=true"]
    ref = Run.create(make_cfg(tmp_path, tiny_llama, data, "dref", extra))
    on = Run.create(make_cfg(tmp_path, tiny_llama, data, "don", [*extra, "train.cache_activations=true"]))
    _, logs_ref, _, blocks_ref = train_stages(ref, 2)
    _, logs_on, mans_on, blocks_on = train_stages(on, 2)
    assert [m["activation_cache_layer"] for m in mans_on] == [3, 2]
    assert_close_losses(logs_ref, logs_on)
    for b in (1, 2):
        assert block_rel(blocks_on[b], blocks_ref[b]) <= BLOCK_RTOL
    # Control: with dropout the losses do depend on the random stream (another seed moves them by far more).
    other = Run.create(make_cfg(tmp_path, tiny_llama, data, "dseed", [*extra, "train.seed=7"]))
    _, logs_other, _, _ = train_stages(other, 1)
    assert max(abs(x - y) / abs(x) for x, y in zip(logs_ref[0], logs_other[0])) > 100 * LOSS_RTOL


def test_a_stage_over_the_memory_limit_runs_uncached_bit_for_bit(tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    ref = Run.create(make_cfg(tmp_path, tiny_llama, data, "lref", ["s3t.slices=2", "lora.layers=2"]))
    tiny = Run.create(make_cfg(tmp_path, tiny_llama, data, "ltiny", ["s3t.slices=2", "lora.layers=2",
                                                                     "train.cache_activations=true",
                                                                     "train.activation_cache_gb=0.000001"]))
    _, _, mans_ref, _ = train_stages(ref, 1)
    tr, _, mans_tiny, _ = train_stages(tiny, 1)
    assert mans_tiny[0]["activation_cache_layer"] is None and len(tr.act_cache) == 0
    assert tr.act_cache.stats["stages_over_limit"] == 1
    assert mans_tiny[0]["sha256"] == mans_ref[0]["sha256"]


def test_train_run_drops_cached_states_when_a_deletion_lands_and_when_it_returns(
        tmp_path, tiny_llama, alpaca_sample, write_records, monkeypatch):
    data = write_records(alpaca_sample[:24])
    # Blocks [[3], [2]]; two sequences [a, b], [b, a]: stages (a), (a, b), (b), (b, a).
    run = Run.create(make_cfg(tmp_path, tiny_llama, data, "del", ["s3t.slices=2", "s3t.budget=2", "lora.layers=2",
                                                                  "train.cache_activations=true"]))
    a, b = run.sequences[0]
    assert run.sequences[1] == [b, a]
    with run.ledger() as led:
        victim_id, victim = led.slice_samples(DATASET, 0, a)[0]
    seen = {"calls": 0, "victim_entries": [], "victim_tokens": [], "entries": []}
    orig_stage, orig_clear = StageTrainer.train_stage, StageTrainer.clear_caches

    def stage(self, shard, prefix, **kw):
        man = orig_stage(self, shard, prefix, **kw)
        seen["trainer"] = self
        seen["calls"] += 1
        from s3t_llm.prompts import to_example

        ex = to_example(victim, run.config.data.template, self.tokenizer)
        seen["victim_tokens"].append(self._example_key(ex) in self._tokens)
        if "ids" not in seen:  # stage (a) tokenised the victim: this is a cache lookup, it adds nothing
            seen["ids"] = self.tokenize([ex])[0][0]
        key = token_key(seen["ids"])
        seen["victim_entries"].append(sum(1 for k in self.act_cache._entries if k[2] == key))
        seen["entries"].append(len(self.act_cache))
        if seen["calls"] == 2:  # a deletion lands after stage (a, b)
            with run.ledger() as led:
                led.journal_deletion(DATASET, [victim_id])
        return man

    def clear(self):
        seen.setdefault("clears", []).append(len(self.act_cache))
        orig_clear(self)

    monkeypatch.setattr(StageTrainer, "train_stage", stage)
    monkeypatch.setattr(StageTrainer, "clear_caches", clear)
    summary = train_run(run, progress=False)
    assert summary["stages_trained"] == 4
    # Before the deletion the victim has token ids and states at layers 3 and 2; after it, nothing.
    assert seen["victim_entries"] == [2, 2, 0, 0]
    assert seen["victim_tokens"] == [True, True, False, False]
    # (a): 12 samples at layers 3 + 2; (a, b): b's 12 at 2, and at 3 on the way (stage (b) of the second
    # sequence needs them there: each slice is forwarded once, up to the highest boundary the plan needs it at);
    # cleared; (b): 12 at 3 + 2; (b, a): a's 11 left at 2 + 3.
    assert seen["entries"] == [24, 48, 24, 46]
    assert seen["clears"] == [48, 46]  # when the deletion was seen, and when train_run returned
    assert len(seen["trainer"].act_cache) == 0 and not seen["trainer"]._tokens
    assert run.store.manifest(0, (b, a))["n_samples"] == 23


def slice_entries(tr, shard, sl):
    """{(layer, token key): tensor} of one slice's entries in a trainer's cache (any content hash)."""
    return {(k[0], k[2]): v for k, v in tr.act_cache._entries.items() if k[1][:2] == (shard, sl)}


def test_a_slices_entries_are_the_same_bits_whichever_stage_or_prefix_fills_them_first(
        tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    run = Run.create(make_cfg(tmp_path, tiny_llama, data, "order", ["train.cache_activations=true",
                                                                    "train.max_steps=1"]))
    a, b, c = run.sequences[0]
    # X: stage (a) then (a, b): b's entries are filled by the second stage, at its boundary (2) and below.
    x = StageTrainer(run)
    x.train_stage(0, (a,))
    x.train_stage(0, (a, b))
    # Y: a fresh trainer whose first stage is (b): b is filled at layer 3, with 2 and 1 captured on the way.
    y = StageTrainer(run)
    y.train_stage(0, (b,))
    # Z: the cache's own entry point, b's cell alone then a's, at layer 1 only (the shallowest forward).
    z = StageTrainer(run)
    examples, hashes, _, counts = z.stage_examples(0, (b, a), by_slice=True)
    toks, i, groups = z.tokenize(examples), 0, []
    for sl, n in counts:
        groups.append(((0, sl, hashes[str(sl)]), [t[0] for t in toks[i:i + n] if t is not None]))
        i += n
    assert z.act_cache.prepare(z.model, 1, groups, batch_size=run.config.train.batch_size,
                               pad_id=z.tokenizer.pad_token_id)
    ex, ey, ez = (slice_entries(t, 0, b) for t in (x, y, z))
    assert {li for li, _ in ex} == {2, 1} and {li for li, _ in ey} == {3, 2, 1} and {li for li, _ in ez} == {1}
    assert len(ex) == 2 * 8 and len(ey) == 3 * 8
    for key, h in ex.items():
        assert torch.equal(h, ey[key]), key
    for key, h in ez.items():
        assert torch.equal(h, ex[key]) and torch.equal(h, ey[key]), key
    ea = slice_entries(z, 0, a)
    for key, h in ea.items():
        assert torch.equal(h, slice_entries(x, 0, a)[key]), key


def test_a_slices_entries_depend_on_nothing_outside_the_slice(tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    extra = ["train.cache_activations=true", "train.max_steps=1"]
    one = Run.create(make_cfg(tmp_path, tiny_llama, data, "same", extra))
    two = Run.create(make_cfg(tmp_path, tiny_llama, data, "other-changed", extra))
    a, b, _ = two.sequences[0]
    with two.ledger() as led:  # in run two, a sample of slice b is deleted before anything trains
        led.journal_deletion(DATASET, [led.slice_samples(DATASET, 0, b)[1][0]])
    assert one.slice_hashes()[(0, a)] == two.slice_hashes()[(0, a)]
    assert one.slice_hashes()[(0, b)] != two.slice_hashes()[(0, b)]
    res = {}
    for name, run in (("one", one), ("two", two)):
        tr = StageTrainer(run)
        mans = [tr.train_stage(0, (a,)), tr.train_stage(0, (a, b))]
        res[name] = (tr, mans)
    (t1, m1), (t2, m2) = res["one"], res["two"]
    e1, e2 = slice_entries(t1, 0, a), slice_entries(t2, 0, a)
    assert set(e1) == set(e2) and len(e1) == 3 * 8
    for key in e1:
        assert torch.equal(e1[key], e2[key]), key
    # Stage (a) does not see slice b at all: the same block, bit for bit. Slice b's own entries: one fewer.
    assert m1[0]["sha256"] == m2[0]["sha256"]
    assert len(slice_entries(t1, 0, b)) == 2 * 8 and len(slice_entries(t2, 0, b)) == 2 * 7


def bottom_up_cfg(tmp_path, model_dir, data_path, name, extra=()):
    # 4 layers, LoRA on the top 3, bottom-up: blocks [[1], [2], [3]]; boundaries 1 (base below), 2 (block 1
    # below), 3 (blocks 1, 2 below).
    return make_cfg(tmp_path, model_dir, data_path, name, ["s3t.block_order=bottom_up", *extra])


def test_bottom_up_cached_stages_match_uncached_and_entries_are_keyed_by_the_blocks_below(
        tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    ref = Run.create(bottom_up_cfg(tmp_path, tiny_llama, data, "bu-ref", ["lora.dropout=0.0"]))
    on = Run.create(bottom_up_cfg(tmp_path, tiny_llama, data, "bu-on", ["lora.dropout=0.0",
                                                                        "train.cache_activations=true"]))
    assert on.blocks == [[1], [2], [3]] and on.block_order == "bottom_up"
    _, logs_ref, mans_ref, blocks_ref = train_stages(ref, 3)
    tr, logs_on, mans_on, blocks_on = train_stages(on, 3)
    rel = assert_close_losses(logs_ref, logs_on)
    assert [m["activation_cache_layer"] for m in mans_on] == [1, 2, 3]
    for b in (1, 2, 3):
        assert block_rel(blocks_on[b], blocks_ref[b]) <= BLOCK_RTOL
        assert float(sum(p.abs().sum() for p in blocks_on[b].values())) > 0
    # Entries: stage 1 at layer 1 (base below: a 3-part cell), stage 2 at layer 2 under block 1's digest,
    # stage 3 at layer 3 under blocks 1-2's digest; nothing is shared across stages (each has other blocks below).
    cells = {}
    for (layer, cell, _) in tr.act_cache._entries:
        cells.setdefault(layer, set()).add(cell[3] if len(cell) == 4 else "base")
    d1, d12 = block_digest(tr.block_params, [1]), block_digest(tr.block_params, [1, 2])
    assert cells == {1: {"base"}, 2: {d1}, 3: {d12}} and len({d1, d12, "base"}) == 3
    assert tr.act_cache.stats["fills"] == 8 + 16 + 24 and len(tr.act_cache) == 48
    # An entry at layer 2 is the state entering layer 2 of base + block 1 (computed here by a full forward in
    # eval mode), and not the base's: the key's digest is what makes it answer only while block 1 is loaded.
    seq = tuple(on.sequences[0])
    examples, hashes, _, counts = tr.stage_examples(0, seq[:2], by_slice=True)
    ids = tr.tokenize(examples[:1])[0][0]
    entry = tr.act_cache.entry(2, (0, seq[0], hashes[str(seq[0])], d1), ids)
    tr.set_stack(0, seq[:2], fresh_top=True)
    assert block_digest(tr.block_params, [1]) == d1

    def state_at_2():
        from s3t_llm.activation_cache import _decoder

        inner, box = _decoder(tr.model), {}

        def grab(mod, args, kwargs):
            box["h"] = args[0] if args else kwargs["hidden_states"]

        h = inner.layers[2].register_forward_pre_hook(grab, with_kwargs=True)
        tr.model.eval()
        with torch.no_grad():
            inner(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        h.remove()
        return box["h"][0]

    with_block1 = state_at_2()
    assert float((entry - with_block1).abs().max()) <= 1e-5 * float(with_block1.abs().max())
    with torch.no_grad():
        for name, p in tr.block_params[1]:
            if "lora_B" in name:
                p.zero_()
    base_only = state_at_2()
    assert block_digest(tr.block_params, [1]) != d1
    assert float((base_only - with_block1).abs().max()) > 1e3 * float((entry - with_block1).abs().max())
    # Hits and fills give the same bits: a fresh trainer (empty cache) retrains stage 3 to the same digest.
    cold = StageTrainer(on)
    assert cold.train_stage(0, seq)["sha256"] == mans_on[2]["sha256"]
    print(f"bottom-up: max loss rel diff {rel:.2e}; block rel diff (norm) "
          f"{max(block_rel(blocks_on[b], blocks_ref[b]) for b in (1, 2, 3)):.2e}")


def test_bottom_up_with_dropout_and_checkpointing_same_random_stream_and_no_dropout_below(
        tmp_path, tiny_llama, alpaca_sample, write_records):
    data = write_records(alpaca_sample[:24])
    extra = ["lora.dropout=0.1", "train.gradient_checkpointing=true"]
    ref = Run.create(bottom_up_cfg(tmp_path, tiny_llama, data, "bud-ref", extra))
    on = Run.create(bottom_up_cfg(tmp_path, tiny_llama, data, "bud-on", [*extra, "train.cache_activations=true"]))
    tr_ref, logs_ref, _, blocks_ref = train_stages(ref, 3)
    tr_on, logs_on, mans_on, blocks_on = train_stages(on, 3)
    assert [m["activation_cache_layer"] for m in mans_on] == [1, 2, 3]
    assert_close_losses(logs_ref, logs_on)
    for b in (1, 2, 3):
        assert block_rel(blocks_on[b], blocks_ref[b]) <= BLOCK_RTOL
    # The frozen blocks' dropout was switched off for the stage only: the modules are back as configured.
    assert all(getattr(m.lora_dropout["default"], "p", None) == 0.1 for tr in (tr_ref, tr_on)
               for ms in tr.lora_modules.values() for _, m in ms)


def test_block_order_is_recorded_and_an_explicit_layout_excludes_it(tmp_path, tiny_llama, alpaca_sample,
                                                                    write_records):
    import json

    data = write_records(alpaca_sample[:12])
    with pytest.raises(ConfigError, match="lora.blocks gives the block layout explicitly"):
        Run.create(make_cfg(tmp_path, tiny_llama, data, "both", ["s3t.block_order=bottom_up",
                                                                 "lora.blocks=[[1],[2],[3]]"]))
    with pytest.raises(ConfigError, match="block_order"):
        load_config(None, ["s3t.block_order=diagonal"])
    from s3t_llm.distributed import _WorkerRun, worker_info

    bu = Run.create(make_cfg(tmp_path, tiny_llama, data, "bu", ["s3t.block_order=bottom_up"]))
    # A Ray worker learns the order from what the driver sends (it decides the frozen lower blocks' dropout).
    wr = _WorkerRun(worker_info(bu), tmp_path)
    assert wr.block_order == "bottom_up" and wr.blocks == [[1], [2], [3]]
    run = Run.create(make_cfg(tmp_path, tiny_llama, data, "old"))
    assert run.blocks == [[3], [2], [1]] and run.block_order == "top_down"
    # A run.json written before s3t.block_order existed reopens unchanged (it was laid out top-down) ...
    f = run.dir / "run.json"
    info = json.loads(f.read_text())
    info.pop("block_order")
    info["config"]["s3t"].pop("block_order")
    f.write_text(json.dumps(info))
    again = Run.create(make_cfg(tmp_path, tiny_llama, data, "old"))
    assert again.blocks == [[3], [2], [1]] and again.block_order == "top_down"
    # ... and asking it for the other order is refused, naming what differs.
    with pytest.raises(ConfigError, match="different blocks"):
        Run.create(make_cfg(tmp_path, tiny_llama, data, "old", ["s3t.block_order=bottom_up"]))
