#!/usr/bin/env bash
# Every GPU figure the README asks for, in one run, for a machine with one CUDA GPU and rayft's
# dependencies installed (about 10 minutes on an H100-class GPU; each step is cut at its timeout so
# one slow step cannot eat the rest). Results go to DIR (default out/gpu) as logs and JSON.
#
#   bash benchmarks/gpu_checks.sh [DIR]
#
# 1. fused vs PEFT vs frozen base, DESIGN.md's workload (TinyLlama-1.1B shape, bf16, seq 512, r=16
#    on all seven linears, K=8 x micro-batch 2); targets >= 8x PEFT and >= 0.85x the frozen base
# 2. the same with mixed row lengths (64, 256, 1024 tokens), where a rectangular batch pads
# 3. the same compiled (torch.compile of each decoder layer)
# 4. the memory model against measured peaks (its fit goes to memory.json)
# 5. serving load: 1, 8 and 32 adapters against the base
# 6. QLoRA through bitsandbytes on the GPU (nf4, fp4, int8; LoRA and DoRA): training equals the
#    full-precision twin, PEFT applies the adapters to the same quantized base with the same logits
# Pipeline stages need a GPU per stage: on a machine with N >= 2 GPUs, run
#   python benchmarks/pipeline_stages.py --device cuda --stages 1,2 (,4) --model DIR
set -u
cd "$(dirname "$0")/.."
out=${1:-out/gpu}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%H:%M:%S)): $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v "Warning\|warn(" | tail -25
  echo "=== $name: exit ${PIPESTATUS[0]}"
}

step fused 150 python benchmarks/fused_vs_peft.py --device cuda --json "$out/fused.json"
step fused_mixed 150 python benchmarks/fused_vs_peft.py --device cuda --seq-lens 64,256,1024 -K 6 -B 2 \
  --json "$out/fused_mixed.json"
step fused_compiled 180 python benchmarks/fused_vs_peft.py --device cuda --compile --warmup 3 \
  --json "$out/fused_compiled.json"
step memory 150 python benchmarks/memory_model.py --device cuda --json "$out/memory.json"
step serve 180 python benchmarks/serve_load.py --device cuda --shape tinyllama --adapters 1 8 32 \
  --requests 128 --concurrency 32 --json "$out/serve.json"
step qlora 180 env RAYFT_TEST_DEVICE=cuda python -m pytest -q -p no:cacheprovider tests/test_qlora.py
