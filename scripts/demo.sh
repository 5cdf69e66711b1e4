#!/usr/bin/env bash
# Show conveyor working: set up .venv, run `conveyor demo`, then every
# examples/*.py script, stopping at the first failure.
#
#   scripts/demo.sh
#
# Settings (environment variables):
#   CONVEYOR_DEMO_TIMEOUT   seconds allowed for the demo and for each example (default: 120)
#   and those of scripts/lib.sh (CONVEYOR_PYTHON, CONVEYOR_VENV, CONVEYOR_EXTRAS).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$ROOT"

TIMEOUT="${CONVEYOR_DEMO_TIMEOUT:-120}"

# Run a command under `timeout`, naming it when it fails or times out.
run_timed() {
    local name="$1" rc=0
    shift
    step "$name"
    timeout --kill-after=10 "$TIMEOUT" "$@" </dev/null || rc=$?
    if ((rc == 124 || rc == 137)); then
        die "$name timed out after ${TIMEOUT}s"
    elif ((rc != 0)); then
        die "$name failed (exit code $rc)"
    fi
}

ensure_venv

run_timed "conveyor demo" conveyor demo

shopt -s nullglob
examples=()
for example in examples/*.py; do
    # examples/_*.py are modules the scripts share, not scripts.
    [[ "$(basename "$example")" == _* ]] || examples+=("$example")
done
if ((${#examples[@]} == 0)); then
    echo "(no examples/*.py scripts yet)"
fi
ran=0
for example in "${examples[@]}"; do
    if [[ "$example" == examples/distributed.py ]] && ! command -v redis-server >/dev/null 2>&1; then
        step "python $example: not run, redis-server is not on PATH (scripts/test.sh installs it)"
        continue
    fi
    run_timed "python $example" "$VENV_PY" "$example"
    ran=$((ran + 1))
done

step "demo: the demo and $ran of ${#examples[@]} example(s) ran successfully"
