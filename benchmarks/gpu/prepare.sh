#!/usr/bin/env bash
# Run here (not on the GPU machine) before benchmarks/gpu/run.sh: the GPU machine has torch and transformers but not
# the embedded model's package, so the tests' tokenizer files travel in .gpu/ (git-ignored; name it in `carry`).
set -euo pipefail
cd "$(dirname "$0")/../.."
folder=$(.venv/bin/python -c "from pagedllm.model_loader.resolve import resolve_model; print(resolve_model(None))")
rm -rf .gpu && mkdir -p .gpu/tokenizer
cp "$folder"/tokenizer* "$folder"/*.jinja .gpu/tokenizer/
du -sh .gpu
echo "now, with the device tool: run(command='bash benchmarks/gpu/run.sh', carry=['.gpu'], timeout_s=540)"
