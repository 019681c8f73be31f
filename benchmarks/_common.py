"""Shared pieces of the benchmark scripts: device choice, base-model choice, data, Markdown tables.

Not part of the ``s3t_llm`` package; imported by the scripts beside it (``python benchmarks/X.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# Random-weight Llamas built from a LlamaConfig, for machines without hub access (e.g. a GPU box).
# "1b" follows Llama-3.2-1B's shape (hidden 2048, 16 layers, MLP 8192, 32 heads / 8 KV heads, tied
# embeddings) with a 32k vocabulary: about 1.04B parameters.
FROM_CONFIG = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=64, vocab_size=512, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=32000, tie_word_embeddings=True),
}


def add_model_args(ap) -> None:
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="base model: the alias smollm2-135m-instruct, a local model directory, or a hub id")
    ap.add_argument("--from-config", default=None, metavar="tiny|1b|FILE.json",
                    help="instead of --model, build a random-weight Llama from a LlamaConfig (a preset, or a JSON "
                         "file of LlamaConfig fields) and cache it; for throughput where no hub is reachable")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "8bit"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="cpu hides any GPU from torch; cuda fails without one; auto uses a GPU when present")
    ap.add_argument("--work-dir", default=None, help="where runs are written (default: a fresh temp dir)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's choice); 1 is steadier on a busy shared machine")


def setup_device(device: str, threads: int | None = None) -> str:
    """Must run before torch is imported: the stage trainer picks CUDA whenever torch sees a GPU."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    if threads:
        torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU")
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def alpaca_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` Alpaca records (a seeded random subset of ../shared/data's file), with explicit ids."""
    from s3t_llm.paths import alpaca_path
    from s3t_llm.records import load_records

    recs = load_records(alpaca_path())
    idx = random.Random(seed).sample(range(len(recs)), n)
    return [{"id": f"a{i:05d}", **{k: recs[i].get(k, "") for k in ("instruction", "input", "output")}}
            for i in sorted(idx)]


def write_records(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records))
    return path


def resolve_base(args) -> str:
    """The local directory (or hub id) of the base model named by --model / --from-config."""
    from s3t_llm.models import resolve_model

    if args.from_config:
        return str(build_from_config(args.from_config))
    return resolve_model(args.model)


def build_from_config(spec: str) -> Path:
    """A random-weight LlamaForCausalLM saved (bf16 on disk) under the s3t cache, built once per config.

    Its tokenizer is a small byte-level BPE trained on Alpaca text (as in ``build_tiny_llama``): the
    token counts differ from SmolLM2's, which does not matter for throughput.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from s3t_llm.models import build_tiny_llama
    from s3t_llm.paths import cache_dir

    if spec in FROM_CONFIG:
        fields = dict(FROM_CONFIG[spec])
    else:
        fields = json.loads(Path(spec).read_text())
    key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
    out = cache_dir() / "models" / f"random-llama-{Path(spec).stem}-{key}"
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    corpus = [r["instruction"] + " " + r["input"] + " " + r["output"] for r in alpaca_records(2000, seed=1)]
    tok_dir = out.parent / (out.name + ".tokenizer")
    # The tokenizer must fit the config's vocabulary; larger configs just leave embedding rows unused.
    build_tiny_llama(tok_dir, num_layers=1, hidden_size=128, vocab_size=min(int(fields["vocab_size"]), 8192),
                     corpus=corpus)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    if spec == "tiny":
        fields["vocab_size"] = len(tok)
    fields.setdefault("max_position_embeddings", 4096)
    cfg = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    print(f"built random Llama {spec}: {n / 1e9:.3f}B parameters in {time.perf_counter() - t0:.0f}s -> {out}")
    staging = out.parent / (out.name + ".staging")
    model.to(torch.bfloat16).save_pretrained(staging)
    tok.save_pretrained(staging)
    import shutil

    shutil.rmtree(tok_dir, ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    return out


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name(0)
    else:
        dev = f"CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    return f"{platform.node() or 'host'}: {dev}; torch {torch.__version__}"


def md_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in r] for r in rows]
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(out)


def write_result(text: str, out: str | Path) -> Path:
    """Print a markdown result and write it to ``out`` (parents created)."""
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return out
