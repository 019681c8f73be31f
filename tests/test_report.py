"""The report module the demo and the experiment share: standard errors in cells and plots."""

import math
import random

import pytest

from s3t_llm.evaluation.report import Reference, Series, acc_cell, loss_cell, plot_quality
from s3t_llm.evaluation.scorers import ratio_stderr


def test_ratio_stderr_is_the_standard_error_of_the_mean_when_every_sample_has_the_same_length():
    rng = random.Random(0)
    per = [rng.uniform(1.0, 3.0) for _ in range(50)]
    n_tok = 7
    nums, dens = [p * n_tok for p in per], [n_tok] * len(per)
    ratio = sum(nums) / sum(dens)
    mean = sum(per) / len(per)
    sem = math.sqrt(sum((p - mean) ** 2 for p in per) / (len(per) - 1) / len(per))
    assert ratio_stderr(nums, dens, ratio) == pytest.approx(sem, rel=1e-12)
    assert math.isnan(ratio_stderr([1.0], [3], 1 / 3))


def test_ratio_stderr_matches_a_bootstrap_of_the_per_token_mean():
    rng = random.Random(1)
    dens = [rng.randint(3, 40) for _ in range(80)]
    nums = [d * rng.uniform(1.5, 2.5) + rng.gauss(0, 2) for d in dens]
    ratio = sum(nums) / sum(dens)
    boots = []
    for _ in range(3000):
        idx = [rng.randrange(len(dens)) for _ in dens]
        boots.append(sum(nums[i] for i in idx) / sum(dens[i] for i in idx))
    m = sum(boots) / len(boots)
    sd = math.sqrt(sum((b - m) ** 2 for b in boots) / (len(boots) - 1))
    assert ratio_stderr(nums, dens, ratio) == pytest.approx(sd, rel=0.1)


def test_cells_show_the_standard_error_and_say_when_there_is_none():
    assert acc_cell({"acc": 0.5423, "acc_stderr": 0.0312}) == "54.2 ± 3.1"
    assert acc_cell({"acc": 0.5, "acc_stderr": float("nan")}) == "50.0"
    assert acc_cell(None) == "n/a" and acc_cell({"acc": None}) == "n/a"
    assert loss_cell(1.23456, 0.01234) == "1.2346 ± 0.0123" and loss_cell(None) == "n/a"


def test_plot_draws_every_point_with_its_error_bar(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = []
    real = plt.Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        drawn.append((kw.get("label"), list(x), list(y), list(yerr)))
        return real(self, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(plt.Axes, "errorbar", spy)
    pts = [{"requests": 0, "depth": 3.0, "tasks": {"arc": {"acc": 0.6, "acc_stderr": 0.05}},
            "heldout_loss": 2.0, "heldout_loss_stderr": 0.1},
           {"requests": 1, "depth": 2.5},  # not evaluated: a gap in the quality panels, a point of the depth curve
           {"requests": 2, "depth": 2.0, "tasks": {"arc": {"acc": 0.55, "acc_stderr": float("nan")}},
            "heldout_loss": 2.2, "heldout_loss_stderr": None}]
    ref = Reference("base", {"arc": {"acc": 0.4, "acc_stderr": 0.05}}, 3.0, 0.2)
    out = plot_quality(tmp_path / "q.png", [Series("S3T", pts)], ["arc"], [ref])
    assert out.exists() and out.stat().st_size > 5000
    acc, loss = drawn  # one call per quality panel: the accuracy, then the loss
    assert acc == ("S3T", [0, 2], pytest.approx([60.0, 55.0]), pytest.approx([5.0, 0.0]))  # nan stderr: no bar
    assert loss == ("S3T", [0, 2], pytest.approx([2.0, 2.2]), pytest.approx([0.1, 0.0]))


def test_the_demo_report_shows_standard_errors_and_the_shards_that_are_gone(tmp_path):
    from types import SimpleNamespace

    from s3t_llm.demo import write_report

    run = SimpleNamespace(dir=tmp_path, shards=2, sequences=[[0, 1]], model_path="/base",
                          config=SimpleNamespace(name="r", s3t=SimpleNamespace(slices=2)))
    live = {"requests": 0, "depths": [2, 2],
            "tasks": {"arc": {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.5, "n": 40, "per_shard": {},
                              "base_acc": 0.4, "base_acc_stderr": 0.04}},
            "heldout": {"n": 8, "per_shard": {"shard0": 2.0}, "mean": 2.0, "mean_stderr": 0.1, "base": 3.0,
                        "base_stderr": 0.2}}
    dead = {"requests": 1, "depths": [0, 0], "tasks": {}, "note": "no live shard",
            "heldout": {"n": 8, "per_shard": {}, "mean": None, "mean_stderr": None, "base": 3.0, "base_stderr": 0.2}}
    out = write_report(run, [live, dead])
    md = (out / "report.md").read_text()
    assert "| 0 | [2, 2] | 50.0 ± 5.0 (40.0 ± 4.0) | 2.0000 ± 0.1000 (3.0000 ± 0.2000) |" in md
    assert "| 1 | [0, 0] | n/a | n/a (no live shard) |" in md
    assert (out / "quality_vs_deletions.png").stat().st_size > 5000
    assert len((out / "deletion_stream.jsonl").read_text().splitlines()) == 2
