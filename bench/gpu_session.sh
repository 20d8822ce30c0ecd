#!/usr/bin/env bash
# The GPU measurements left open, in the order they matter, for one call each on the lent machine
# (`run` with carry [".whl"], after scripts/device-wheels.sh here): `bash bench/gpu_session.sh explain`,
# then `greedy`, then `mla`. Each part ends inside 560 s and writes under $OUT.
set -u
export PYTHONUNBUFFERED=1 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T0=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
[ -d /tmp/site/transformers ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
ln -sfn "$PWD/examples" /tmp/site/fedseek_examples
export PYTHONPATH=/tmp/site:$PWD
case "${1:-}" in
explain)  # issue 18: ours vs stock SHAP vs Captum, 128-token prompt, 500 evaluations; then the MLA CUDA test
  timeout 400 python3 bench/explain.py --device cuda --shape r1-distill-1.5b --prompt-tokens 128 \
    --response-tokens 64 --max-evals 500 --repeats 5 --reference-samples 4096 --budget-s 360 \
    --out "$OUT/explain_h100.json" > "$OUT/explain.log" 2>&1; echo "explain rc $? at $(left 0) s"
  CUDA_LAUNCH_BLOCKING=1 timeout "$(left 540)" python3 -m pytest -x -q --tb=short -p no:cacheprovider \
    tests/node/serving/test_mla_runner.py -k cuda > "$OUT/mla_cuda_test.log" 2>&1; echo "mla test rc $?"
  tail -n 12 "$OUT/explain.log" "$OUT/mla_cuda_test.log" ;;
greedy)  # issue 19: the MLA engine's tokens at V2-Lite: exact in fp32 (4 layers), bf16 held to the fp32 argmax
  timeout 150 python3 -m bench.serving_mla --check-greedy --check-dtype float32 --prompt-tokens 64 \
    --new-tokens 32 --out "$OUT/mla_greedy_fp32.json" > "$OUT/mla_greedy_fp32.log" 2>&1; echo "fp32 rc $?"
  timeout "$(left 540)" python3 -m bench.serving_mla --check-greedy --check-dtype bfloat16 --check-requests 8 \
    --prompt-tokens 64 --new-tokens 32 --out "$OUT/mla_greedy_bf16.json" > "$OUT/mla_greedy_bf16.log" 2>&1
  echo "bf16 rc $?"; tail -n 25 "$OUT/mla_greedy_fp32.log" "$OUT/mla_greedy_bf16.log" ;;
mla)  # issue 19: HF's best at the V2-Lite shape, the fp16 engine
  timeout 300 python3 -m bench.serving_mla --part hf --hf static,static_compile --repeats 5 \
    --time-budget-s 200 --out "$OUT/mla_hf.json" > "$OUT/mla_hf.log" 2>&1; echo "hf rc $?"
  timeout "$(left 550)" python3 -m bench.serving --device cuda --shape r1-distill-1.5b --concurrency 1,64 \
    --adapters 1 --skip-hf --repeats 5 --dtype float16 --out "$OUT/serving_fp16.json" > "$OUT/fp16.log" 2>&1
  echo "fp16 rc $?"; tail -n 12 "$OUT/mla_hf.log" "$OUT/fp16.log" ;;
*) echo "usage: bench/gpu_session.sh explain|greedy|mla" >&2; exit 2 ;;
esac
