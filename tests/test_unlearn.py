"""Approximate unlearning (DEL and the gradient baselines) on a tiny trained run: what moves and what must not."""

import json
import shutil

import pytest

torch = pytest.importorskip("torch")

from s3t_llm.deletion import publish, serving_plan  # noqa: E402
from s3t_llm.ledger import UnknownSampleError  # noqa: E402
from s3t_llm.prompts import to_example  # noqa: E402
from s3t_llm.run import DATASET, Run  # noqa: E402
from s3t_llm.training import train_run  # noqa: E402
from s3t_llm.unlearn import (  # noqa: E402
    MANIFEST,
    example_losses,
    finetune_masked,
    gradient_baseline,
    load_adapter_model,
    localize,
    mask_stats,
    membership_auc,
    random_rows,
    reset,
    select_rows,
    served_adapter,
    tokenize_examples,
    unlearn,
)
from tests.test_training import make_cfg  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared CPU, two spinning OpenMP threads are many times slower for tiny models."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_llama, alpaca_sample):
    d = tmp_path_factory.mktemp("unlearn")
    data = d / "data.json"
    data.write_text(json.dumps(alpaca_sample[:24]))
    run = Run.create(make_cfg(d, tiny_llama, data, name="unl", extra=["s3t.slices=2", "train.epochs=2"]))
    train_run(run, progress=False)
    publish(run)
    return run.dir


def forget_ids(run, n=4):
    plan = serving_plan(run)[0]
    with run.ledger() as led:
        return [sid for sid, _ in led.slice_samples(DATASET, 0, plan["prefix"][-1])[:n]]


def examples(run, ids, tok):
    with run.ledger() as led:
        cells = led.cell_of(DATASET, ids)
        recs = {sid: rec for s, sl in set(cells.values()) for sid, rec in led.slice_samples(DATASET, s, sl)}
    return [to_example(recs[i], "alpaca", tok) for i in ids]


def model_of(run):
    src = served_adapter(run, 0)
    model, tok = load_adapter_model(run, src["tensors"], src["layers"])
    return model, tok, src


# ----- localisation -------------------------------------------------------------------------------------------
def test_row_selection_from_known_criticality():
    # Row scores: "w" rows: mean 3, 2, 1, 0; "v" rows: one spike (topk wins, mean loses) and a flat row.
    G = {
        "w.lora_B.default.weight": torch.tensor([[3., 3., 3., 3.], [2., 2., 2., 2.], [1., 1., 1., 1.], [0., 0., 0., 0.]]),
        "v.lora_B.default.weight": torch.tensor([[7., 0., 0., 0.], [2.5, 2.5, 2.5, 2.5]]),
    }
    rows = lambda m: {(n[0], i) for n, t in m.items() for i in t.nonzero().flatten().tolist()}  # noqa: E731
    # 24 parameters; alpha 0.5 -> 12 -> exactly 3 rows of 4.
    assert rows(select_rows(G, 0.5, "mean")) == {("w", 0), ("v", 1), ("w", 1)}  # means 3, 2.5, 2 (v0: 1.75)
    assert rows(select_rows(G, 0.5, "topk", topk_frac=0.25)) == {("v", 0), ("w", 0), ("v", 1)}  # top-1: 7, 3, 2.5
    # A budget that splits a row (alpha 0.3 -> 7 parameters) takes whole rows only: 1 row, never 1.75.
    m = select_rows(G, 0.3, "mean")
    assert rows(m) == {("w", 0)}
    # Ties break by (name, row): equal scores everywhere -> the first rows of the first name in sorted order.
    flat = {k: torch.ones_like(v) for k, v in G.items()}
    assert rows(select_rows(flat, 0.34, "mean")) == {("v", 0), ("v", 1)}
    with pytest.raises(ValueError, match="alpha"):
        select_rows(G, 0.0)
    with pytest.raises(ValueError, match="variant"):
        select_rows(G, 0.3, "max")


def test_random_localization_has_the_same_budget():
    shapes = {"a.lora_B.default.weight": (64, 8), "b.lora_B.default.weight": (32, 8), "c.lora_B.default.weight": (96, 8)}
    G = {n: torch.rand(s) for n, s in shapes.items()}
    for alpha in (0.05, 0.3, 0.77):
        sel, rnd = select_rows(G, alpha), random_rows(shapes, alpha, seed=1)
        n_sel = sum(int(m.sum()) for m in sel.values())
        n_rnd = sum(int(m.sum()) for m in rnd.values())
        assert n_sel == n_rnd == int(alpha * 192 * 8) // 8
    assert not all(torch.equal(random_rows(shapes, 0.3, 1)[n], random_rows(shapes, 0.3, 2)[n]) for n in shapes)
    assert all(torch.equal(random_rows(shapes, 0.3, 1)[n], random_rows(shapes, 0.3, 1)[n]) for n in shapes)


def test_localize_finds_the_rows_that_carry_the_forget_gradient(tiny_llama, alpaca_sample):
    """B is zero except a few chosen rows, so theta * grad is non-zero exactly there: DEL must find them."""
    from peft import LoraConfig, get_peft_model

    from s3t_llm.models import load_base

    base, tok = load_base(str(tiny_llama), "fp32")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "up_proj"],
                                            layers_to_transform=[2, 3], layers_pattern="layers", task_type="CAUSAL_LM"))
    bs = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    chosen = {(next(n for n in bs if "layers.3.self_attn.q_proj" in n), 5),
              (next(n for n in bs if "layers.2.mlp.down_proj" in n), 0),
              (next(n for n in bs if "layers.2.mlp.up_proj" in n), 17)}
    with torch.no_grad():
        for n, i in chosen:
            bs[n][i] = 0.3 * torch.randn(4)
    forget = [to_example(r, "alpaca") for r in alpaca_sample[:6]]
    total = sum(p.numel() for p in bs.values())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for variant in ("mean", "topk"):
        mask = localize(model, forget, tok, alpha=3 * 4 / total + 1e-9, variant=variant, max_length=160)
        assert {(n, i) for n, m in mask.items() for i in m.nonzero().flatten().tolist()} == chosen
    assert mask_stats(model, mask)["params"] == 12 and mask_stats(model, mask)["modules_touched"] == 3
    rnd = localize(model, forget, tok, alpha=3 * 4 / total + 1e-9, variant="random")
    assert mask_stats(model, rnd)["params"] == 12
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # left as found
    assert all(p.grad is None for p in model.parameters())


def test_tokenization_matches_trl(tiny_llama, alpaca_sample, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    ex = [to_example(r, "alpaca") for r in alpaca_sample[:12]]
    args = SFTConfig(output_dir=str(tmp_path), max_length=64, completion_only_loss=True, report_to=[],
                     use_cpu=True)
    tr = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=args,
                    train_dataset=Dataset.from_list(ex), processing_class=tok)
    mine = [t for t in tokenize_examples(ex, tok, 64) if t is not None]
    assert [t["input_ids"] for t in mine] == list(tr.train_dataset["input_ids"])
    assert [t["labels"] for t in mine] == list(tr.train_dataset["labels"])


# ----- DEL: reset + masked fine-tuning -------------------------------------------------------------------
def test_del_moves_only_the_selected_rows(trained):
    run = Run.open(trained)
    model, tok, src = model_of(run)
    ids = forget_ids(run)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    mask = localize(model, examples(run, ids, tok), tok, alpha=0.2, max_length=160)
    stats = mask_stats(model, mask)
    assert stats["rows"] > 0 and stats["frac_of_B"] <= 0.2 and stats["modules_touched"] > 1
    assert reset(model, mask) == stats["params"]
    params = dict(model.named_parameters())
    sel_before = {n: before[n][m] for n, m in mask.items() if m.any()}
    assert all(float(v.abs().sum()) > 0 for v in sel_before.values())  # they were trained ...
    assert all(float(params[n][m].abs().sum()) == 0 for n, m in mask.items())  # ... and are now reset to zero
    with run.ledger() as led:
        retain = [to_example(r, "alpaca") for sl in src["prefix"] for sid, r in led.slice_samples(DATASET, 0, sl)
                  if sid not in ids]
    info = finetune_masked(model, mask, retain, tok, epochs=1, lr=1e-3, batch_size=4, max_length=160)
    assert info["steps"] == -(-len(retain) // 4)
    after = model.state_dict()
    n_base = 0
    for n, t in after.items():
        if "lora_B" in n and n in mask:
            keep = ~mask[n]
            assert torch.equal(t[keep], before[n][keep]), n  # unselected rows: bit-identical
            if mask[n].any():
                assert float(t[mask[n]].abs().min()) > 0  # reset rows were trained (no entry left at 0)
                assert not torch.equal(t[mask[n]], before[n][mask[n]])
        else:
            assert torch.equal(t, before[n]), n  # lora_A and every base weight
            n_base += "lora_" not in n
    assert n_base > 20


def test_unlearn_writes_a_servable_adapter_and_a_manifest(trained, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    run = Run.open(trained)
    ids = forget_ids(run, 3)
    path = unlearn(trained, ids, "del", alpha=0.1, epochs=1, out_name="del-test")
    assert path == run.dir / "unlearned" / "del-test"
    man = json.loads((path / MANIFEST).read_text())
    assert man["method"] == "del" and man["forget_ids"] == ids and man["guarantee"].startswith("none")
    assert man["reset"]["params_reset"] == man["reset"]["params"] > 0 and man["seconds"] > 0
    cfg = json.loads((path / "adapter_config.json").read_text())
    src = served_adapter(run, 0)
    assert cfg["layers_to_transform"] == src["layers"] and cfg["peft_type"] == "LORA"
    saved = load_file(str(path / "adapter_model.safetensors"))
    assert set(saved) == set(src["tensors"])
    changed = {k for k in saved if not torch.equal(saved[k], src["tensors"][k])}
    assert changed == set(man["reset"]["rows_per_module"])  # exactly the touched B matrices differ
    assert all(".lora_B." in k for k in changed)
    # PEFT loads it, and it computes what the in-memory model computes.
    model, _ = load_adapter_model(run, saved, src["layers"])
    x = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8]])
    with torch.no_grad():
        mem = model.eval()(input_ids=x).logits
        disk = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run.model_path), str(path)).eval()(
            input_ids=x).logits
    assert torch.allclose(mem, disk, atol=1e-5, rtol=0)
    # The run itself is untouched: the same adapter is served, nothing was deleted.
    assert serving_plan(run)[0]["name"] == src["name"]
    with run.ledger() as led:
        assert led.deleted_ids(DATASET) == set()
    with pytest.raises(FileExistsError):
        unlearn(trained, ids, "del", alpha=0.1, out_name="del-test")


# ----- gradient baselines --------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ga", "graddiff", "npo", "npo_rt"])
def test_gradient_baselines_raise_the_forget_loss_and_touch_only_lora(trained, method):
    run = Run.open(trained)
    model, tok, src = model_of(run)
    ids = forget_ids(run)
    forget = examples(run, ids, tok)
    with run.ledger() as led:
        retain = [to_example(r, "alpaca") for sid, r in led.slice_samples(DATASET, 0, src["prefix"][0])]
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    loss0 = sum(example_losses(model, tok, forget, max_length=160))
    info = gradient_baseline(model, method, forget, retain, tok, epochs=3, lr=2e-3, batch_size=2, max_length=160)
    assert info["steps"] == 6
    loss1 = sum(example_losses(model, tok, forget, max_length=160))
    assert loss1 > loss0, (method, loss0, loss1)
    after = model.state_dict()
    moved = {n for n in after if not torch.equal(after[n], before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_A" in n for n in moved) and any("lora_B" in n for n in moved)


def test_membership_auc():
    assert membership_auc([0.1, 0.2], [1.0, 2.0]) == 1.0
    assert membership_auc([1.0, 2.0], [0.1, 0.2]) == 0.0
    assert membership_auc([1.0], [1.0]) == 0.5
    assert membership_auc([0.1, 3.0], [1.0, 2.0]) == 0.5


def test_bad_requests(trained, tmp_path):
    run = Run.open(trained)
    ids = forget_ids(run, 2)
    out = run.dir / "unlearned"
    listing = sorted(p.name for p in out.iterdir()) if out.exists() else []
    with pytest.raises(UnknownSampleError, match="nope"):
        unlearn(trained, [ids[0], "nope"], "ga")
    with pytest.raises(ValueError, match="method"):
        unlearn(trained, ids, "retrain")
    with pytest.raises(ValueError, match="alpha"):
        unlearn(trained, ids, "del", alpha=1.5)
    with pytest.raises(ValueError, match="duplicates"):
        unlearn(trained, [ids[0], ids[0]], "ga")
    # After an exact deletion the served (shorter) prefix never saw the sample: nothing to unlearn.
    clone = Run.open(shutil.copytree(trained, tmp_path / "clone"))
    with clone.ledger() as led:
        led.journal_deletion(DATASET, ids[:1])
    with pytest.raises(ValueError, match="not trained on"):
        unlearn(clone.dir, ids[:1], "ga")
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else []) == listing  # nothing written
