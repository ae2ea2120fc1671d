#!/usr/bin/env bash
# Issue 14's GPU checks, prepared for a lent GPU machine (the `device` tool; none has been lent to this
# project yet). A lent task has 15 minutes of device time in all, the machine's start (minutes) included,
# and one command may run 10 minutes, so the first call is the one that fits both:
#
#   run(command="bash bench/gpu_check.sh all", timeout_s=590)     # ≤ 9 min: CUDA tests + the 32-layer
#                                                                  # 8B-shaped model, 32k tokens, measured
# and, only if device time is left, one of
#   run(command="bash bench/gpu_check.sh quick", timeout_s=420)   # CUDA tests + one real-width 8B layer
#   run(command="bash bench/gpu_check.sh whole", timeout_s=590)   # the 32-layer model with 64k tokens
#
# The machine's own python3 is used (its image holds torch with CUDA, transformers, safetensors,
# accelerate, pytest; 2.11 / 5.17 when last read, and the tests run on transformers 5.17 here);
# nothing is installed. The 8B-shaped model is built on the GPU from its config (the real model, SmolLM2,
# travels in parts: bench/gpu_smollm2.sh).
# Memory of the 32-layer run (bf16 weights 16 GB, float32 statistics beside them 72 GB, sdpa activations
# ≈ 0.7 GB per layer and ≈ 7 GB of logits at 2 × 2048 tokens a batch): ≈ 117 GB, inside an H200's 139 GiB;
# an 80 GB GPU needs --layers-per-pass (statistics offloaded to disk: 67 GiB for 32 layers, more than
# the lent machine's 64 GiB disk, so not run there).
# Results: $OUT/gpu_check.md (a table of stages, exit codes and seconds) and one log per stage, where
# bench.scale8b writes a line per finished step (a stage stopped by its time limit keeps those);
# its last lines (layer_seconds=, whole_model_minutes=, peak_gpu_mb=, peak_rss_mb=) are
# the figures for BENCHMARKS.md. The exit status is the number of stages that failed.
#
# GPU_CHECK_DRY=1 runs the same stages on the CPU (float32) at 1/16 width, 2 layers and 512–1,024 tokens (about a
# minute a mode): tests/test_gpu_check.py does, so that the script cannot rot between lent machines.
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
SUMMARY="$OUT/gpu_check.md"
FAILED=0
[ -f "$SUMMARY" ] || printf '| stage | exit | seconds | last line |\n|---|---|---|---|\n' > "$SUMMARY"

. "$(dirname "$0")/stage.sh"   # stage NAME SECONDS COMMAND…: time limit, one log, one summary row

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then   # the CPU dry run: same stages, small shapes
  # float32: torch 2.13's CPU bf16 matmul takes 130 s for the output head's backward (510 × 128256 by
  # 128256 × 256; 0.26 s in float32), which ran the dry run's stages past their time limits
  SCALE=(-m bench.scale8b --width-scale 0.0625 --seq-len 256 --batch-size 2 --device cpu --linalg-device cpu
         --dtype float32)
  LAYER_TOKENS=512 WHOLE_LAYERS=2 WHOLE_TOKENS=1024 ALL_TOKENS=512
else
  SCALE=(-m bench.scale8b --width-scale 1 --seq-len 2048 --batch-size 2 --device cuda --linalg-device cuda)
  LAYER_TOKENS=16384 WHOLE_LAYERS=32 WHOLE_TOKENS=65536 ALL_TOKENS=32768
fi

env_stage() {
  { nvidia-smi; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, *((torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else ('no CUDA device',)))"; } > "$OUT/environment.log" 2>&1
  stage env 5 tail -n 1 "$OUT/environment.log"   # the stage's own log is env.log
}

case "${1:-quick}" in
  all)
    # 545 s in all (the call's timeout_s=590 leaves time for the summary); the 8B run gets what the
    # tests leave of it
    all_start=$(date +%s)
    env_stage
    stage tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_linalg_device.py
    stage whole $(( 545 - ($(date +%s) - all_start) )) $PY "${SCALE[@]}" --whole --layers "$WHOLE_LAYERS" \
      --tokens "$ALL_TOKENS"
    ;;
  quick)
    env_stage
    stage tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_linalg_device.py
    # one and two real-width layers (4096 / 14336, 8 KV heads, vocab 128256): per-layer cost by difference
    stage layer 240 $PY "${SCALE[@]}" --layers 1 --tokens "$LAYER_TOKENS"
    ;;
  whole)
    # all 32 layers in bf16 on the GPU, statistics beside them (float32), 64k calibration tokens measured
    # (scaled to 256 × 2048 in the table, labelled), analysis, 80 % compression and export measured
    stage whole 570 $PY "${SCALE[@]}" --whole --layers "$WHOLE_LAYERS" --tokens "$WHOLE_TOKENS"
    ;;
  *)
    echo "usage: bash bench/gpu_check.sh all|quick|whole" >&2
    exit 2
    ;;
esac
cat "$SUMMARY"
exit "$FAILED"
