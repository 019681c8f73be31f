import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from s3t_llm.paths import alpaca_path  # noqa: E402


@pytest.fixture(scope="session")
def alpaca_sample():
    """A few hundred real Alpaca records (with explicit ids so that editing content keeps cells)."""
    from s3t_llm.records import load_records

    if not alpaca_path().exists():
        pytest.skip(f"shared Alpaca file not found at {alpaca_path()}")
    recs = load_records(alpaca_path())[:400]
    return [{"id": f"a{i:04d}", **{k: r[k] for k in ("instruction", "input", "output")}} for i, r in enumerate(recs)]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, alpaca_sample):
    """A tiny random Llama (4 layers, head_dim 64) with its own small tokenizer."""
    from s3t_llm.models import build_tiny_llama

    d = tmp_path_factory.mktemp("tiny-llama")
    corpus = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in alpaca_sample]
    return build_tiny_llama(d, corpus=corpus, num_layers=4, vocab_size=1024)


@pytest.fixture()
def write_records(tmp_path):
    def _write(records, name="data.json"):
        p = tmp_path / name
        p.write_text(json.dumps(records))
        return p
    return _write
