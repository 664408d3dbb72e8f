#!/usr/bin/env bash
# The checks of po-registry on a CUDA machine, in one go, installing nothing (run it in the set-up environment):
#
#   benchmarks/gpu_check.sh [MODEL_DIR]
#
#   1. cuda        a CUDA device is visible to torch
#   2. tests       the default test suite (python -m pytest)
#   3. main-bf16   the main job in bf16: python -m po_registry train --config <bf16: true>
#   4. smoke-*     with MODEL_DIR (a local Hugging Face causal LM): 2 steps of grpo and of ppo on it, in bf16
#
# One line per check: PASS or FAIL, the name and the seconds it took; each check's output is kept in a log under
# $GPU_CHECK_DIR (default: a fresh temporary directory), printed at the end. The exit status is the number of
# failed checks. Settings: PYTHON (default python), GPU_CHECK_STEPS (main job steps, default 150),
# GPU_CHECK_PYTEST (pytest arguments, default -q), GPU_CHECK_SKIP (names of checks to skip, space-separated).
set -u

cd "$(dirname "$0")/.." || exit 1
PYTHON=${PYTHON:-python}
STEPS=${GPU_CHECK_STEPS:-150}
PYTEST_ARGS=${GPU_CHECK_PYTEST:--q}
SKIP=" ${GPU_CHECK_SKIP:-} "
WORK=${GPU_CHECK_DIR:-$(mktemp -d -t po-registry-gpu-check.XXXXXX)}
MODEL=${1:-}
mkdir -p "$WORK"
printf 'bf16: true\n' >"$WORK/bf16.yaml"
failures=0

check() {  # check NAME COMMAND...: run it, log it, print one line
    local name=$1
    shift
    if [[ $SKIP == *" $name "* ]]; then
        printf 'SKIP  %-28s\n' "$name"
        return
    fi
    local start tenths status
    start=$(date +%s%N)
    if "$@" >"$WORK/$name.log" 2>&1; then status=PASS; else status=FAIL; failures=$((failures + 1)); fi
    tenths=$((($(date +%s%N) - start) / 100000000))
    printf '%s  %-28s %6d.%d s\n' "$status" "$name" $((tenths / 10)) $((tenths % 10))
}

run_finished() {  # run_finished DIR: the run wrote its summary
    test -s "$1/summary.json"
}

main_job() {
    "$PYTHON" -m po_registry train --config "$WORK/bf16.yaml" --steps "$STEPS" --output-dir "$WORK/main-bf16" &&
        run_finished "$WORK/main-bf16" && cat "$WORK/main-bf16/summary.json"
}

smoke() {  # smoke METHOD
    "$PYTHON" -m po_registry train --model "$MODEL" --method "$1" --config "$WORK/bf16.yaml" --steps 2 \
        --eval-every 2 --eval-size 16 --output-dir "$WORK/smoke-$1" && run_finished "$WORK/smoke-$1"
}

check cuda "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
# shellcheck disable=SC2086 # PYTEST_ARGS is a list of arguments
check tests "$PYTHON" -m pytest $PYTEST_ARGS
check main-bf16 main_job
if [[ -n $MODEL ]]; then
    for method in grpo ppo; do
        check "smoke-$method" smoke "$method"
    done
else
    printf 'SKIP  %-28s (no MODEL_DIR given)\n' "smoke-*"
fi
echo "logs: $WORK"
exit "$failures"
