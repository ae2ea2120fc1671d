# One stage of a device check; sourced by bench/gpu_check.sh and bench/gpu_smollm2.sh.
#
#   stage NAME SECONDS COMMAND…
#
# runs COMMAND with a time limit of SECONDS × ${STAGE_SLOW:-1}, counts a failure in FAILED and adds one row
# to $SUMMARY: name, exit status ("(time limit)" for 124), seconds, the last line of text the stage wrote
# (progress bars' carriage returns and terminal escapes taken out).
# STAGE_LOG=own (the default): stdout and stderr go to $OUT/NAME.log.
# STAGE_LOG=json: stdout goes to $OUT/NAME.json (removed when empty) and stderr is appended to one
#   $OUT/stages.log, so that a check of many stages stays within the 8 files the device tool brings back.
stage() {
  local name=$1 limit=$2 start rc log
  shift 2
  start=$(date +%s)
  if [ "${STAGE_LOG:-own}" = json ]; then
    log=$(mktemp)
    timeout $(( limit * ${STAGE_SLOW:-1} )) "$@" > "$OUT/$name.json" 2> "$log"
    rc=$?
    [ -s "$OUT/$name.json" ] || rm -f "$OUT/$name.json"
    { echo "== $name (exit $rc)"; cat "$log"; } >> "$OUT/stages.log"
  else
    log="$OUT/$name.log"
    timeout $(( limit * ${STAGE_SLOW:-1} )) "$@" > "$log" 2>&1
    rc=$?
  fi
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  echo "| $name | $rc$([ "$rc" = 124 ] && echo ' (time limit)') | $(( $(date +%s) - start )) | $(tr '\r' '\n' < "$log" | sed 's/\x1b\[[0-9;]*[A-Za-z]//g' | grep -E '[[:alnum:]]{2,}' | tail -n 1 | tr '|' '/' | cut -c1-160) |" >> "$SUMMARY"
}
