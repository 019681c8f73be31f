"""Zero-shot multiple-choice evaluation: task specs, loaders, scorers, metrics and the shard ensemble."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from s3t_llm.evaluation import (
    HFScorer,
    Item,
    Task,
    TaskError,
    VLLMCompletionsScorer,
    encode_pair,
    ensemble_probs,
    evaluate,
    export_lm_eval_task,
    format_results,
    list_tasks,
    load_task,
)
from s3t_llm.paths import shared_data_dir

SHIPPED = ["arc_challenge", "arc_easy", "boolq", "hellaswag", "mmlu", "openbookqa", "piqa", "winogrande"]
FULL_COUNTS = {"piqa": 1838, "arc_easy": 2376, "arc_challenge": 1172, "boolq": 3270, "winogrande": 1267,
               "openbookqa": 500, "hellaswag": 10042, "mmlu": 14042}

needs_data = pytest.mark.skipif(not (shared_data_dir() / "eval").is_dir(),
                                reason=f"shared benchmark data not found at {shared_data_dir() / 'eval'}")


# ------------------------------------------------------------------------------------------------ shipped specs

def test_shipped_specs_are_listed():
    assert set(SHIPPED) <= set(list_tasks())


@needs_data
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_task_loads_with_limit(name):
    t = load_task(name, limit=25, seed=1)
    assert t.name == name and len(t) == 25 and t.n_total == FULL_COUNTS[name]
    assert [it.index for it in t.items] == sorted(it.index for it in t.items)
    for it in t.items:
        assert len(it.choices) >= 2
        assert 0 <= it.gold < len(it.choices)
        reqs = it.requests
        assert len(reqs) == len(it.choices)
        for ctx, cont in reqs:
            assert isinstance(ctx, str) and ctx and cont.startswith(" ") and len(cont) > 1


@needs_data
def test_full_task_counts_match_the_data_readme():
    got = {name: load_task(name).n_total for name in FULL_COUNTS}
    assert got == FULL_COUNTS
    mmlu = load_task("mmlu")
    assert len({it.group for it in mmlu.items}) == 57
    assert sum(it.group == "s3t_mmlu_abstract_algebra" for it in mmlu.items) == 100


@needs_data
def test_limit_is_a_fixed_seeded_subset():
    a = [it.index for it in load_task("piqa", limit=30, seed=0).items]
    b = [it.index for it in load_task("piqa", limit=30, seed=0).items]
    c = [it.index for it in load_task("piqa", limit=30, seed=1).items]
    assert a == b and a != c
    assert len(load_task("openbookqa", limit=10_000)) == 500


@needs_data
def test_prompts_follow_lm_eval_formats():
    arc = load_task("arc_easy").items[0]
    assert arc.context.startswith("Question: Which statement best explains why photosynthesis")
    assert arc.context.endswith("?\nAnswer:")
    assert arc.requests[0][1] == " Sunlight is the source of energy for nearly all ecosystems."

    boolq = load_task("boolq").items[0]
    assert boolq.choices == ("no", "yes") and boolq.gold == 0  # label "false"
    assert boolq.context.startswith("Ethanol fuel -- ")
    assert boolq.context.endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")

    piqa = load_task("piqa").items[0]
    assert piqa.context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert piqa.gold == 0 and piqa.choices[0].startswith("Provide the guinea pig with a cage full of")

    hs = load_task("hellaswag").items[0]
    assert hs.context == "Roof shingle removal: A man is sitting on a roof. He"  # lm-eval capitalises ctx_b
    assert hs.gold == 3 and hs.choices[3] == "starts pulling up roofing on a roof."

    obqa = load_task("openbookqa").items[0]
    assert obqa.context.endswith("they decide the best way to save money is to") and obqa.gold == 1

    wg = load_task("winogrande").items[0]
    assert wg.requests == [("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
                           ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases.")]
    assert wg.gold == 1

    mmlu = load_task("mmlu").items[0]
    assert mmlu.context == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.\n"
        "A. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert mmlu.choices == ("A", "B", "C", "D") and mmlu.gold == 1 and mmlu.group == "s3t_mmlu_abstract_algebra"

    arc_c = load_task("arc_challenge")
    assert {len(it.choices) for it in arc_c.items} == {3, 4, 5}


# ------------------------------------------------------------------------------------ loading (lm-eval tasks)

def test_old_dict_specs_are_refused():
    with pytest.raises(TaskError, match="retired"):
        load_task({"name": "t", "prompt": "{q}", "choices": "opts", "gold": "label"})


def test_unknown_task_name():
    with pytest.raises(TaskError, match="unknown lm-eval task 'nope_task'"):
        load_task("nope_task")
    with pytest.raises(TaskError, match="does not exist"):
        load_task("/nonexistent/nope.yaml")


def test_s3t_eval_tasks_is_an_lm_eval_include_path(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"q": "one?", "opts": ["a", "bb"], "label": 1}, {"q": "two?", "opts": ["ccc", "d"], "label": 0}]))
    (tmp_path / "my_t.yaml").write_text(
        "task: my_t\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {tmp_path / 'd.jsonl'}\n"
        "validation_split: validation\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{q}}\\nA:"\n' "doc_to_choice: '{{opts}}'\ndoc_to_target: label\n")
    monkeypatch.setenv("S3T_EVAL_TASKS", str(tmp_path))
    assert "my_t" in list_tasks()
    t = load_task("my_t")
    assert t.name == "my_t" and [it.choices for it in t.items] == [("a", "bb"), ("ccc", "d")]
    assert t.items[0].context == "Q: one?\nA:" and [it.gold for it in t.items] == [1, 0]


# --------------------------------------------------------------------------------------- metrics / ensemble

class FakeScorer:
    """Log-likelihood from a table keyed by (context, continuation)."""

    def __init__(self, table):
        self.table = table
        self.seen = []

    def loglikelihood(self, requests):
        self.seen.extend(requests)
        return [(self.table[r], False) for r in requests]


def _task(items, name="hand", metrics=("acc", "acc_norm")):
    return Task(name=name, items=items, n_total=len(items), metrics=list(metrics))


def test_acc_and_acc_norm_on_a_hand_built_task():
    # item 0: raw ll prefers the short wrong answer, per-character ll the long right one
    i0 = Item(index=0, context="Q0", choices=("ab", "abcdefgh"), gold=1, group="g1")
    # item 1: both metrics right; item 2: both wrong
    i1 = Item(index=1, context="Q1", choices=("yes", "no"), gold=0, group="g1")
    i2 = Item(index=2, context="Q2", choices=("x", "y", "z"), gold=2, group="g2")
    table = {("Q0", " ab"): -2.0, ("Q0", " abcdefgh"): -4.0,
             ("Q1", " yes"): -1.0, ("Q1", " no"): -3.0,
             ("Q2", " x"): -1.0, ("Q2", " y"): -2.0, ("Q2", " z"): -5.0}
    res = evaluate({"m": FakeScorer(table)}, [_task([i0, i1, i2])], progress=False)
    s = res["tasks"]["hand"]["scorers"]["m"]
    assert s["n"] == 3 and s["acc_correct"] == 1 and s["acc_norm_correct"] == 2
    assert s["acc"] == pytest.approx(1 / 3) and s["acc_norm"] == pytest.approx(2 / 3)
    assert s["acc_stderr"] == pytest.approx(math.sqrt((1 / 3) * (2 / 3) / 2))
    assert s["groups"] == {"g1": {"n": 2, "acc": 0.5}, "g2": {"n": 1, "acc": 0.0}}
    # one scorer: the ensemble is that scorer
    assert res["tasks"]["hand"]["ensemble"]["acc"] == s["acc"]
    assert "| hand | 3 | acc_norm | 66.67" in format_results(res)


def test_requests_are_deduplicated_and_partial_mode_scores_the_shared_continuation():
    it = Item(index=0, context=("The cat", "The dog"), choices=("The cat", "The dog"), gold=1, continuation="barked.")
    table = {("The cat", " barked."): -7.0, ("The dog", " barked."): -3.0}
    fake = FakeScorer(table)
    res = evaluate(fake, [_task([it, it], metrics=("acc",))], progress=False)
    assert sorted(fake.seen) == sorted(table)       # two items, same requests: scored once
    assert res["tasks"]["hand"]["scorers"]["model"]["acc"] == 1.0
    assert it.norm_lengths == [7, 7]                # partial: normalised by the shared continuation


def test_ensemble_averages_softmax_probabilities():
    it = Item(index=0, context="Q", choices=("a", "b"), gold=1)
    # scorer A: p = (0.9, 0.1) (confident, wrong); scorer B: p = (0.2, 0.8)
    la = {("Q", " a"): math.log(0.9), ("Q", " b"): math.log(0.1)}
    lb = {("Q", " a"): math.log(0.2) - 5.0, ("Q", " b"): math.log(0.8) - 5.0}  # an offset does not matter
    probs = ensemble_probs(it, [[la[r] for r in it.requests], [lb[r] for r in it.requests]])
    assert probs["acc"] == pytest.approx([0.55, 0.45])
    res = evaluate({"A": FakeScorer(la), "B": FakeScorer(lb)}, [_task([it])], progress=False, return_samples=True)
    tr = res["tasks"]["hand"]
    assert tr["scorers"]["A"]["acc"] == 0.0 and tr["scorers"]["B"]["acc"] == 1.0
    assert tr["ensemble"]["acc"] == 0.0             # 0.55 > 0.45: the mean of probabilities picks "a"
    assert res["samples"]["hand"][0]["ensemble_probs"] == pytest.approx([0.55, 0.45])
    # a third scorer tips it: mean((0.9,0.1),(0.2,0.8),(0.2,0.8)) = (0.433, 0.567)
    res = evaluate({"A": FakeScorer(la), "B": FakeScorer(lb), "C": FakeScorer(lb)}, [_task([it])], progress=False)
    assert res["tasks"]["hand"]["ensemble"]["acc"] == 1.0
    # acc_norm's ensemble averages the softmax of per-character log-likelihoods
    it2 = Item(index=0, context="Q", choices=("a", "bbbb"), gold=1)
    l2 = [-1.0, -2.0]
    p = ensemble_probs(it2, [l2])["acc_norm"]
    z = math.exp(-1.0) + math.exp(-0.5)
    assert p == pytest.approx([math.exp(-1.0) / z, math.exp(-0.5) / z])


# ------------------------------------------------------------------------------------------ real scorers

@pytest.fixture(scope="module")
def tiny_hf(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return model, tok


def _hand_ll(model, tok, context, continuation):
    import torch

    ctx = context.rstrip()
    cont = context[len(ctx):] + continuation
    whole = tok.encode(ctx + cont)
    n = len(tok.encode(ctx))
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(lp[i - 1, whole[i]].item() for i in range(n, len(whole))), whole[n:]


HAND_REQUESTS = [
    ("Give three tips for staying healthy.\nAnswer:", " Eat a balanced diet."),
    ("Below is an instruction that describes a task. ", "Write a response."),   # trailing space moves over
    ("Translate", " the sentence into French, please, and explain every word"),
    ("Give three tips for staying healthy.\nAnswer:", " Sleep."),
]


def test_hf_scorer_matches_a_hand_computation(tiny_hf):
    model, tok = tiny_hf
    scorer = HFScorer(model, tok, batch_size=3)
    got = scorer.loglikelihood(HAND_REQUESTS)
    for (ctx, cont), (ll, greedy) in zip(HAND_REQUESTS, got):
        hand, cont_ids = _hand_ll(model, tok, ctx, cont)
        assert ll == pytest.approx(hand, abs=1e-4)
        assert isinstance(greedy, bool)
        assert encode_pair(tok, ctx, cont)[1] == cont_ids
    # batch composition does not change the numbers
    single = [HFScorer(model, tok, batch_size=1).loglikelihood([r])[0][0] for r in HAND_REQUESTS]
    assert single == pytest.approx([g[0] for g in got], abs=1e-4)


def test_hf_scorer_greedy_flag_and_empty_context(tiny_hf):
    import torch

    model, tok = tiny_hf
    ctx = "Give three tips for staying healthy."
    ids = tok.encode(ctx)
    with torch.no_grad():
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
    greedy_cont = tok.decode([nxt])
    pairs = [(ids, [nxt]), (ids, [(nxt + 1) % len(tok)])]
    (_, g1), (_, g2) = HFScorer(model, tok).loglikelihood_tokens(pairs)
    assert g1 is True and g2 is False
    assert greedy_cont  # decodes to something
    ll, _ = HFScorer(model, tok).loglikelihood([("", "Give three")])[0]
    assert ll < 0 and math.isfinite(ll)
    assert HFScorer(model, tok).loglikelihood([("  ", "Give three")])[0][0] == pytest.approx(
        HFScorer(model, tok).loglikelihood([("", "  Give three")])[0][0], abs=1e-5)


def test_hf_scorer_left_truncates_like_lm_eval(tiny_hf):
    import torch

    model, tok = tiny_hf
    ctx, cont = encode_pair(tok, "Below is an instruction that describes a task. Write a response", " that helps.")
    max_len = len(cont) + 3
    ll, _ = HFScorer(model, tok, max_length=max_len).loglikelihood_tokens([(ctx, cont)])[0]
    seq = (ctx + cont)[-(max_len + 1):]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0], dim=-1)
    hand = sum(lp[i - 1, seq[i]].item() for i in range(len(seq) - len(cont), len(seq)))
    assert ll == pytest.approx(hand, abs=1e-4)


def test_evaluate_with_hf_scorer_end_to_end(tiny_hf):
    model, tok = tiny_hf
    items = [Item(index=i, context=f"Question {i}: give a tip.\nAnswer:", choices=("Eat well.", "Sleep more today."),
                  gold=i % 2) for i in range(4)]
    res = evaluate({"tiny": HFScorer(model, tok)}, [_task(items)], progress=False, return_samples=True)
    s = res["tasks"]["hand"]["scorers"]["tiny"]
    for sample, it in zip(res["samples"]["hand"], items):
        hand = [_hand_ll(model, tok, c, x)[0] for c, x in it.requests]
        assert sample["lls"]["tiny"] == pytest.approx(hand, abs=1e-4)
    assert 0.0 <= s["acc"] <= 1.0 and s["n"] == 4


def test_export_lm_eval_task_writes_rendered_items(tmp_path):
    import yaml

    it = Item(index=7, context="Q: x\nA:", choices=("a", "b"), gold=1)
    wg = Item(index=3, context=("c1", "c2"), choices=("c1", "c2"), gold=0, continuation="rest.")
    name = export_lm_eval_task(_task([it]), tmp_path)
    cfg = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
    assert cfg["dataset_path"] == "json" and cfg["doc_to_text"] == "context" and cfg["doc_to_target"] == "gold"
    assert cfg["dataset_kwargs"]["data_files"]["test"].endswith(f"{name}.jsonl")
    assert json.loads((tmp_path / f"{name}.jsonl").read_text()) == {"doc_index": 7, "gold": 1, "choices": ["a", "b"],
                                                                    "context": "Q: x\nA:"}
    name = export_lm_eval_task(_task([wg], name="wg", metrics=("acc",)), tmp_path)
    cfg = yaml.safe_load((tmp_path / f"{name}.yaml").read_text())
    assert cfg["doc_to_text"] == "gold" and cfg["doc_to_target"] == "continuation" and cfg["doc_to_choice"] == "choices"


# ------------------------------------------- VLLMCompletionsScorer against a stand-in server (no vLLM needed)

class _FakeVLLM(BaseHTTPRequestHandler):
    """Answers /v1/completions like vLLM: prompt_logprobs computed by the tiny HF model."""

    model = tok = None
    requests_seen: list = []

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        body = {"object": "list", "data": [{"id": "tiny", "root": "unused", "parent": None, "max_model_len": 512}]}
        self._send(200, body)

    def do_POST(self):
        import torch

        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests_seen.append(req)
        if self.path != "/v1/completions" or req.get("prompt_logprobs") is None:
            return self._send(400, {"error": "bad request"})
        choices = []
        for i, ids in enumerate(req["prompt"]):
            with torch.no_grad():
                lp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0], dim=-1)
            plp = [None]
            for pos in range(1, len(ids)):
                row = lp[pos - 1]
                tid = ids[pos]
                rank = int((row > row[tid]).sum()) + 1
                entry = {str(tid): {"logprob": float(row[tid]), "rank": rank, "decoded_token": "x"}}
                top = int(row.argmax())
                entry.setdefault(str(top), {"logprob": float(row[top]), "rank": 1, "decoded_token": "y"})
                plp.append(entry)
            choices.append({"index": i, "text": "x", "prompt_logprobs": plp, "finish_reason": "length"})
        self._send(200, {"id": "cmpl-1", "object": "text_completion", "model": req["model"], "choices": choices[::-1]})

    def _send(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_vllm_completions_scorer_protocol_against_stand_in_server(tiny_hf):
    model, tok = tiny_hf
    _FakeVLLM.model, _FakeVLLM.tok, _FakeVLLM.requests_seen = model, tok, []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeVLLM)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        scorer = VLLMCompletionsScorer(f"http://127.0.0.1:{srv.server_port}/v1", "shard-0", tokenizer=tok, batch_size=2)
        assert scorer.max_length == 510
        got = scorer.loglikelihood(HAND_REQUESTS)
        want = HFScorer(model, tok).loglikelihood(HAND_REQUESTS)
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
        assert [g[1] for g in got] == [w[1] for w in want]
        req = _FakeVLLM.requests_seen[0]
        assert req["model"] == "shard-0" and req["max_tokens"] == 1 and req["prompt_logprobs"] == 1
        assert all(isinstance(p, list) and all(isinstance(t, int) for t in p) for p in req["prompt"])
    finally:
        srv.shutdown()
        srv.server_close()


# ------------------------------------------------------------------------------------- real vLLM (slow)

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vllm_server_scorer_matches_hf_scorer(tiny_hf, tiny_llama, tmp_path):
    pytest.importorskip("vllm")
    import requests

    model, tok = tiny_hf
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    log = open(tmp_path / "vllm.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_llama), "--served-model-name",
         "tiny", "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "512", "--host", "127.0.0.1",
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited: {(tmp_path / 'vllm.log').read_text()[-3000:]}")
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail("vLLM server not ready in 240 s")
            time.sleep(2)
        scorer = VLLMCompletionsScorer(f"http://127.0.0.1:{port}", "tiny", tokenizer=tok)
        got = scorer.loglikelihood(HAND_REQUESTS)
        want = HFScorer(model, tok).loglikelihood(HAND_REQUESTS)
        for (g, _), (w, _), (ctx, cont) in zip(got, want, HAND_REQUESTS):
            n_tok = len(encode_pair(tok, ctx, cont)[1])
            assert g == pytest.approx(w, abs=0.05 * n_tok + 0.05), (ctx, cont)   # bf16 server vs fp32 HF
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.mark.slow
def test_vllm_offline_scorer_matches_hf_scorer(tiny_hf, tiny_llama, monkeypatch):
    vllm = pytest.importorskip("vllm")
    from s3t_llm.evaluation import VLLMOfflineScorer

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    model, tok = tiny_hf
    llm = vllm.LLM(model=str(tiny_llama), dtype="bfloat16", enforce_eager=True, max_model_len=512)
    try:
        scorer = VLLMOfflineScorer(llm)
        assert scorer.max_length == 510
        got = scorer.loglikelihood(HAND_REQUESTS)
        want = HFScorer(model, tok).loglikelihood(HAND_REQUESTS)
        for (g, _), (w, _), (ctx, cont) in zip(got, want, HAND_REQUESTS):
            n_tok = len(encode_pair(tok, ctx, cont)[1])
            assert g == pytest.approx(w, abs=0.05 * n_tok + 0.05), (ctx, cont)
    finally:
        try:  # stop the engine process now rather than at interpreter exit (quieter logs)
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        del llm


@pytest.mark.slow
def test_vllm_serves_exactly_the_peft_adapter_in_float32(tiny_llama, tmp_path, monkeypatch):
    """The served path computes the PEFT adapter itself, not an approximation: an S3T-shaped adapter (rsLoRA, every
    projection, only the top half of the layers) through vLLM's LoRA kernels in float32 gives transformers + PEFT's
    fp32 log-likelihoods to float rounding, while the adapter moves them far more than that. (In bf16 both move by
    bf16's precision: benchmarks/served_precision.py measures it on SmolLM2.)"""
    vllm = pytest.importorskip("vllm")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from vllm.lora.request import LoRARequest

    from s3t_llm.evaluation import VLLMOfflineScorer

    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)
    n = base.config.num_hidden_layers
    pm = get_peft_model(base, LoraConfig(
        r=8, lora_alpha=16, use_rslora=True, lora_dropout=0.0, layers_to_transform=list(range(n // 2, n)),
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # a trained-looking adapter: not the identity
    adapter = tmp_path / "adapter"
    pm.save_pretrained(str(adapter))
    want = [x for x, _ in HFScorer.from_pretrained(str(tiny_llama), adapter=str(adapter)).loglikelihood(HAND_REQUESTS)]
    plain = [x for x, _ in HFScorer.from_pretrained(str(tiny_llama)).loglikelihood(HAND_REQUESTS)]
    llm = vllm.LLM(model=str(tiny_llama), dtype="float32", enforce_eager=True, max_model_len=512, enable_lora=True,
                   max_loras=1, max_lora_rank=8)
    try:  # one prompt per call: vllm-cpu's engine dies on batched prompt_logprobs with LoRA
        got = [x for x, _ in VLLMOfflineScorer(llm, LoRARequest("a", 1, str(adapter)), batch_size=1)
               .loglikelihood(HAND_REQUESTS)]
    finally:
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001
            pass
        del llm
    worst = max(abs(g - w) for g, w in zip(got, want))
    effect = max(abs(w - b) for w, b in zip(want, plain))
    print(f"vLLM fp32 vs PEFT fp32: {worst:.2e} nats at most; the adapter moves them by up to {effect:.3f}")
    assert worst <= 1e-3 and effect >= 0.05 and effect > 50 * worst, (worst, effect, got, want)


@needs_data
def test_mmlu_subject_as_its_own_task():
    t = load_task("s3t_mmlu_anatomy")
    assert t.name == "s3t_mmlu_anatomy" and t.n_total == 135
    assert t.items[0].context.startswith("The following are multiple choice questions (with answers) about anatomy.")
