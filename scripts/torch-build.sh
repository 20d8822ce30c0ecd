#!/usr/bin/env bash
# Which torch build this machine gets, as extra `pip install` arguments, one per line (scripts/setup.sh).
#   with an NVIDIA GPU (nvidia-smi lists one): nothing extra; constraints.txt's torch==X from PyPI is the CUDA build
#   without one (CI): `-c DIR/torch-cpu.txt` pinning torch==X+cpu, so pip cannot pick the multi-GB CUDA wheel;
#     the wheel comes from pip's find-links where it lies on disk, else PyTorch's CPU index is added.
# FEDSEEK_TORCH=cpu|cuda overrides the detection. Usage: scripts/torch-build.sh DIR (where torch-cpu.txt goes).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: scripts/torch-build.sh DIR}
pin=$(sed -n 's/^torch==\([^+ ;]*\).*/\1/p' constraints.txt)
[ -n "$pin" ] || { echo "torch-build: constraints.txt pins no torch" >&2; exit 1; }
build=${FEDSEEK_TORCH:-$(nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)}
case "$build" in
  cuda) echo "[setup] torch $pin: CUDA build (PyPI)" >&2 ;;
  cpu)
    echo "torch==${pin}+cpu" > "$out/torch-cpu.txt"
    printf '%s\n' -c "$out/torch-cpu.txt"
    links=${PIP_FIND_LINKS:-$(pip config get global.find-links 2>/dev/null || true)}
    found=""
    for dir in $links; do
      compgen -G "${dir#file://}/torch-${pin}+cpu-*.whl" >/dev/null && found=$dir
    done
    if [ -n "$found" ]; then
      echo "[setup] torch $pin: CPU build from $found" >&2
    else
      echo "[setup] torch $pin: CPU build from PyTorch's CPU index" >&2
      printf '%s\n' --extra-index-url https://download.pytorch.org/whl/cpu
    fi
    ;;
  *) echo "torch-build: FEDSEEK_TORCH must be cpu or cuda, not '$build'" >&2; exit 2 ;;
esac
