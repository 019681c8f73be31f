"""The unlearning audit suite: each metric on hand-built arrays with known answers, the HF and vLLM adapters
against the project's own scorers, and `s3t audit` end to end on a tiny random Llama run (with bad input)."""

import json
import shutil
import zlib

import numpy as np
import pytest
from scipy.stats import ks_2samp, mannwhitneyu

from s3t_llm.evaluation import audit as A
from s3t_llm.evaluation.audit import (FullVocabularyRequired, ModelScores, TokenScores, attack_table, auc, auc_ci,
                           auc_with_ci, forget_quality, lcs_length, min_k_pp_score, min_k_pp_token_scores, min_k_score,
                           privleak, privleak_muse, reference_score, rouge_l, zlib_score)


# ----- AUC ------------------------------------------------------------------------------------------------
def test_auc_is_one_for_perfectly_separated_zero_reversed_half_for_ties():
    r = auc_ci([0.1, 0.2, 0.3], [1.0, 2.0, 3.0, 4.0])
    assert r["auc"] == 1.0 and r["ci"] == [1.0, 1.0] and r["n_members"] == 3 and r["n_nonmembers"] == 4
    assert auc([5.0, 6.0], [1.0, 2.0]) == 0.0
    assert auc([1.0, 1.0], [1.0, 1.0, 1.0]) == 0.5
    assert auc([1.0, 2.0], [1.5]) == 0.5  # one win, one loss
    assert auc([1.0, float("nan")], [2.0]) == 1.0  # NaNs (samples with no token) are left out


def test_auc_equals_mann_whitney_u_and_the_experiments_grouped_auc():
    from s3t_llm.experiment import auc_with_ci as exp_auc

    rng = np.random.default_rng(1)
    m, h = rng.normal(0, 1, 37).round(1), rng.normal(0.5, 1, 53).round(1)  # rounded: ties occur
    u = mannwhitneyu(h, m).statistic  # pairs where the non-member scores higher, ties 1/2
    assert auc(m, h) == pytest.approx(u / (len(m) * len(h)), abs=1e-12)
    groups = [(rng.normal(size=5), rng.normal(size=7)), (rng.normal(size=3) - 1, rng.normal(size=9))]
    assert auc_with_ci(groups)["auc"] == pytest.approx(exp_auc(groups)["auc"], abs=1e-4)
    # Within-group pairs only: 1 win of 1 pair + 0 wins of 2 pairs = 1/3 (pooled would be 3/6).
    assert auc_with_ci([([0.0], [1.0]), ([5.0], [1.0, 2.0])])["auc"] == pytest.approx(1 / 3)


def test_auc_ci_covers_chance_for_one_distribution_and_excludes_it_when_separated():
    rng = np.random.default_rng(0)
    same = auc_ci(rng.normal(size=200), rng.normal(size=200), n_boot=500)
    assert same["ci"][0] < 0.5 < same["ci"][1] and same["ci"][1] - same["ci"][0] < 0.2
    apart = auc_ci(rng.normal(size=40), rng.normal(2.5, 1, size=40), n_boot=500)
    assert apart["auc"] > 0.9 and 0.8 < apart["ci"][0] <= apart["auc"] <= apart["ci"][1]
    assert auc_ci([], [1.0])["auc"] is None


# ----- per-sample scores ----------------------------------------------------------------------------------
LP = np.array([-0.1, -5.0, -0.2, -3.0, -0.3, -0.4, -0.5, -0.6, -0.7, -0.8])


def test_min_k_picks_the_lowest_k_percent_of_tokens():
    assert min_k_score(LP, 0.2) == pytest.approx(4.0)  # the two lowest of ten: -5 and -3
    assert min_k_score(LP, 0.3) == pytest.approx((5.0 + 3.0 + 0.8) / 3)
    assert min_k_score(LP, 0.05) == pytest.approx(5.0)  # int(10 * 0.05) = 0: at least one token
    assert min_k_score(LP, 1.0) == pytest.approx(-LP.mean())  # k = 100%: the loss
    assert A.loss_score(LP) == pytest.approx(1.16)
    with pytest.raises(ValueError, match="k="):
        min_k_score(LP, 0.0)


def _dist_stats(logits):
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    p = np.exp(lp)
    mu = (p * lp).sum(-1)
    return lp, mu, (p * (lp - mu[:, None]) ** 2).sum(-1)  # the variance, written as E[(x - mu)^2]


def test_min_k_pp_normalises_by_the_full_vocabulary_distribution():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(10, 50)) * 3
    tgt = rng.integers(0, 50, 10)
    lp, mu, s2 = _dist_stats(logits)
    tok = lp[np.arange(10), tgt]
    z = (tok - mu) / np.sqrt(s2)
    np.testing.assert_allclose(min_k_pp_token_scores(tok, mu, s2), z)
    assert min_k_pp_score(tok, mu, s2, 0.2) == pytest.approx(-np.sort(z)[:2].mean())
    # Hand-built: two tokens, mu = -1, sigma = 2: z = (-3 + 1)/2 = -1 and (0 + 1)/2 = 0.5; lowest 50% = -1.
    assert min_k_pp_score([-3.0, 0.0], [-1.0, -1.0], [4.0, 4.0], 0.5) == pytest.approx(1.0)
    assert np.isfinite(min_k_pp_score([0.0], [0.0], [0.0]))  # a one-hot distribution: zero variance, floored
    with pytest.raises(FullVocabularyRequired, match="offline"):
        min_k_pp_score(tok, None, None)


def test_zlib_and_reference_scores():
    text = "the quick brown fox jumps over the lazy dog"
    assert zlib_score(LP, text) == pytest.approx(1.16 / len(zlib.compress(text.encode())))
    assert A.zlib_entropy("ab" * 200) < A.zlib_entropy("".join(chr(33 + (i * 7919) % 90) for i in range(400)))
    assert reference_score(LP, LP) == 0.0
    assert reference_score([-1.0, -1.0], [-3.0, -1.0]) == pytest.approx(-1.0)  # 1.0 - 2.0


def test_attack_table_on_hand_built_samples_and_min_k_pp_needs_full_vocabulary():
    def ts(loss, full=True):
        lp = np.full(5, -loss)
        return TokenScores(lp, "text " * int(loss * 10 + 1), np.full(5, -1.0) if full else None,
                           np.ones(5) if full else None)

    members, non = [ts(0.5), ts(0.6), ts(0.7)], [ts(2.0), ts(2.5), ts(3.0)]
    ref = ModelScores([(members, non)], [([ts(1.0)] * 3, [ts(1.0)] * 3)])
    t = attack_table(ref, n_boot=100)
    assert t["loss"]["auc"] == t["min_k"]["auc"] == t["min_k_pp"]["auc"] == t["reference"]["auc"] == 1.0
    vllm_like = ModelScores([([ts(0.5, False)] * 2, [ts(2.0, False)] * 2)])
    t = attack_table(vllm_like, n_boot=10)
    assert t["min_k_pp"]["auc"] is None and "offline" in t["min_k_pp"]["note"]
    assert t["reference"]["auc"] is None and t["loss"]["auc"] == 1.0


# ----- PrivLeak, forget quality, ROUGE-L --------------------------------------------------------------------
def test_privleak_sign_and_the_muse_convention():
    assert privleak(0.9, 0.5) == pytest.approx(0.8)  # leaks more than the oracle: positive
    assert privleak(0.3, 0.5) == pytest.approx(-0.4)  # over-unlearned: negative
    assert privleak(0.5, 0.5) == 0.0
    assert privleak_muse(0.9, 0.5) == pytest.approx(-0.8)  # MUSE reports 1 - AUC: under-unlearning negative
    with pytest.raises(ValueError):
        privleak(0.7, 0.0)


def test_forget_quality_is_scipys_two_sample_ks_p_value():
    rng = np.random.default_rng(2)
    a, b = rng.normal(1.0, 0.3, 40), rng.normal(1.1, 0.3, 35)
    fq = forget_quality(a, b)
    ref = ks_2samp(a, b)
    assert fq["pvalue"] == ref.pvalue and fq["statistic"] == ref.statistic and fq["n"] == [40, 35]
    assert forget_quality(a, a)["pvalue"] == 1.0
    assert forget_quality(a, a + 5)["pvalue"] < 1e-10


def test_rouge_l_on_known_strings():
    r = rouge_l("the cat on a mat", "the cat sat on the mat")  # LCS "the cat on mat" = 4
    assert (r["precision"], r["recall"]) == (pytest.approx(4 / 5), pytest.approx(4 / 6))
    assert r["f"] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))
    assert rouge_l("a b c", "a b c")["f"] == 1.0
    assert rouge_l("x y", "a b c")["f"] == 0.0 and rouge_l("", "a b")["f"] == 0.0
    assert rouge_l("Cat", "cat")["f"] == 0.0  # whitespace tokens, case kept
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # CLRS's example
    try:  # same numbers as Google's rouge-score where its tokeniser (lower-case alphanumerics) agrees
        from rouge_score import rouge_scorer
    except ImportError:
        return
    sc = rouge_scorer.RougeScorer(["rougeL"])
    for pred, ref in [("the cat on a mat", "the cat sat on the mat"), ("one two three four", "four three two one"),
                      ("a b a b a", "b a b b a a")]:
        assert rouge_l(pred, ref)["f"] == pytest.approx(sc.score(ref, pred)["rougeL"].fmeasure)


# ----- adapters ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(tiny_llama)


def test_hf_adapter_equals_the_projects_scorer_and_the_vocabulary_statistics(tiny_model, alpaca_sample):
    import torch

    from s3t_llm.evaluation import HFScorer, heldout_loss

    model, tok = tiny_model
    recs = alpaca_sample[:6]
    got = A.score_records_hf(model, tok, recs, max_length=160, batch_size=4)
    scorer = HFScorer(model, tok)
    pairs = [A.encode_record(tok, r, "alpaca", 160) for r in recs]
    ll = scorer.loglikelihood_tokens(pairs)
    for g, (sum_ll, _), (_, cont) in zip(got, ll, pairs):
        assert len(g.logprobs) == len(cont) and g.logprobs.sum() == pytest.approx(sum_ll, abs=1e-4)
    per_sample = heldout_loss(scorer, recs, "alpaca", 160)["per_sample"]  # the project's held-out loss
    np.testing.assert_allclose([g.loss for g in got], per_sample, atol=1e-5)
    ctx, cont = pairs[0]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([(ctx + cont)[:-1]])).logits[0, len(ctx) - 1:].double().numpy()
    _, mu, s2 = _dist_stats(logits)
    np.testing.assert_allclose(got[0].mu, mu, atol=1e-5)
    np.testing.assert_allclose(got[0].sigma2, s2, rtol=1e-4, atol=1e-6)
    assert got[0].text == recs[0]["output"]


def test_audit_model_of_a_model_against_itself_and_against_a_perturbed_copy(tiny_model, alpaca_sample):
    """audit_model on one model: every attack has an AUC; compared with itself, PrivLeak is 0 and the forget
    quality p-value is 1; a copy whose output head is changed is told apart by the KS test."""
    import copy

    import torch

    model, tok = tiny_model
    mem, non = alpaca_sample[:10], alpaca_sample[10:20]
    ref = (A.score_records_hf(model, tok, mem, max_length=128), A.score_records_hf(model, tok, non, max_length=128))
    res = A.audit_model(model, tok, mem, non, max_length=128, reference=ref, n_boot=50, max_new_tokens=4)
    assert set(res["attacks"]) == set(A.ATTACKS) and res["n_members"] == sum(x is not None for x in ref[0]) >= 8
    assert res["n_nonmembers"] == sum(x is not None for x in ref[1]) >= 8  # a response cut away is left out
    assert all(0.0 <= res["attacks"][a]["auc"] <= 1.0 for a in A.ATTACKS)
    assert res["attacks"]["reference"]["auc"] == 0.5  # loss minus the same model's loss: all ties
    assert 0.0 <= res["rouge_l_f"] <= 1.0
    same = A.compare_to_oracle(res, res)
    assert all(v["privleak"] == 0.0 for v in same["privleak"].values() if v) and same["forget_quality"]["pvalue"] == 1.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)
    res2 = A.audit_model(other, tok, mem, non, max_length=128, n_boot=50, generate=False)
    assert "reference" not in res2["attacks"] and "rouge_l_f" not in res2
    assert A.compare_to_oracle(res2, res)["forget_quality"]["pvalue"] < 0.01


class _FakeVLLM:
    """Answers /v1/completions with prompt_logprobs computed by a transformers model (str token keys, as JSON)."""

    def __init__(self, model):
        self.model, self.headers, self.calls = model, {}, []

    def post(self, url, json=None, timeout=None):
        import torch
        import torch.nn.functional as F

        assert url.endswith("/v1/completions") and json["prompt_logprobs"] == 1 and json["max_tokens"] == 1
        ids = json["prompt"]
        self.calls.append(json["model"])
        with torch.inference_mode():
            lp = F.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
        plp = [None] + [{str(ids[t]): {"logprob": float(lp[t - 1, ids[t]]), "rank": 1}} for t in range(1, len(ids))]

        class R:
            status_code = 200

            def json(self_):
                return {"choices": [{"index": 0, "text": "x", "prompt_logprobs": plp}]}
        return R()


def test_vllm_adapter_reads_prompt_logprobs_and_has_no_min_k_pp(tiny_model, alpaca_sample):
    model, tok = tiny_model
    recs = alpaca_sample[6:10]
    fake = _FakeVLLM(model)
    got = A.score_records_vllm("http://gw/v1", "run-s0-p0", tok, recs, max_length=160, session=fake)
    hf = A.score_records_hf(model, tok, recs, max_length=160)
    assert fake.calls == ["run-s0-p0"] * 4  # one prompt per request
    for g, h in zip(got, hf):
        np.testing.assert_allclose(g.logprobs, h.logprobs, atol=1e-4)
        assert not g.full_vocab
    with pytest.raises(FullVocabularyRequired):
        A.attack_scores(got, "min_k_pp")
    assert A.token_logprobs_from_prompt_logprobs([None, {"7": {"logprob": -1.5}}, {9: {"logprob": -0.5}}],
                                                 [1, 7, 9], 1).tolist() == [-1.5, -0.5]


# ----- `s3t audit` end to end ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def audited(tmp_path_factory, tiny_llama, alpaca_sample):
    from s3t_llm.deletion import apply_deletion, publish
    from s3t_llm.run import DATASET, Run
    from s3t_llm.training import train_run
    from tests.test_training import make_cfg

    tmp = tmp_path_factory.mktemp("audit")
    data = tmp / "data.json"
    data.write_text(json.dumps(alpaca_sample[:32]))  # 24 trained on (2 shards x 2 slices x 6), 8 held out
    run = Run.create(make_cfg(tmp, tiny_llama, data, name="aud",
                              extra=["s3t.shards=2", "s3t.slices=2", "data.heldout=8", "lora.r=4", "lora.alpha=8"]))
    train_run(run)
    publish(run)
    before = tmp / "before"
    shutil.copytree(run.dir, before)  # a copy still trained on the samples below
    last = run.sequences[0][-1]
    with run.ledger() as led:
        forget = led.slice_samples(DATASET, 0, last)[:3] + led.slice_samples(DATASET, 1, last)[:1]
    ids = [sid for sid, _ in forget]
    apply_deletion(run, ids)  # both shards drop their last slice and serve a 1-block prefix
    (tmp / "ids.txt").write_text("\n".join(ids))
    (tmp / "forget.jsonl").write_text("".join(json.dumps({"id": sid, **rec}) + "\n" for sid, rec in forget))
    return {"run": run, "before": before, "ids": ids, "records": dict(forget), "tmp": tmp, "last": last}


def test_s3t_audit_end_to_end(audited, capsys):
    from s3t_llm.cli import main
    from s3t_llm.run import Run

    run, tmp, ids = audited["run"], audited["tmp"], audited["ids"]
    out = tmp / "audit.json"
    # The run itself is a valid oracle after the deletion (nothing it serves saw the deleted samples): then the
    # served and oracle numbers are the same model's, so PrivLeak is 0 and the KS p-value 1, exactly.
    rc = main(["audit", str(run.dir), "--ids", str(tmp / "ids.txt"), "--data", str(tmp / "forget.jsonl"),
               "--unseen", "8", "--oracle", str(run.dir), "--n-boot", "200", "--max-new-tokens", "8",
               "--output", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    res = json.loads(out.read_text())
    assert res["n_members"] == 4 and res["n_deleted"] == 4 and res["n_unseen"] == 8
    routing = Run.open(run.dir).desired_routing()
    for shard, a in res["served_adapters"].items():  # each sample scored by its own shard's current adapter
        assert a["name"] == routing[int(shard)]["name"]
    assert audited["last"] not in res["served_adapters"]["0"]["prefix"] and len(res["served_adapters"]["0"]["ids"]) == 3
    for model in ("served", "oracle", "base"):
        for attack, r in res["attacks"][model].items():
            assert 0.0 <= r["ci"][0] <= r["auc"] <= r["ci"][1] <= 1.0, (model, attack, r)
            assert r["n_members"] == 4
    assert set(res["attacks"]["served"]) == set(A.ATTACKS)  # Min-K%++ included (offline backend)
    assert res["attacks"]["served"]["loss"]["auc"] == res["attacks"]["oracle"]["loss"]["auc"]
    assert all(p["privleak"] == 0.0 for p in res["privleak"].values() if p)
    assert res["forget_quality"]["pvalue"] == 1.0
    assert set(res["verbatim"]) == {"served", "oracle", "base"}
    assert all(0.0 <= v <= 1.0 for v in res["verbatim"]["served"]["per_sample"].values())
    assert "| Min-K%++ (k=20%) |" in printed and "forget quality" in printed
    body = out.read_text()  # ids and numbers only: none of the deleted records' text
    assert not any(rec["output"] in body for rec in audited["records"].values() if len(rec["output"]) > 20)


def test_s3t_audit_matches_the_pure_functions_on_the_same_scores(audited, monkeypatch):
    """The run-level numbers are the pure metrics applied to the adapter's arrays (spy on the scorer)."""
    run, tmp, ids = audited["run"], audited["tmp"], audited["ids"]
    seen = []
    real = A.score_records_hf

    def spy(model, tok, recs, **kw):
        got = real(model, tok, recs, **kw)
        seen.append(([r["output"] for r in recs], got))
        return got

    monkeypatch.setattr(A, "score_records_hf", spy)
    ids_, given = A.load_ids_and_records(tmp / "forget.jsonl")  # the records themselves as the ids file
    assert ids_ == ids
    res = A.audit_run(run.dir, ids_, given, unseen=8, n_boot=50, generate=False)
    # calls: base members, base unseen, then (members, unseen) per served shard with members (0, then 1)
    base_m, base_h = seen[0][1], seen[1][1]
    s0_m, s0_h, s1_m, s1_h = (seen[i][1] for i in range(2, 6))
    keep = lambda xs: [x for x in xs if x is not None]  # noqa: E731
    groups = [(A.attack_scores(keep(s0_m), "loss"), A.attack_scores(keep(s0_h), "loss")),
              (A.attack_scores(keep(s1_m), "loss"), A.attack_scores(keep(s1_h), "loss"))]
    assert res["attacks"]["served"]["loss"]["auc"] == pytest.approx(A.auc_groups(groups))
    assert res["attacks"]["base"]["min_k"]["auc"] == pytest.approx(
        auc([min_k_score(s.logprobs) for s in keep(base_m)], [min_k_score(s.logprobs) for s in keep(base_h)]))
    assert res["privleak"] is None and res["forget_quality"] is None and "verbatim" not in res


def test_s3t_audit_bad_input_is_refused_before_anything_is_scored(audited, monkeypatch, capsys, tmp_path):
    from s3t_llm.cli import main
    from s3t_llm.config import load_config
    from s3t_llm.run import Run

    def boom(*a, **k):
        raise AssertionError("scored before the input was checked")

    monkeypatch.setattr(A, "score_records_hf", boom)
    monkeypatch.setattr(A, "_load_base", boom)
    run, tmp, ids = audited["run"], audited["tmp"], audited["ids"]

    def err(*argv):
        rc = main(["audit", *map(str, argv)])
        e = capsys.readouterr().err
        assert rc == 2, e
        return e

    (tmp_path / "unknown.txt").write_text("\n".join(ids[:2] + ["no-such-id"]))
    assert "unknown to run aud: no-such-id" in err(run.dir, "--ids", tmp_path / "unknown.txt")
    assert "erased" in err(run.dir, "--ids", tmp / "ids.txt")  # deleted, and no --data
    wrong = [{"id": sid, **rec, "output": rec["output"] + " (edited)"} for sid, rec in audited["records"].items()]
    (tmp_path / "wrong.json").write_text(json.dumps(wrong))
    assert "tombstone" in err(run.dir, "--ids", tmp / "ids.txt", "--data", tmp_path / "wrong.json")
    assert "too few samples" in err(run.dir, "--ids", tmp / "forget.jsonl", "--unseen", "1")
    held = [r["id"] for r in run.heldout()[:2]]
    (tmp_path / "held.txt").write_text("\n".join(held))
    assert "held-out" in err(run.dir, "--ids", tmp_path / "held.txt")
    # The copy made before the deletion serves adapters trained on these samples: not an oracle.
    assert "not an oracle" in err(run.dir, "--ids", tmp / "forget.jsonl", "--oracle", audited["before"])
    # A run with nothing trained serves nothing.
    info = json.loads((run.dir / "run.json").read_text())
    cfg = load_config(info["config"], [f"output_dir={tmp_path / 'runs'}", "name=empty"])
    empty = Run.create(cfg)
    assert "no live shard" in err(empty.dir, "--ids", tmp / "forget.jsonl")
    # Before the deletion the same ids are live: their records come from the ledger, no --data needed.
    monkeypatch.undo()
    res = A.audit_run(audited["before"], ids, unseen=8, n_boot=20, generate=False)
    assert res["n_deleted"] == 0 and res["n_members"] == 4
