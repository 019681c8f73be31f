"""The deletion-stream experiment: served depths against an independent computation, block sharing between
budgets equal to retraining, the full fine-tune reference, the membership AUC, outputs and bad input."""

import csv
import json
import re

import numpy as np
import pytest
from safetensors.numpy import load_file

from s3t_llm.adapters import layer_of
from s3t_llm.config import ConfigError, load_config
from s3t_llm.deletion import stale_artifacts
from s3t_llm.evaluation import TaskError
from s3t_llm.experiment import auc_with_ci, deletion_stream, pick_requests, prepare_runs
from s3t_llm.run import DATASET, Run
from s3t_llm.training import stage_plan, train_run


def exp_cfg(tmp_path, model, data, name="x", extra=()):
    return load_config(None, [
        f"name={name}", f"output_dir={tmp_path / 'runs'}", f"model.name={model}", f"data.path={data}",
        "data.max_length=160", "data.heldout=16", "s3t.shards=2", "s3t.slices=3", "s3t.budget=3",
        "lora.r=4", "lora.alpha=8", "train.batch_size=4", "train.learning_rate=0.001", *extra])


# ----- AUC ------------------------------------------------------------------------------------------------
def test_auc_counts_within_group_pairs_with_ties_and_nans():
    assert auc_with_ci([([0, 1, 2], [3, 4])])["auc"] == 1.0
    assert auc_with_ci([([3, 4], [0, 1, 2])])["auc"] == 0.0
    assert auc_with_ci([([1, 1], [1, 1])])["auc"] == 0.5
    # Two models: 1 win of 1 pair + 0 wins of 2 pairs = 1/3 (pooling across models would say 3/6).
    r = auc_with_ci([([0.0], [1.0]), ([5.0], [1.0, 2.0])])
    assert r["auc"] == pytest.approx(1 / 3, abs=1e-4) and r["n_members"] == 2
    assert auc_with_ci([([0.0, float("nan")], [1.0])])["n_members"] == 1
    assert auc_with_ci([([], [1.0])])["auc"] is None


def test_auc_ci_covers_chance_for_one_distribution_and_excludes_it_for_separated_ones():
    rng = np.random.default_rng(0)
    same = auc_with_ci([(rng.normal(size=200), rng.normal(size=200))])
    assert same["ci"][0] < 0.5 < same["ci"][1] and same["ci"][1] - same["ci"][0] < 0.2
    apart = auc_with_ci([(rng.normal(size=50), rng.normal(3.0, 1.0, size=50))])
    assert apart["auc"] > 0.9 and apart["ci"][0] > 0.8 and apart["ci"][0] <= apart["auc"] <= apart["ci"][1]


# ----- requests -------------------------------------------------------------------------------------------
def test_pick_requests_uniform_and_skewed(tmp_path, tiny_llama, alpaca_sample, write_records):
    run = Run.create(exp_cfg(tmp_path, tiny_llama, write_records(alpaca_sample[:112])))  # 96 train, 16 held out
    with run.ledger() as led:
        cell = {sid: (s, sl) for s in range(2) for sl in range(3) for sid, _ in led.slice_samples(DATASET, s, sl)}
    a = pick_requests(run, 10, seed=1)
    assert a == pick_requests(run, 10, seed=1) != pick_requests(run, 10, seed=2)
    assert len(set(a)) == 10 and set(a) <= set(cell)
    hot = pick_requests(run, 20, prior="skewed", skew=0.05, seed=0)
    assert len(set(hot)) == 20 and sum(cell[i][1] == 0 for i in hot) >= 16  # slice 0 of 32 samples takes most
    with pytest.raises(ConfigError, match="exceeds the 96 samples"):
        pick_requests(run, 97)
    with pytest.raises(ConfigError, match="uniform"):
        pick_requests(run, 2, prior="zipf")
    with pytest.raises(ConfigError, match="skew"):
        pick_requests(run, 2, prior="skewed", skew=0)


# ----- the experiment, end to end (offline backend here; through real vLLM in the slow test at the end) -----
@pytest.fixture(scope="module")
def stream(tmp_path_factory, tiny_llama, alpaca_sample):
    tmp = tmp_path_factory.mktemp("exp")
    data = tmp / "data.json"
    data.write_text(json.dumps(alpaca_sample[:64]))
    recipe = tmp / "recipe.yaml"
    cfg = exp_cfg(tmp, tiny_llama, data, name="ex")
    import yaml

    recipe.write_text(yaml.safe_dump(cfg.to_dict()))
    exp = deletion_stream(recipe, budgets=(1, 3), requests=4, tasks=("arc_easy",), limit=6, heldout=8,
                          generations=1, backend="offline", out=tmp / "exp")
    return {"dir": exp, "recipe": recipe, "data": data, "tmp": tmp,
            "rows": [json.loads(x) for x in (exp / "stream.jsonl").read_text().splitlines()]}


def expected_depths(run: Run, cells: dict, deleted: set) -> list[int]:
    """Longest surviving prefix per shard, computed from the plan and the deleted cells alone."""
    out = []
    for s in range(run.shards):
        dead = {cells[i][1] for i in deleted if cells[i][0] == s}
        best = 0
        for seq in run.sequences:
            k = 0
            while k < len(seq) and seq[k] not in dead:
                k += 1
            best = max(best, k)
        out.append(best)
    return out


def test_stream_depths_match_an_independent_computation(stream):
    exp, rows = stream["dir"], stream["rows"]
    ids = json.loads((exp / "requests.json").read_text())["ids"]
    assert [(r["budget"], r["requests"]) for r in rows] == [(b, k) for b in (1, 3) for k in range(5)]
    for b in (1, 3):
        run = Run.open(exp / "train" / f"ex-B{b}")
        assert len(run.sequences) == b
        with run.ledger() as led:
            cells = led.cell_of(DATASET, ids)
        for r in (r for r in rows if r["budget"] == b):
            assert r["depths"] == expected_depths(run, cells, set(ids[:r["requests"]])), r
    sisa = {r["requests"]: sum(r["depths"]) for r in rows if r["budget"] == 1}
    s3t = {r["requests"]: sum(r["depths"]) for r in rows if r["budget"] == 3}
    assert all(s3t[k] >= sisa[k] for k in sisa) and s3t[4] > sisa[4]  # this stream kills SISA shards first
    # Before any deletion both budgets serve the same adapters (shared blocks), so the same scores.
    r1, r3 = (next(r for r in rows if r["budget"] == b and r["requests"] == 0) for b in (1, 3))
    assert r1["adapters"] == r3["adapters"] and r1["tasks"] == r3["tasks"] and r1["heldout_loss"] == r3["heldout_loss"]
    for r in rows:
        if r["live_shards"]:
            assert 0.0 <= r["tasks"]["arc_easy"]["acc"] <= 1.0 and r["heldout_loss"] > 0
        else:
            assert "tasks" not in r and "no live shard" in r["note"]


def test_stream_leaves_nothing_that_saw_a_deleted_sample_and_pristine_runs_untouched(stream):
    exp = stream["dir"]
    ids = set(json.loads((exp / "requests.json").read_text())["ids"])
    for b in (1, 3):
        run = Run.open(exp / "streams" / f"B{b}")
        with run.ledger() as led:
            assert led.deleted_ids(DATASET) == ids
        assert stale_artifacts(run) == []
        for shard, prefix in stage_plan(run):
            d = run.store.block_dir(shard, prefix)
            if d.exists():
                assert not ids & set(run.store.manifest(shard, prefix)["sample_ids"])
        pristine = Run.open(exp / "train" / f"ex-B{b}")
        with pristine.ledger() as led:
            assert led.deleted_ids(DATASET) == set()


def test_smaller_budget_blocks_are_copies_equal_to_retraining(stream, tiny_llama):
    exp, tmp = stream["dir"], stream["tmp"]
    b1, b3 = Run.open(exp / "train" / "ex-B1"), Run.open(exp / "train" / "ex-B3")
    fresh = Run.create(exp_cfg(tmp / "fresh", tiny_llama, stream["data"], name="ex-B1", extra=["s3t.budget=1"]))
    train_run(fresh)
    for shard, prefix in stage_plan(b1):
        sha = b1.store.manifest(shard, prefix)["sha256"]
        assert sha == b3.store.manifest(shard, prefix)["sha256"] == fresh.store.manifest(shard, prefix)["sha256"]


def test_full_reference_trains_every_block_layer_on_all_samples(stream):
    exp = stream["dir"]
    ref = exp / "reference" / "full_lora"
    info = json.loads((ref / "reference.json").read_text())
    run = Run.open(exp / "train" / "ex-B3")
    with run.ledger() as led:
        all_ids = {sid for s in range(2) for sl in range(3) for sid, _ in led.slice_samples(DATASET, s, sl)}
    assert set(info["sample_ids"]) == all_ids and info["n_samples"] == 48
    tensors = load_file(str(ref / "adapter_model.safetensors"))
    layers = sorted({layer_of(k) for k in tensors})
    assert layers == sorted(i for b in run.blocks for i in b)
    assert all(np.abs(v).sum() > 0 for k, v in tensors.items() if "lora_B" in k)  # every block's B trained


def test_outputs_audit_and_report(stream):
    exp = stream["dir"]
    audit = json.loads((exp / "audit.json").read_text())
    before = audit["S3T B=3"]["before"]["groups"]["requested"]
    assert before["n_members"] == 4 and before["ci"][0] <= before["auc"] <= before["ci"][1]
    after = audit["S3T B=3"]["after"]
    for g in ("unused", "used"):
        x = after["groups"][g]
        assert x["auc"] is None or 0.0 <= x["ci"][0] <= x["auc"] <= x["ci"][1] <= 1.0
    with open(exp / "stream.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and {"arc_easy_acc", "heldout_loss", "deletion_to_effect_s"} <= set(table[0])
    report = (exp / "report.md").read_text()
    assert "S3T against full training" in report and "Membership audit" in report
    assert len(re.findall(r"\| S3T B=3 \| \d \| \[", report)) == 5 and len(re.findall(r"\| SISA \| \d \| \[", report)) == 5
    assert (exp / "quality_vs_deletions.png").stat().st_size > 10_000
    assert "before deletions" in (exp / "generations.md").read_text()
    # The deleted records' text is not written anywhere in the experiment's outputs.
    ids = json.loads((exp / "requests.json").read_text())["ids"]
    run = Run.open(exp / "train" / "ex-B3")
    with run.ledger() as led:
        texts = [rec["output"] for s in range(2) for sl in range(3) for sid, rec in led.slice_samples(DATASET, s, sl)
                 if sid in ids and len(rec["output"]) > 30]
    for name in ("stream.jsonl", "audit.json", "report.md", "stream.csv"):
        body = (exp / name).read_text()
        assert not any(t in body for t in texts)


def test_audit_reports_the_audit_suite_for_every_group(stream):
    from s3t_llm.evaluation.audit import ATTACKS

    exp = stream["dir"]
    audit = json.loads((exp / "audit.json").read_text())
    for lab in ("SISA (B=1)", "S3T B=3"):
        for when in ("before", "after"):
            for g, x in audit[lab][when]["groups"].items():
                if x["auc"] is None:
                    continue
                suite = x["suite"]
                assert set(suite) == set(ATTACKS)  # Min-K%++ included: the offline backend has the full vocabulary
                # the suite's loss attack is the loss-threshold AUC above, from the per-token arrays
                assert suite["loss"]["auc"] == pytest.approx(x["auc"], abs=1e-3)
                assert suite["loss"]["n_members"] == x["n_members"]
                for a in ATTACKS:
                    assert 0.0 <= suite[a]["ci"][0] <= suite[a]["auc"] <= suite[a]["ci"][1] <= 1.0, (lab, when, g, a)
    report = (exp / "report.md").read_text()
    assert "Audit suite on the deletion requests" in report and "Min-K%++ (k=20%)" in report

def test_experiment_options_are_a_typed_recipe_section_then_overrides_then_arguments(tmp_path):
    cfg = load_config({"experiment": {"requests": 5, "tasks": ["piqa"], "budgets": [1, 2]}}, ["experiment.requests=6"])
    assert (cfg.experiment.requests, cfg.experiment.tasks, cfg.experiment.budgets) == (6, ["piqa"], [1, 2])
    assert cfg.experiment.backend == "vllm" and cfg.experiment.limit == 40  # the documented defaults
    with pytest.raises(ConfigError, match="experiment.requests='many': expected an integer"):
        load_config({}, ["experiment.requests=many"])
    with pytest.raises(ConfigError, match="experiment.nope"):
        load_config({"experiment": {"nope": 1}})
    out = tmp_path / "e"
    with pytest.raises(ConfigError, match=r"unknown experiment option\(s\) \['n_requests'\]"):
        deletion_stream({}, n_requests=3, out=out)
    # An argument overrides the recipe's field; None leaves it (the recipe's bad value is then reported).
    with pytest.raises(ConfigError, match="experiment.requests=0"):
        deletion_stream({"experiment": {"requests": 0}}, requests=None, out=out)
    with pytest.raises(ConfigError, match="experiment.backend='tpu'"):
        deletion_stream({"experiment": {"requests": 0, "backend": "tpu"}}, requests=2, out=out)
    with pytest.raises(ConfigError, match="experiment.skew=2.0"):
        deletion_stream({}, ["experiment.prior=skewed"], skew=2.0, out=out)
    assert not out.exists()


def test_bad_input_is_refused_before_anything_runs(stream, tmp_path):
    with pytest.raises(ConfigError, match="budgets"):
        deletion_stream(stream["recipe"], budgets=(0, 2), out=tmp_path / "e")
    with pytest.raises(ConfigError, match="backend"):
        deletion_stream(stream["recipe"], backend="tpu", out=tmp_path / "e")
    with pytest.raises(ConfigError, match="does not exist"):
        deletion_stream(tmp_path / "missing.yaml", out=tmp_path / "e")
    with pytest.raises(ConfigError, match="skewed"):
        deletion_stream(stream["recipe"], prior="zipf", out=tmp_path / "e")
    with pytest.raises(TaskError, match="no_such_task"):
        deletion_stream(stream["recipe"], tasks=("no_such_task",), out=tmp_path / "e")
    assert not (tmp_path / "e").exists()  # refused before anything was created or trained
    # Reusing an experiment directory trained with other train.* settings is refused, not silently mixed.
    cfg = load_config(stream["recipe"], ["train.epochs=2"])
    with pytest.raises(ConfigError, match="other train"):
        prepare_runs(cfg, (3,), stream["dir"])


@pytest.mark.slow
def test_served_stream_through_vllm_agrees_with_the_offline_one(stream):
    """The same stream through `s3t serve` (real vLLM multi-LoRA + gateway) and offline: same served depths at
    every step, held-out losses equal to float tolerance, and real deletion latencies recorded."""
    kw = dict(budgets=(1, 2), requests=2, tasks=("arc_easy",), limit=3, heldout=4, generations=1)
    served = deletion_stream(stream["recipe"], backend="vllm", out=stream["tmp"] / "served", **kw)
    offline = deletion_stream(stream["recipe"], backend="offline", out=stream["tmp"] / "offline", **kw)
    rows = [[json.loads(x) for x in (d / "stream.jsonl").read_text().splitlines()] for d in (served, offline)]
    assert len(rows[0]) == len(rows[1]) == 6
    for a, b in zip(*rows):
        assert (a["budget"], a["requests"], a["depths"], a["adapters"]) == \
               (b["budget"], b["requests"], b["depths"], b["adapters"])
        if a["live_shards"]:
            assert a["heldout_loss"] == pytest.approx(b["heldout_loss"], abs=2e-3)
        if a["requests"]:
            assert 0 < a["deletion_to_effect_s"] < 60 and a["round_trip_s"] > 0
    gens = (served / "generations.md").read_text()
    assert "S3T B=2 after deletions" in gens and "(error" not in gens
