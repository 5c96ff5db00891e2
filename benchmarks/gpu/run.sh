#!/usr/bin/env bash
# The GPU half of the benchmarks, in one call on a lent CUDA machine (its python3 has torch, triton and transformers;
# nothing is downloaded or installed): the CUDA tests and the Triton kernels' tests natively, then W1 scaled up as
# nano-vllm's benchmark (256 requests, prompts and outputs of 100-1,024 tokens, Qwen3-0.6B-shaped random weights) on
# the Triton attention backend (the CUDA default) and on the torch one, then one request against HF.
# Each step has its own time limit (490 s in all, inside the device tool's 600 s per call), so one that hangs still
# leaves the others' results.
# Prepare with benchmarks/gpu/prepare.sh. Results go to $OUT (the device tool's) or benchmarks/results/gpu.
# GPU_DRY_RUN=1 runs the same steps on the CPU with tiny sizes, to check the script itself.
set -uo pipefail
cd "$(dirname "$0")/../.."
# a dry run's CPU numbers go to a temporary folder, never among the results
OUT=${OUT:-$([ "${GPU_DRY_RUN:-0}" = 1 ] && mktemp -d || echo benchmarks/results/gpu)}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 PAGEDLLM_CACHE=/tmp/pagedllm-cache PAGEDLLM_TEST_TOKENIZER=$PWD/.gpu/tokenizer
PY=${PY:-python3}
if [ "${GPU_DRY_RUN:-0}" = 1 ]; then
  DEV=cpu N=4 LEN="32 64"; TESTS=tests/test_model_loader.py
else
  DEV=cuda N=256 LEN="100 1024"; TESTS="tests/test_cuda.py tests/test_triton_kernels.py"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
fi
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/machine.txt"
B="$PY -m pagedllm.entrypoints.cli bench"
M="--model qwen3-0.6b --load-format dummy --device $DEV --max-model-len 2048"
timeout 120 $PY -m pytest -q -p no:cacheprovider $TESTS 2>&1 | tee "$OUT/tests.log"
timeout 150 $B throughput $M --num-prompts $N --input-len $LEN --output-len $LEN \
  --output-json "$OUT/throughput_w1_scaled_qwen3_0.6b.json" 2>&1 | grep -v "it/s" | tee "$OUT/throughput.log"
[ "${GPU_DRY_RUN:-0}" = 1 ] || PAGEDLLM_ATTENTION_BACKEND=torch timeout 120 $B throughput $M --num-prompts $N \
  --input-len $LEN --output-len $LEN --output-json "$OUT/throughput_w1_scaled_qwen3_0.6b_torch_attention.json" 2>&1 \
  | grep -v "it/s" | tee "$OUT/throughput_torch_attention.log"
timeout 100 $B latency $M --compare hf --output-json "$OUT/latency_qwen3_0.6b.json" 2>&1 | tee "$OUT/latency.log"
