#!/usr/bin/env bash
# Issue 14's GPU checks, prepared for a lent GPU machine (the `device` tool; none has been lent to this
# project yet). Two commands, each well inside the tool's 10-minute limit:
#
#   run(command="bash bench/gpu_check.sh quick", timeout_s=420)   # CUDA tests + one real-width 8B layer
#   run(command="bash bench/gpu_check.sh whole", timeout_s=590)   # the 32-layer 8B-shaped model, measured
#
# The machine's own python3 is used (its image holds torch with CUDA, transformers, safetensors,
# accelerate, pytest); nothing is installed. SmolLM2's GGUF (98 MB) is over the tool's 64 MiB carry
# limit, so the real model cannot run there: the 8B-shaped model is built on the GPU from its config.
# Results: $OUT/gpu_check.md (a table of stages, exit codes and seconds) and one log per stage;
# bench.scale8b's last lines (layer_seconds=, whole_model_minutes=, peak_gpu_mb=, peak_rss_mb=) are
# the figures for BENCHMARKS.md. The exit status is the number of stages that failed.
#
# GPU_CHECK_DRY=1 runs the same stages on the CPU at 1/16 width, 2 layers and 1,024 tokens (about a
# minute): tests/test_gpu_check.py does, so that the script cannot rot between lent machines.
set -u
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
SUMMARY="$OUT/gpu_check.md"
FAILED=0
[ -f "$SUMMARY" ] || printf '| stage | exit | seconds | last line |\n|---|---|---|---|\n' > "$SUMMARY"

stage() {   # stage NAME SECONDS COMMAND…: run with a time limit, log, one summary row
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  echo "| $name | $rc$([ $rc = 124 ] && echo ' (time limit)') | $(( $(date +%s) - start )) | $(tail -n 1 "$OUT/$name.log" | tr '|' '/' | cut -c1-160) |" >> "$SUMMARY"
}

if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then   # the CPU dry run: same stages, small shapes
  SCALE=(-m bench.scale8b --width-scale 0.0625 --seq-len 256 --batch-size 2 --device cpu --linalg-device cpu
         --dtype bfloat16)
  LAYER_TOKENS=1024 WHOLE_LAYERS=2 WHOLE_TOKENS=1024
else
  SCALE=(-m bench.scale8b --width-scale 1 --seq-len 2048 --batch-size 4 --device cuda --linalg-device cuda)
  LAYER_TOKENS=16384 WHOLE_LAYERS=32 WHOLE_TOKENS=65536
fi
case "${1:-quick}" in
  quick)
    { nvidia-smi; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, *((torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else ('no CUDA device',)))"; } > "$OUT/env.log" 2>&1
    stage env 5 tail -n 1 "$OUT/env.log"
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
    echo "usage: bash bench/gpu_check.sh quick|whole" >&2
    exit 2
    ;;
esac
cat "$SUMMARY"
exit "$FAILED"
