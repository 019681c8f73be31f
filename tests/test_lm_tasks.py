"""lm-eval task objects as the task source (s3t_llm.evaluation.lm_tasks): the shipped eval/lm_tasks YAMLs against the old
specs, constructs the old spec language could not express (tests/fixtures/lm_tasks), lm-eval metrics, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from s3t_llm.evaluation import lm_tasks
from s3t_llm.evaluation import TaskError, evaluate, load_task
from s3t_llm.evaluation.lm_tasks import LMTask, ensemble_lls, lm_eval_scores, load_lm_tasks
from s3t_llm.paths import shared_data_dir

FIX = Path(__file__).resolve().parent / "fixtures" / "lm_tasks"
SHIPPED = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "winogrande"]
N = 20

needs_data = pytest.mark.skipif(not (shared_data_dir() / "eval").is_dir(),
                                reason=f"shared benchmark data not found at {shared_data_dir() / 'eval'}")


class LengthScorer:
    """Deterministic fake with lm-eval's ``loglikelihood(requests)`` interface: ll = sign * len(continuation)
    (sign -1 prefers the shortest choice, +1 the longest; ties go to the first choice)."""

    def __init__(self, sign: float = -1.0):
        self.sign = sign
        self.calls = 0

    def loglikelihood(self, requests):
        self.calls += 1
        return [(self.sign * len(cont), False) for _, cont in requests]


def _key(it):
    return (it.context, it.choices, it.gold, it.delimiter, it.continuation)


# ------------------------------------------------------------------------------------ shipped tasks vs old specs

@needs_data
@pytest.mark.parametrize("name", SHIPPED)
def test_old_names_are_aliases_of_the_lm_eval_tasks(name):
    # the old eval/tasks specs are retired; their names load the s3t_ lm-eval tasks (item for item equal, checked
    # against the old specs before they were deleted) and keep the old name
    assert lm_tasks.ALIASES[name] == f"s3t_{name}"
    old = load_task(name, limit=N, seed=0)
    new = load_task(f"s3t_{name}", limit=N, seed=0)
    assert old.name == name and new.name == f"s3t_{name}" and isinstance(old, LMTask)
    assert [(it.index, *_key(it)) for it in old.items] == [(it.index, *_key(it)) for it in new.items]
    assert old.n_total == new.n_total


@needs_data
def test_mmlu_group_is_one_task_with_subject_groups():
    t = load_lm_tasks(["s3t_mmlu"], limit=1)[0]
    assert t.name == "s3t_mmlu" and len(t) == 57 and t.n_total == 14042
    assert t.items[0].group == "s3t_mmlu_abstract_algebra" and t.items[-1].group == "s3t_mmlu_world_religions"
    assert t.items[0].context.startswith("The following are multiple choice questions (with answers) about abstract algebra.")


@needs_data
def test_load_task_delegates_lm_eval_names_with_the_same_seeded_subset():
    a = load_task("s3t_piqa", limit=7, seed=3)
    b = load_task("piqa", limit=7, seed=3)
    assert isinstance(a, LMTask) and a.name == "s3t_piqa"
    assert [_key(x) for x in a.items] == [_key(x) for x in b.items]
    assert [x.index for x in a.items] == [x.index for x in b.items]
    assert b.name == "piqa" and isinstance(b, LMTask)             # old names are aliases
    c = load_task(str(Path(lm_tasks.LM_TASKS_DIR) / "s3t_boolq.yaml"), limit=3, seed=0)
    assert isinstance(c, LMTask) and c.name == "s3t_boolq"


@needs_data
def test_default_process_results_agrees_with_evaluate():
    t = load_lm_tasks(["s3t_arc_easy"], limit=N)[0]
    res = lm_tasks.evaluate({"short": LengthScorer(-1), "long": LengthScorer(+1)}, [t], progress=False)
    tr = res["tasks"]["s3t_arc_easy"]
    for s in ("short", "long"):
        assert tr["lm_eval"]["scorers"][s]["acc"] == pytest.approx(tr["scorers"][s]["acc"])
        assert tr["lm_eval"]["scorers"][s]["acc_norm"] == pytest.approx(tr["scorers"][s]["acc_norm"])
    assert tr["lm_eval"]["ensemble"] is None and not t.custom_metrics


# ------------------------------------------------------------------------------------ generality fixtures

def _one(name):
    ts = load_lm_tasks([name], include_path=FIX)
    assert len(ts) == 1
    return ts[0]


def _scores(task, scorers):
    res = lm_tasks.evaluate(scorers, [task], progress=False)
    return res["tasks"][task.name]


def test_a_choices_from_a_mapping():
    t = _one(str(FIX / "fx_mapping.yaml"))       # by path
    assert t.items[0].choices == ("green", "blue", "a red one") and t.items[0].gold == 1
    assert [it.gold for it in t.items] == [1, 2, 0, 1]
    tr = _scores(t, {"m": LengthScorer()})
    assert tr["scorers"]["m"]["acc"] == pytest.approx(0.75)       # shortest wins; item 4 ties wood/iron -> wood
    assert tr["scorers"]["m"]["acc_norm"] == pytest.approx(0.0)
    assert tr["lm_eval"]["scorers"]["m"] == pytest.approx({"acc": 0.75, "acc_norm": 0.0})


def test_b_prompt_wording_chosen_by_a_field():
    t = _one("fx_copa_like")                    # by name, through include_path
    assert [it.context for it in t.items] == ["The man broke his toe because", "I tipped the bottle therefore",
                                              "The girl found a bug in her cereal therefore"]
    assert t.items[1].choices == ("the liquid in the bottle froze.", "it poured out.")
    tr = _scores(t, {"m": LengthScorer()})
    assert tr["scorers"]["m"]["acc"] == pytest.approx(2 / 3)
    assert tr["lm_eval"]["scorers"]["m"]["acc"] == pytest.approx(2 / 3)


def test_c_several_true_answers_scored_by_the_tasks_process_results():
    t = _one("fx_multi")
    assert t.custom_metrics
    short, long_ = LengthScorer(-1), LengthScorer(+1)
    tr = _scores(t, {"short": short, "long": long_})
    lm = tr["lm_eval"]
    # shortest choice: "2" (hit, rank 0), "red" (hit, 0), "b" (miss; "a" ranks 1), "sun" (miss; rank 2)
    assert lm["scorers"]["short"] == pytest.approx({"hit": 0.5, "gold_rank": 0.75})
    # the ensemble goes through the same process_results, on log of the averaged choice probabilities
    want_hit, want_rank = [], []
    for it, ans in zip(t.items, [[0, 2], [1, 2], [2], [0, 2]]):
        lens = [len(" " + c) for c in it.choices]
        def sm(xs):
            m = max(xs)
            e = [math.exp(x - m) for x in xs]
            return [v / sum(e) for v in e]
        p = [(a + b) / 2 for a, b in zip(sm([-x for x in lens]), sm(lens))]
        order = sorted(range(len(p)), key=lambda j: -p[j])
        want_hit.append(1.0 if order[0] in ans else 0.0)
        want_rank.append(min(order.index(a) for a in ans))
    assert lm["ensemble"] == pytest.approx({"hit": sum(want_hit) / 4, "gold_rank": sum(want_rank) / 4})
    ll = ensemble_lls([[-1.0, -2.0], [-3.0, -0.5]])
    assert sum(math.exp(x) for x in ll) == pytest.approx(1.0)


def test_d_choices_split_out_of_one_string():
    t = _one("fx_split")
    assert t.items[1].choices == ("puppy", "kitten", "calf", "cub") and t.items[1].gold == 1
    tr = _scores(t, {"m": LengthScorer()})
    assert tr["scorers"]["m"]["acc"] == pytest.approx(1 / 3)
    assert tr["lm_eval"]["scorers"]["m"]["acc"] == pytest.approx(1 / 3)


def test_lm_eval_scores_from_evaluate_samples():
    t = _one("fx_split")
    res = evaluate({"m": LengthScorer()}, [t], progress=False, return_samples=True)
    assert lm_eval_scores(t, res["samples"]["fx_split"], ["m"])["scorers"]["m"]["acc"] == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------ errors before scoring

def test_unknown_name_lists_close_matches():
    with pytest.raises(TaskError, match=r"unknown lm-eval task 's3t_arc_eazy'.*close matches: .*s3t_arc_easy"):
        load_lm_tasks(["s3t_arc_eazy"])
    with pytest.raises(TaskError, match="fx_splitt.*close matches: fx_split"):
        load_lm_tasks(["fx_splitt"], include_path=FIX)


def test_output_type_other_than_multiple_choice_is_refused():
    with pytest.raises(TaskError, match="output_type 'generate_until'.*only multiple_choice"):
        load_lm_tasks([str(FIX / "fx_generate.yaml")])
    with pytest.raises(TaskError, match="output_type 'generate_until'"):   # checked before the good one loads
        load_lm_tasks(["fx_split", "fx_generate"], include_path=FIX)


def test_yaml_lm_eval_cannot_load(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: bad_t\noutput_type: multiple_choice\ndataset_path: json\ndoc_to_text: !function nowhere.f\n")
    with pytest.raises(TaskError, match=r"lm-eval cannot load task YAML .*bad\.yaml"):
        load_lm_tasks([str(bad)])
    broken = tmp_path / "broken.yaml"
    broken.write_text("task: [unclosed\n")
    with pytest.raises(TaskError, match=r"lm-eval cannot load task YAML .*broken\.yaml"):
        load_lm_tasks([str(broken)])
    with pytest.raises(TaskError, match="does not exist"):
        load_lm_tasks([str(tmp_path / "missing.yaml")])


def test_a_tag_is_one_task_per_member():
    ts = load_lm_tasks(["fx_tag"], include_path=FIX)
    assert [t.name for t in ts] == ["fx_copa_like", "fx_split"]


# ------------------------------------------------------------------------------------ served evaluation and CLI

def test_evaluate_served_passes_include_path_and_reports_lm_eval_metrics(monkeypatch):
    import types

    import requests

    from s3t_llm import evaluation
    from s3t_llm.evaluation import ensemble

    class State:
        def json(self):
            return {"shards": [{"shard": 0, "adapter": "a0", "depth": 1}, {"shard": 1, "adapter": "a1", "depth": 1}]}

    class FakeServed(LengthScorer):
        def __init__(self, url, name, *, tokenizer=None, **kw):
            super().__init__(-1.0 if name == "a0" else 1.0)
            self.tokenizer = "tok"

    monkeypatch.setattr(requests, "get", lambda *a, **k: State())
    monkeypatch.setattr(ensemble, "VLLMCompletionsScorer", FakeServed)  # the name evaluate_served uses
    data = types.SimpleNamespace(max_length=64, template="alpaca")
    run = types.SimpleNamespace(model_path="/base", config=types.SimpleNamespace(data=data), heldout=lambda: [])
    out = evaluation.evaluate_served(run, "http://gw", tasks=["fx_split", "fx_multi"], limit=None, include_path=FIX)
    assert set(out["tasks"]) == {"fx_split", "fx_multi"}
    assert out["tasks"]["fx_split"]["per_shard"]["shard0"] == pytest.approx(1 / 3)
    assert "lm_eval" not in out["tasks"]["fx_split"]
    lm = out["tasks"]["fx_multi"]["lm_eval"]
    assert lm["scorers"]["shard0"] == pytest.approx({"hit": 0.5, "gold_rank": 0.75})
    assert set(lm["ensemble"]) == {"hit", "gold_rank"}


def test_cli_eval_takes_include_path():
    from s3t_llm.cli import build_parser

    a = build_parser().parse_args(["eval", "runs/x", "--tasks", "my_task,s3t_piqa", "--include-path", "DIR",
                                   "--limit", "5"])
    assert (a.tasks, a.include_path, a.limit) == ("my_task,s3t_piqa", "DIR", 5)
    assert build_parser().parse_args(["eval", "runs/x"]).include_path is None


@pytest.mark.slow
def test_offline_per_shard_scores_equal_lm_evals_own_hf_peft_run(tiny_llama, tmp_path):
    """A shard adapter scored offline (HFScorer, fp32) against `lm_eval --model hf --model_args
    pretrained=BASE,peft=ADAPTER` on the very task YAMLs of eval/lm_tasks: the same items, per-choice
    log-likelihoods equal up to fp32 batching (lm-eval pads other batches), hence the same acc and acc_norm."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from s3t_llm.evaluation import HFScorer

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)  # a trained-looking adapter: not the identity
    adapter = tmp_path / "adapter"
    pm.save_pretrained(str(adapter))
    names, n_items = ["s3t_arc_easy", "s3t_boolq"], 12
    ours = lm_tasks.load_lm_tasks(names, limit=n_items, seed=None)       # lm-eval's own `limit`: the first docs
    sc = HFScorer.from_pretrained(str(tiny_llama), adapter=str(adapter))
    res = evaluate({"shard0": sc}, ours, progress=False, return_samples=True)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={tiny_llama},peft={adapter},dtype=float32", tasks=names,
        task_manager=TaskManager(include_path=str(lm_tasks.LM_TASKS_DIR)), limit=n_items, batch_size=4,
        device="cpu", log_samples=True)
    worst = 0.0
    for name in names:
        mine = {s["index"]: s["lls"]["shard0"] for s in res["samples"][name]}
        got = {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in theirs["samples"][name]}
        assert sorted(mine) == sorted(got) == list(range(n_items)), (name, sorted(mine), sorted(got))
        for i in mine:
            assert len(mine[i]) == len(got[i])
            worst = max(worst, *(abs(a - b) for a, b in zip(mine[i], got[i])))
        lm = theirs["results"][name]
        ours_acc = res["tasks"][name]["scorers"]["shard0"]
        metrics = [m for m in ("acc", "acc_norm") if f"{m},none" in lm]   # BoolQ's YAML lists acc only
        assert "acc" in metrics and all(ours_acc[m] == lm[f"{m},none"] for m in metrics), (name, lm, ours_acc)
    print(f"largest per-choice log-likelihood difference against lm-eval hf+peft: {worst:.2e}")
    assert worst < 1e-4, worst
