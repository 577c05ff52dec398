#!/usr/bin/env bash
# Grid of PEFT method × selection strategy × seed over run_regression.py, one directory per run.
#
#   scripts/sweep.sh SWEEP_DIR SPLIT_JSON SELECTIONS_DIR [extra run_regression.py flags...]
#
# Run it from the repository root. SELECTIONS_DIR holds one folder per strategy with the selected.csv that
# run_selection.py wrote (e.g. selections/random/selected.csv); the strategy "none" adds no external molecules.
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
#   SHARD       this machine's part, I/N      [0/1, the whole grid]
#   DRY_RUN     1: print each run's state and command line, run and change nothing   [0]
#
# Many machines: SHARD=I/N (0-based, 0 <= I < N) takes every N-th run of the grid, starting with run I
# (runs counted from 0 in method, strategy, seed order), so N shards are disjoint and together cover the grid;
# round-robin spreads slow and fast methods evenly. Start one copy per shard on machines that share SWEEP_DIR.
# Under a Slurm job array SHARD defaults to I = SLURM_ARRAY_TASK_ID mod SLURM_ARRAY_TASK_COUNT,
# N = SLURM_ARRAY_TASK_COUNT, so --array=0-7 and --array=1-8 both give 8 shards (the array must be a plain
# range, without a :step); scripts/sweep.sbatch is an example. An explicit SHARD overrides the array variables.
#
# Resumable, per shard: a run whose directory holds run_complete.json is skipped; a directory without it (a
# crashed or interrupted run) is removed and the run is redone. A shard only ever looks at its own runs, so
# rerunning one shard never touches runs that another shard may be writing. Failed runs are listed at the end
# (with the tail of their log) and make the script exit non-zero, after every other run has had its turn.
set -uo pipefail

if [ $# -lt 3 ]; then
  sed -n '2,35p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
sweep_dir=$1; split_json=$2; selections_dir=$3; shift 3
METHODS=${METHODS:-"full lora ia3 bitfit"}
STRATEGIES=${STRATEGIES:-"none all random influence_top influence_bottom uncertainty diversity"}
SEEDS=${SEEDS:-"1 2 3"}
CONFIG=${CONFIG:-configs/regression_small.yaml}
LAUNCHER=${LAUNCHER:-python}
SCRIPT=${SCRIPT:-run_regression.py}
DRY_RUN=${DRY_RUN:-0}
done_marker=run_complete.json  # molft.files.DONE_MARKER

if [ -z "${SHARD:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_COUNT:-}" ]; then
  if [ "${SLURM_ARRAY_TASK_STEP:-1}" != 1 ]; then
    echo "Slurm array with step ${SLURM_ARRAY_TASK_STEP}: use a plain range (--array=0-7) or set SHARD=I/N" >&2
    exit 2
  fi
  SHARD="$((SLURM_ARRAY_TASK_ID % SLURM_ARRAY_TASK_COUNT))/$SLURM_ARRAY_TASK_COUNT"
fi
SHARD=${SHARD:-0/1}
if ! [[ $SHARD =~ ^([0-9]+)/([0-9]+)$ ]] || [ "${BASH_REMATCH[2]}" -lt 1 ] \
    || [ "${BASH_REMATCH[1]}" -ge "${BASH_REMATCH[2]}" ]; then
  echo "SHARD=$SHARD: expected I/N with 0 <= I < N (0-based), e.g. SHARD=0/4" >&2
  exit 2
fi
shard_index=$((10#${BASH_REMATCH[1]})); shard_count=$((10#${BASH_REMATCH[2]}))

[ -f "$split_json" ] || { echo "split file $split_json not found" >&2; exit 2; }
for strategy in $STRATEGIES; do
  if [ "$strategy" != none ] && [ ! -f "$selections_dir/$strategy/selected.csv" ]; then
    echo "missing $selections_dir/$strategy/selected.csv (run run_selection.py --strategy ... first)" >&2
    exit 2
  fi
done

n_total=0; for _ in $METHODS; do for _ in $STRATEGIES; do for _ in $SEEDS; do n_total=$((n_total + 1)); done; done; done
label="sweep"
[ "$shard_count" -gt 1 ] && label="sweep shard $shard_index/$shard_count"
[ "$DRY_RUN" = 1 ] && echo "$label: dry run, nothing is started, created or removed"
n=0; n_mine=0; n_skipped=0; failed=()
for method in $METHODS; do
  peft=$method; [ "$method" = full ] && peft=none
  for strategy in $STRATEGIES; do
    for seed in $SEEDS; do
      n=$((n + 1))
      (( (n - 1) % shard_count == shard_index )) || continue  # another shard's run: never looked at
      n_mine=$((n_mine + 1))
      run_dir="$sweep_dir/$method/$strategy/seed$seed"
      if [ -f "$run_dir/$done_marker" ]; then
        n_skipped=$((n_skipped + 1))
        echo "[$n/$n_total] done already: $run_dir"
        continue
      fi
      method_args_var="METHOD_ARGS_$method"
      read -r -a method_args <<< "${!method_args_var:-}"
      extra=()
      [ "$strategy" != none ] && extra=(--extra_train_file "$selections_dir/$strategy/selected.csv")
      if [ -f "$selections_dir/$strategy/run_args.txt" ]; then
        read -r -a strategy_args < "$selections_dir/$strategy/run_args.txt"
        extra+=("${strategy_args[@]}")
      fi
      # shellcheck disable=SC2206  # LAUNCHER is deliberately word-split
      command=($LAUNCHER "$SCRIPT" "$CONFIG" --peft "$peft" --seed "$seed" --split_file "$split_json"
        --selection_name "$strategy" --output_dir "$run_dir" "${extra[@]}" "${method_args[@]}" "$@")
      if [ "$DRY_RUN" = 1 ]; then
        state="to run"; [ -d "$run_dir" ] && state="incomplete, to redo"
        echo "[$n/$n_total] $state: $run_dir"
        printf -v shown '%q ' "${command[@]}"
        printf '    %s> %q 2>&1\n' "$shown" "$run_dir/log.txt"
        continue
      fi
      if [ -d "$run_dir" ]; then
        echo "[$n/$n_total] removing incomplete run $run_dir"
        rm -rf "$run_dir"
      fi
      echo "[$n/$n_total] $method / $strategy / seed $seed -> $run_dir"
      mkdir -p "$run_dir"
      if ! "${command[@]}" > "$run_dir/log.txt" 2>&1; then
        echo "[$n/$n_total] FAILED (see $run_dir/log.txt), its last lines:" >&2
        tail -n 15 "$run_dir/log.txt" | sed 's/^/    /' >&2
        failed+=("$run_dir")
      fi
    done
  done
done
if [ "$DRY_RUN" = 1 ]; then
  echo "$label: $n_mine runs, $n_skipped already done, $((n_mine - n_skipped)) to run ($n_total in the grid)"
  exit 0
fi
summary="$label: $n_mine runs, $n_skipped already done, ${#failed[@]} failed"
[ "$shard_count" -gt 1 ] && summary+=" ($n_total in the grid)"
echo "$summary"
if [ ${#failed[@]} -gt 0 ]; then
  printf '  failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
