#!/usr/bin/env bash
# Stop what scripts/slurm-up.sh started, each daemon by the PID it recorded, in reverse order.
# Nothing is killed by name. Packages and /etc/slurm/*.conf stay in place.
set -uo pipefail
RUN=${SLURM_CI_RUN:-/run/slurm-ci}
[ -d "$RUN" ] || { echo "slurm-down: nothing recorded in $RUN"; exit 0; }
command -v scancel >/dev/null && scancel --full --user="$(id -un)" 2>/dev/null
stop() {  # stop NAME: SIGTERM the recorded PID, wait up to 15 s, then SIGKILL
  local f="$RUN/$1.pid" p
  [ -s "$f" ] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill -TERM "$p"
    for _ in $(seq 75); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$p" 2>/dev/null; then echo "slurm-down: $1 ($p) ignored SIGTERM, SIGKILL"; kill -KILL "$p"; fi
  fi
  rm -f "$f"
  stopped+=("$1")
}
stopped=()
sleep 1   # let slurmd reap the cancelled steps
for f in "$RUN"/slurmd.pid "$RUN"/slurmd-*.pid; do [ -e "$f" ] && stop "$(basename "$f" .pid)"; done  # one per node
for d in slurmctld slurmdbd mariadbd munged; do stop "$d"; done
echo "slurm-down: stopped ${stopped[*]:-nothing}"
