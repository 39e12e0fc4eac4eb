#!/usr/bin/env bash
# The fine-tuning regime study of issue 15: one grid per candidate regime for each embedded
# default, every cell with 10 % of each client's rows held out for federated validation, then
# `gptfl-hpc choose` picks the regime on those rows (never on the test set).
#   bash docs/study/regimes.sh OUT [mnist|digits ...]   (192 cells for both: ~35 min, 2 scripts side by side)
# Two scripts side by side on 2 cores: EXTRA_OVERRIDES=run.threads=1 for each (no effect on the
# numbers under the invariant kernels; it stops two 2-thread cells from thrashing the cores).
set -euo pipefail
OUT=${1:?usage: regimes.sh OUT [mnist|digits ...]}
shift
SETS=${*:-mnist digits}
G="--methods gptfl --seeds 0,1,2 --alphas 0.05,0.1,0.5,iid --ranks 1 --store $OUT/store --resume"  # --resume: a rerun continues
declare -A REGIMES=(
  [base]=""
  [lr3e-4]="fl.client_lr=0.0003"
  [constant]="fl.client_lr_schedule=constant"
  [fedprox]="fl.algorithm=fedprox fl.prox_mu=0.01"
  [fedavgm]="fl.algorithm=fedavgm fl.server_lr=0.1 fl.server_momentum=0.9"
  [fedadam]="fl.algorithm=fedadam fl.server_lr=0.001"
  [body0.1]="fl.body_lr_scale=0.1"
  [cpr10]="fl.clients_per_round=10"
)
ORDER="base lr3e-4 constant fedprox fedavgm fedadam body0.1 cpr10"  # the default first
for set in $SETS; do
  extra=""
  [ "$set" = digits ] && extra="data.min_client_size=5"  # alpha 0.05 needs it
  dirs=()
  for r in $ORDER; do
    # shellcheck disable=SC2086
    python -m gptfl_hpc grid "configs/$set.yaml" fl.client_val_fraction=0.1 $extra ${REGIMES[$r]} \
      ${EXTRA_OVERRIDES:-} \
      --out "$OUT/$set-$r" $G
    dirs+=("$OUT/$set-$r")
  done
  python -m gptfl_hpc choose "${dirs[@]}" --out "$OUT/$set-choice"
done
