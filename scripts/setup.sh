#!/usr/bin/env bash
# Set up a fresh machine for FedSeek: Debian packages, a virtualenv, pinned Python packages.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages, each only if its command is missing: stunnel4 (the sites' mTLS sidecars),
# nginx (the coordinator's fleet gateway; fedseek runs its own unprivileged instance, the
# system service is not used) and chromium (the test that renders an explanation report headless).
MISSING=()
command -v stunnel4 >/dev/null 2>&1 || command -v stunnel >/dev/null 2>&1 || MISSING+=(stunnel4)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || MISSING+=(nginx)
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
# nsenter: the operator's `flwr` commands join the SuperLink's private network namespace.
command -v nsenter >/dev/null 2>&1 || MISSING+=(util-linux)
# prometheus + promtool: the monitoring test scrapes a running consortium and checks the alert rules.
command -v promtool >/dev/null 2>&1 || MISSING+=(prometheus)
if [ ${#MISSING[@]} -gt 0 ]; then
  echo "[setup] installing Debian packages: ${MISSING[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${MISSING[@]}" >/dev/null
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
if [ ! -f .venv/.fedseek-installed ] || [ pyproject.toml -nt .venv/.fedseek-installed ] \
  || [ constraints.txt -nt .venv/.fedseek-installed ]; then
  # The torch build for this machine: with an NVIDIA GPU (nvidia-smi answers) the default PyPI wheel,
  # which is the CUDA build; without one (CI) the CPU build, pinned as `+cpu` on top of constraints.txt
  # so pip cannot pick the multi-GB CUDA wheel. The CPU wheel comes from pip's find-links where one lies
  # on disk, else from PyTorch's CPU index. FEDSEEK_TORCH=cpu|cuda overrides the detection.
  TORCH_PIN=$(sed -n 's/^torch==\([^+ ]*\).*/\1/p' constraints.txt)
  TORCH_BUILD=${FEDSEEK_TORCH:-$(nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)}
  PIP_ARGS=(-c constraints.txt)
  if [ "$TORCH_BUILD" = cpu ]; then
    echo "torch==${TORCH_PIN}+cpu" > .venv/torch-cpu.txt
    PIP_ARGS+=(-c .venv/torch-cpu.txt)
    LINKS="${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}"
    if ! compgen -G "${LINKS:-/nonexistent}/torch-${TORCH_PIN}+cpu-*.whl" >/dev/null; then
      PIP_ARGS+=(--extra-index-url https://download.pytorch.org/whl/cpu)
    fi
  fi
  echo "[setup] installing the pinned set (constraints.txt, torch ${TORCH_PIN} ${TORCH_BUILD} build)"
  pip install -q --upgrade pip
  pip install -q "${PIP_ARGS[@]}" -e ".[test]"
  touch .venv/.fedseek-installed
fi
echo "[setup] ready: $(python -c 'import torch, flwr, opacus, peft, shap, transformers; print(f"torch {torch.__version__}, flwr {flwr.__version__}, opacus {opacus.__version__}, peft {peft.__version__}, shap {shap.__version__}, transformers {transformers.__version__}")')"
