#!/usr/bin/env bash
# Run the live Slurm tests (tests/test_slurm_live.py) N times in a row and print pass/fail counts.
#
#   bash scripts/repeat-slurm-tests.sh 10            # the whole live file, 10 times
#   bash scripts/repeat-slurm-tests.sh 30 -k two_node  # extra arguments go to pytest
#
# Brings the local Slurm up first (scripts/slurm-up.sh, idempotent; needs root) and uses the same
# environment as scripts/test.sh. Each run's pytest output is kept in $LOGS (printed at the end).
# After every run the queue must be empty of the run's jobs; leftovers are listed, cancelled and
# count as a failed run, and so does a run that passed nothing (everything skipped). Exit
# status: 0 if every run passed.
set -uo pipefail
cd "$(dirname "$0")/.."
n=${1:-}
case $n in ''|*[!0-9]*|0) echo "usage: $0 N [pytest args...]  (N >= 1)" >&2; exit 2 ;; esac
shift
[ -x .venv/bin/python ] || { echo "repeat-slurm-tests: no .venv: run scripts/install.sh" >&2; exit 2; }
. scripts/mpi-env.sh
export GPTFL_TEST_MPICH=${GPTFL_TEST_MPICH:-$PWD/.venv/mpich/lib/libmpi.so.12}
export OMP_NUM_THREADS=1 PATH="$PWD/.venv/bin:$PATH"
if [ "$(id -u)" -eq 0 ]; then
  bash scripts/slurm-up.sh || exit 1
fi
LOGS=$(mktemp -d /tmp/repeat-slurm-tests.XXXXXX)
passed=0 failed=0
declare -A fails=()
for i in $(seq "$n"); do
  t0=$(date +%s)
  .venv/bin/python -m pytest -q -p no:cacheprovider -rfE tests/test_slurm_live.py \
    "$@" > "$LOGS/run-$i.log" 2>&1
  rc=$?
  left=$(squeue -h -o '%i %j %T' 2>/dev/null)
  if [ -n "$left" ]; then
    echo "run $i: jobs left in the queue (cancelled): $(echo "$left" | paste -sd ';')" \
      | tee -a "$LOGS/run-$i.log"
    # shellcheck disable=SC2046
    scancel $(echo "$left" | awk '{print $1}')
    [ "$rc" -eq 0 ] && rc=1
  fi
  summary=$(grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error)" "$LOGS/run-$i.log" | tail -1)
  # a run that passed nothing (Slurm down: everything skipped) is not a pass
  if [ "$rc" -eq 0 ] && ! grep -qE "[0-9]+ passed" <<< "$summary"; then rc=1; fi
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    while read -r t; do
      [ -n "$t" ] && fails[$t]=$(( ${fails[$t]:-0} + 1 ))
    done < <(grep -E '^(FAILED|ERROR) ' "$LOGS/run-$i.log" | awk '{print $2}')
  fi
  echo "run $i/$n: $([ "$rc" -eq 0 ] && echo PASS || echo "FAIL (rc $rc)") in" \
       "$(( $(date +%s) - t0 ))s: $summary"
done
echo "repeat-slurm-tests: $n run(s): $passed passed, $failed failed (logs: $LOGS)"
for t in "${!fails[@]}"; do echo "  failed in ${fails[$t]} run(s): $t"; done
[ "$failed" -eq 0 ]
