#!/usr/bin/env bash
# Every benchmark behind benchmarks/RESULTS.md, in one quiet run (~25 min on a 2-core CPU), then the report.
# Usage: bash benchmarks/run_all.sh   (run nothing else meanwhile: the numbers are wall-clock)
set -euo pipefail
cd "$(dirname "$0")/.."
B=.venv/bin/pagedllm
R=benchmarks/results
mkdir -p $R
# W1 against HF transformers (static batches of 16 and generate_batch), with the machine's limits; bf16 (the GGUF
# dequantized), then the file's own Q4_1 / Q8_0 (the default)
$B bench throughput --max-model-len 1024 --dtype bfloat16 --compare hf --output-json $R/throughput_w1.json
$B bench throughput --max-model-len 1024 --output-json $R/throughput_w1_gguf_q4_1.json
# single request, bf16, int8 and the GGUF's own Q4_1, against HF generate at batch 1
$B bench latency --max-model-len 1024 --dtype bfloat16 --compare hf --output-json $R/latency_bf16.json
$B bench latency --max-model-len 1024 --quantization int8 --output-json $R/latency_int8.json
$B bench latency --max-model-len 1024 --output-json $R/latency_gguf_q4_1.json
# single request at a long context (attention's share grows; few decodes split their keys over the threads)
$B bench latency --max-model-len 4096 --dtype bfloat16 --input-len 3072 3072 --output-len 128 128 --output-json $R/latency_bf16_3k_context.json
$B bench quantization --output-json $R/quantization_quality.json
# speculative decoding (n-gram prompt lookup) on a conversation whose answer quotes its prompt, off then on
TYPOS="Fix the typos in this paragraph and write it out again: The quick brwon fox jumpd over the lazy dog. It was a sunny day and the fox was very hapy. The dog did not care at all, it just slept in the sun all afternon. Later that evening the farmer came home and fed both of them, and they all went to sleep in the old barn behind the house."
$B bench latency --max-model-len 1024 --output-len 256 256 --chat "$TYPOS" --output-json $R/latency_chat_typos.json
$B bench latency --max-model-len 1024 --output-len 256 256 --chat "$TYPOS" --output-json $R/latency_chat_typos_ngram.json \
  --speculative-config '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}'
# the brief's model family: one request on Qwen3-0.6B shapes with random weights (no checkpoint needed)
$B bench latency --model qwen3-0.6b --load-format dummy --max-model-len 1024 --compare hf --output-json $R/latency_qwen3_0.6b_dummy.json
# prefix caching: 32 requests sharing a 1,000-token system prompt
$B bench throughput --max-model-len 2048 --num-prompts 32 --shared-prefix-len 1000 --input-len 16 64 --output-len 32 32 --output-json $R/shared_prefix_cache_on.json
$B bench throughput --max-model-len 2048 --num-prompts 32 --shared-prefix-len 1000 --input-len 16 64 --output-len 32 32 --no-enable-prefix-caching --output-json $R/shared_prefix_cache_off.json
# chunked prefill: a short request behind a 4,000-token prompt
$B bench interference --output-json $R/interference.json
# parallelism on this CPU: the embedded model has 9 heads / 3 KV heads, so TP is 3; W1 halved
$B bench throughput --max-model-len 1024 --num-prompts 32 --output-json $R/w1_half_tp1.json
$B bench throughput --max-model-len 1024 --num-prompts 32 --tensor-parallel-size 3 --output-json $R/w1_half_tp3.json
$B bench throughput --max-model-len 1024 --num-prompts 32 --data-parallel-size 2 --output-json $R/w1_half_dp2.json
$B bench throughput --max-model-len 1024 --num-prompts 32 --pipeline-parallel-size 2 --output-json $R/w1_half_pp2.json
# serving: a real server under fixed concurrency
$B serve --max-model-len 1024 --port 8123 --log-level warning & SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
until curl -sf http://127.0.0.1:8123/health >/dev/null; do sleep 1; done
for c in 1 4 16; do
  $B bench serve --base-url http://127.0.0.1:8123 --num-prompts $((c * 4 > 8 ? c * 4 : 8)) --max-concurrency $c \
    --dataset-name random --random-input-len 272 --random-range-ratio 0.88 --random-output-len 64 \
    --percentile-metrics ttft,tpot,itl,e2el --metric-percentiles 50,99 --save-result --result-dir $R \
    --result-filename serve_c$c.json
done
kill $SERVER
.venv/bin/python benchmarks/report.py
