#!/usr/bin/env bash
# The whole pipeline, offline, on Lipophilicity and the shared external set, at toy size:
#   1. run_mlm.py         pretrain a tiny MoLFormer on a slice of the shared SMILES corpus
#   2. run_regression.py  fine-tune it on Lipophilicity (writes split.json, reused by every later step)
#   3. run_influence.py   score the external molecules by influence on the validation loss
#   4. run_selection.py   pick external molecules: influence top/bottom, random, uncertainty, diversity, all
#   5. scripts/sweep.sh   retrain with four of the selections (full fine-tuning, 2 seeds)
#   6. report.py          tables with confidence intervals and paired tests
#
#   bash scripts/quickstart.sh [OUT_DIR]       (default outputs/quickstart; SHARED=../shared)
#   QUICKSTART_TINY=1 bash scripts/quickstart.sh [OUT_DIR]     (default outputs/quickstart_tiny)
#
# Paths are relative to the repository root. Everything is deliberately tiny so that it finishes on 2 CPU
# cores; the numbers it prints show that the pipeline works, not what MoLFormer can reach. Steps that already
# finished are skipped on a rerun. When a step fails, the end of its log (the traceback) is printed.
#
# QUICKSTART_TINY=1 shrinks every step to seconds, for CI and for checking an installation (about a minute
# on 2 cores): 300 corpus and 300 Lipophilicity molecules (a slice of the shared csv), 1 epoch, 40 external
# molecules, one selection (the 10 most helpful by influence), and a sweep of one seed without and with it.
# The steps and the files they hand on to each other are those of the full quickstart; only the sizes shrink.
set -euo pipefail
cd "$(dirname "$0")/.."
tiny=${QUICKSTART_TINY:-0}
if [ "$tiny" = 1 ]; then mode=tiny; out=${1:-outputs/quickstart_tiny}; else mode=full; out=${1:-outputs/quickstart}; fi
shared=${SHARED:-../shared}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
quiet=(--disable_tqdm true --report_to none --dataloader_num_workers 0)
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }
done_in() { [ -f "$1/run_complete.json" ]; }
logged() {  # LOG COMMAND...: run COMMAND with its output in LOG; if it fails, show LOG's traceback and stop
  local log=$1 status=0 traceback
  shift
  "$@" > "$log" 2>&1 || status=$?
  if [ "$status" -ne 0 ]; then
    traceback=$(awk '/^Traceback/ { shown = 1 } shown' "$log" | tail -n 100)
    {
      echo "FAILED (exit $status): $*"
      if [ -n "$traceback" ]; then
        echo "--- the traceback in $log ---"
        echo "$traceback"
      else
        echo "--- last 40 lines of $log ---"
        tail -n 40 "$log"
      fi
    } >&2
    exit "$status"
  fi
}
mkdir -p "$out"
if [ -f "$out/quickstart_mode" ] && [ "$(cat "$out/quickstart_mode")" != "$mode" ]; then
  echo "$out holds a $(cat "$out/quickstart_mode") quickstart; give another OUT_DIR for the $mode one" >&2
  exit 2
fi
echo "$mode" > "$out/quickstart_mode"

corpus="$shared/data/pretrain_chembl30_zinc_120k.csv"
lipophilicity="$shared/data/lipophilicity.csv"
pool="$shared/data/external_300.csv"
if [ "$tiny" = 1 ]; then
  head -n 301 "$lipophilicity" > "$out/lipophilicity_300.csv"
  head -n 41 "$pool" > "$out/external_40.csv"
  data=(--train_file "$out/lipophilicity_300.csv")  # the regression data, for every step that reads it
  pool="$out/external_40.csv"
  n_corpus=300; mlm_extra=(--max_eval_samples 64); epochs=1; k=10; n_passes=2; permutations=20
  picks="influence_top"; strategies="none influence_top"; seeds="1"
else
  data=(--dataset_name lipophilicity)
  n_corpus=3000; mlm_extra=(); epochs=2; k=30; n_passes=8; permutations=200
  picks="influence_top influence_bottom random uncertainty diversity all"
  strategies="none random influence_top influence_bottom"; seeds="1 2"
fi

step "1/6 masked-LM pretraining of a tiny MoLFormer on $n_corpus corpus molecules"
done_in "$out/mlm" || logged "$out/mlm.log" python run_mlm.py --config_name configs/molformer-tiny.json \
  --train_file "$corpus" --max_train_samples "$n_corpus" "${mlm_extra[@]}" \
  --exclude_files "$lipophilicity" "$shared/data/external_300.csv" \
  --output_dir "$out/mlm" --do_train --do_eval --num_train_epochs "$epochs" --per_device_train_batch_size 64 \
  --learning_rate 1e-3 --eval_strategy epoch --save_strategy no --dataloader_persistent_workers false "${quiet[@]}"
python -c "import json;r=json.load(open('$out/mlm/all_results.json'));print('MLM eval loss %.3f -> %.3f' % (r['eval_initial_loss'], r['eval_loss']))"

step "2/6 fine-tuning on Lipophilicity (split.json written here and reused below)"
done_in "$out/regression" || logged "$out/regression.log" python run_regression.py configs/regression_tiny.yaml \
  "${data[@]}" --model_name_or_path "$out/mlm" --output_dir "$out/regression" --num_train_epochs "$epochs" \
  --per_device_train_batch_size 32 "${quiet[@]}"
python -c "import json;r=json.load(open('$out/regression/all_results.json'));print('test RMSE %.3f  R2 %.3f' % (r['test_rmse'], r['test_r2']))"

step "3/6 influence of the $(($(wc -l < "$pool") - 1)) external molecules on the validation loss (head scope, conjugate gradient)"
done_in "$out/influence" || logged "$out/influence.log" python run_influence.py --model_name_or_path "$out/regression" \
  "${data[@]}" --external_file "$pool" --estimator cg --scope head \
  --output_dir "$out/influence" --disable_tqdm true
head -4 "$out/influence/influence_scores.csv"

step "4/6 selections of $k molecules"
pick() {  # name: run_selection.py with that selection's flags
  local name=$1 flags
  case $name in
    influence_top) flags=(--strategy influence --mode top --scores_file "$out/influence/influence_scores.csv") ;;
    influence_bottom) flags=(--strategy influence --mode bottom --scores_file "$out/influence/influence_scores.csv") ;;
    diversity) flags=(--strategy diversity --diversity_method maxmin) ;;
    *) flags=(--strategy "$name") ;;
  esac
  done_in "$out/selections/$name" || logged "$out/selections/$name.log" python run_selection.py \
    "${data[@]}" --external_file "$pool" --model_name_or_path "$out/regression" --k "$k" --seed 0 \
    --output_dir "$out/selections/$name" --n_passes "$n_passes" --mmd_permutations "$permutations" \
    --disable_tqdm true "${flags[@]}"
  echo "  $name: $(($(wc -l < "$out/selections/$name/selected.csv") - 1)) molecules"
}
mkdir -p "$out/selections"
for name in $picks; do pick "$name"; done

step "5/6 sweep: full fine-tuning x {$strategies} x seeds {$seeds}"
METHODS="full" STRATEGIES="$strategies" SEEDS="$seeds" \
  CONFIG=configs/regression_tiny.yaml METHOD_ARGS_lora="--learning_rate 5e-3" \
  bash scripts/sweep.sh "$out/sweep" "$out/regression/split.json" "$out/selections" \
  "${data[@]}" --model_name_or_path "$out/mlm" --num_train_epochs "$epochs" \
  --per_device_train_batch_size 32 "${quiet[@]}"

step "6/6 report"
logged "$out/report.log" python report.py --sweep_dir "$out/sweep" --output_dir "$out/report"
cat "$out/report/report.md"
step "finished: outputs under $out"
