#!/usr/bin/env bash
# The whole pipeline, offline, on the embedded Lipophilicity and the shared external set, at toy size:
#   1. run_mlm.py         pretrain a tiny MoLFormer on a slice of the shared SMILES corpus
#   2. run_regression.py  fine-tune it on Lipophilicity (writes split.json, reused by every later step)
#   3. run_influence.py   score the external molecules by influence on the validation loss
#   4. run_selection.py   pick external molecules: influence top/bottom, random, uncertainty, diversity, all
#   5. scripts/sweep.sh   retrain with four of the selections (full fine-tuning, 2 seeds)
#   6. report.py          tables with confidence intervals and paired tests
#
#   bash scripts/quickstart.sh [OUT_DIR]       (default outputs/quickstart; SHARED=../shared)
#
# Everything is deliberately tiny so that it finishes on 2 CPU cores; the numbers it prints show that the
# pipeline works, not what MoLFormer can reach. Steps that already finished are skipped on a rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/quickstart}
shared=${SHARED:-../shared}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
quiet=(--disable_tqdm true --report_to none --dataloader_num_workers 0)
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }
done_in() { [ -f "$1/run_complete.json" ]; }
mkdir -p "$out"

step "1/6 masked-LM pretraining of a tiny MoLFormer on 3,000 corpus molecules"
done_in "$out/mlm" || python run_mlm.py --config_name configs/molformer-tiny.json \
  --train_file "$shared/data/pretrain_chembl30_zinc_120k.csv" --max_train_samples 3000 \
  --exclude_files "$shared/data/lipophilicity.csv" "$shared/data/external_300.csv" \
  --output_dir "$out/mlm" --do_train --do_eval --num_train_epochs 2 --per_device_train_batch_size 64 \
  --learning_rate 1e-3 --eval_strategy epoch --save_strategy no --dataloader_persistent_workers false "${quiet[@]}" \
  > "$out/mlm.log" 2>&1
python -c "import json;r=json.load(open('$out/mlm/all_results.json'));print('MLM eval loss %.3f -> %.3f' % (r['eval_initial_loss'], r['eval_loss']))"

step "2/6 fine-tuning on Lipophilicity (split.json written here and reused below)"
done_in "$out/regression" || python run_regression.py configs/regression_tiny.yaml --dataset_name lipophilicity \
  --model_name_or_path "$out/mlm" --output_dir "$out/regression" --num_train_epochs 2 \
  --per_device_train_batch_size 32 "${quiet[@]}" > "$out/regression.log" 2>&1
python -c "import json;r=json.load(open('$out/regression/all_results.json'));print('test RMSE %.3f  R2 %.3f' % (r['test_rmse'], r['test_r2']))"

step "3/6 influence of the 300 external molecules on the validation loss (head scope, conjugate gradient)"
done_in "$out/influence" || python run_influence.py --model_name_or_path "$out/regression" \
  --external_file "$shared/data/external_300.csv" --estimator cg --scope head \
  --output_dir "$out/influence" --disable_tqdm true > "$out/influence.log" 2>&1
head -4 "$out/influence/influence_scores.csv"

step "4/6 selections of 30 molecules"
pick() {  # name, then run_selection.py flags
  local name=$1; shift
  done_in "$out/selections/$name" || python run_selection.py --external_file "$shared/data/external_300.csv" \
    --model_name_or_path "$out/regression" --k 30 --seed 0 --output_dir "$out/selections/$name" \
    --n_passes 8 --mmd_permutations 200 --disable_tqdm true "$@" > "$out/selections/$name.log" 2>&1
  echo "  $name: $(($(wc -l < "$out/selections/$name/selected.csv") - 1)) molecules"
}
mkdir -p "$out/selections"
pick influence_top --strategy influence --mode top --scores_file "$out/influence/influence_scores.csv"
pick influence_bottom --strategy influence --mode bottom --scores_file "$out/influence/influence_scores.csv"
pick random --strategy random
pick uncertainty --strategy uncertainty
pick diversity --strategy diversity --diversity_method maxmin
pick all --strategy all

step "5/6 sweep: full fine-tuning x {none, random, influence_top, influence_bottom} x 2 seeds"
METHODS="full" STRATEGIES="none random influence_top influence_bottom" SEEDS="1 2" \
  CONFIG=configs/regression_tiny.yaml METHOD_ARGS_lora="--learning_rate 5e-3" \
  bash scripts/sweep.sh "$out/sweep" "$out/regression/split.json" "$out/selections" \
  --dataset_name lipophilicity --model_name_or_path "$out/mlm" --num_train_epochs 2 \
  --per_device_train_batch_size 32 "${quiet[@]}"

step "6/6 report"
python report.py --sweep_dir "$out/sweep" --output_dir "$out/report" > "$out/report.log" 2>&1
cat "$out/report/report.md"
step "finished: outputs under $out"
