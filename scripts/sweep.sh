#!/usr/bin/env bash
# Grid of PEFT method × selection strategy × seed over run_regression.py, one directory per run.
#
#   scripts/sweep.sh SWEEP_DIR SPLIT_JSON SELECTIONS_DIR [extra run_regression.py flags...]
#
# SELECTIONS_DIR holds one folder per strategy with the selected.csv that run_selection.py wrote
# (e.g. selections/random/selected.csv); the strategy "none" adds no external molecules.
# Every run reuses SPLIT_JSON, so all cells see the same train/validation/test molecules.
# A strategy folder may also hold run_args.txt: extra run_regression.py flags for that strategy's runs,
# e.g. influence-weighted training as one more strategy (the "all" selection, weighted instead of cut):
#   selections/influence_weighted/selected.csv  (a copy of the pool with its influence score column)
#   selections/influence_weighted/run_args.txt  --extra_train_weights score --weight_mapping helpful_softmax
#
# Environment (defaults in brackets):
#   METHODS     PEFT methods                  [full lora ia3 bitfit]   ("full" = --peft none)
#   STRATEGIES  selection strategies          [none all random influence_top influence_bottom uncertainty diversity]
#   SEEDS       training seeds                [1 2 3]
#   CONFIG      base run_regression config    [configs/regression_small.yaml]
#   LAUNCHER    how to start a run            [python]  e.g. LAUNCHER="accelerate launch --num_processes 2"
#   SCRIPT      the training script           [run_regression.py]
#   METHOD_ARGS_<method>  extra flags for one method, e.g. METHOD_ARGS_lora="--learning_rate 2e-3"
#
# Resumable: a run whose directory holds run_complete.json is skipped; a directory without it (a crashed
# or interrupted run) is removed and the run is redone. Failed runs are listed at the end and make the
# script exit non-zero, after every other run has had its turn.
set -uo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
sweep_dir=$1; split_json=$2; selections_dir=$3; shift 3
METHODS=${METHODS:-"full lora ia3 bitfit"}
STRATEGIES=${STRATEGIES:-"none all random influence_top influence_bottom uncertainty diversity"}
SEEDS=${SEEDS:-"1 2 3"}
CONFIG=${CONFIG:-configs/regression_small.yaml}
LAUNCHER=${LAUNCHER:-python}
SCRIPT=${SCRIPT:-run_regression.py}

[ -f "$split_json" ] || { echo "split file $split_json not found" >&2; exit 2; }
for strategy in $STRATEGIES; do
  if [ "$strategy" != none ] && [ ! -f "$selections_dir/$strategy/selected.csv" ]; then
    echo "missing $selections_dir/$strategy/selected.csv (run run_selection.py --strategy ... first)" >&2
    exit 2
  fi
done

n_total=0; for _ in $METHODS; do for _ in $STRATEGIES; do for _ in $SEEDS; do n_total=$((n_total + 1)); done; done; done
n=0; n_skipped=0; failed=()
for method in $METHODS; do
  peft=$method; [ "$method" = full ] && peft=none
  for strategy in $STRATEGIES; do
    for seed in $SEEDS; do
      n=$((n + 1))
      run_dir="$sweep_dir/$method/$strategy/seed$seed"
      if [ -f "$run_dir/run_complete.json" ]; then
        n_skipped=$((n_skipped + 1))
        echo "[$n/$n_total] done already: $run_dir"
        continue
      fi
      if [ -d "$run_dir" ]; then
        echo "[$n/$n_total] removing incomplete run $run_dir"
        rm -rf "$run_dir"
      fi
      method_args_var="METHOD_ARGS_$method"
      read -r -a method_args <<< "${!method_args_var:-}"
      extra=()
      [ "$strategy" != none ] && extra=(--extra_train_file "$selections_dir/$strategy/selected.csv")
      if [ -f "$selections_dir/$strategy/run_args.txt" ]; then
        read -r -a strategy_args < "$selections_dir/$strategy/run_args.txt"
        extra+=("${strategy_args[@]}")
      fi
      echo "[$n/$n_total] $method / $strategy / seed $seed -> $run_dir"
      mkdir -p "$run_dir"
      # shellcheck disable=SC2086  # LAUNCHER is deliberately word-split
      if ! $LAUNCHER "$SCRIPT" "$CONFIG" --peft "$peft" --seed "$seed" --split_file "$split_json" \
          --selection_name "$strategy" --output_dir "$run_dir" "${extra[@]}" "${method_args[@]}" "$@" > "$run_dir/log.txt" 2>&1; then
        echo "[$n/$n_total] FAILED (see $run_dir/log.txt)" >&2
        failed+=("$run_dir")
      fi
    done
  done
done
echo "sweep: $n_total runs, $n_skipped already done, ${#failed[@]} failed"
if [ ${#failed[@]} -gt 0 ]; then
  printf '  failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
