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
# ethtool: the multi-host test's frame relay turns veth offloads off (where the kernel has no netem).
command -v ethtool >/dev/null 2>&1 || [ -x /usr/sbin/ethtool ] || [ -x /sbin/ethtool ] || MISSING+=(ethtool)
# A CJK font (1.6 MB): explanation reports of Chinese prompts are checked rendered in the browser test.
command -v fc-list >/dev/null 2>&1 && fc-list :lang=zh | grep -q . || MISSING+=(fonts-wqy-microhei)
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
  # The torch build for this machine (CUDA where nvidia-smi sees a GPU, else CPU): scripts/torch-build.sh.
  TORCH_ARGS=()
  TORCH_TEXT=$(scripts/torch-build.sh .venv)  # set -e stops here if it fails
  [ -z "$TORCH_TEXT" ] || mapfile -t TORCH_ARGS <<<"$TORCH_TEXT"
  echo "[setup] installing the pinned set (constraints.txt)"
  pip install -q --upgrade pip
  pip install -q -c constraints.txt "${TORCH_ARGS[@]}" -e ".[test]"
  touch .venv/.fedseek-installed
fi
echo "[setup] ready: $(python -c 'import torch, flwr, opacus, peft, shap, transformers; print(f"torch {torch.__version__}, flwr {flwr.__version__}, opacus {opacus.__version__}, peft {peft.__version__}, shap {shap.__version__}, transformers {transformers.__version__}")')"
