"""The names of the files one script writes and another reads, declared once.

A run folder is an interface between scripts (run_regression.py writes, run_influence.py, run_selection.py,
scripts/sweep.sh and report.py read), so every name lives here and nowhere else in the code.
"""

from __future__ import annotations

# run_regression.py
SPLIT_FILE = "split.json"
ALL_RESULTS_FILE = "all_results.json"
PREDICTIONS_FILE = "predictions.csv"
PREDICT_PREDICTIONS_FILE = "predict_predictions.csv"
RUN_CONFIG_FILE = "run_config.json"
RUN_OPTIONS_FILE = "run_options.yaml"
LOSS_CURVES_FILE = "loss_curves.png"
PARITY_PLOT_FILE = "parity_test.png"
# several regression targets: one parity plot per target; classification: ROC curves and reliability diagram
PARITY_TARGET_PLOT_FILE = "parity_test_{target}.png"
ROC_CURVE_FILE = "roc_test.png"
RELIABILITY_PLOT_FILE = "reliability_test.png"
MODEL_CARD_FILE = "README.md"
HP_SEARCH_FILE = "hp_search.json"
BEST_CONFIG_FILE = "best_config.yaml"
MERGED_DIR = "merged"
# the saved base of an adapter trained on a model from scratch; peft_setup looks for it beside the adapter
BASE_MODEL_DIR = "base_model"

# every script: written last, so a folder that has it holds a finished run
DONE_MARKER = "run_complete.json"

# run_mlm.py
MLM_DATA_SUMMARY_FILE = "mlm_data_summary.json"
MLM_LOSS_CURVE_FILE = "mlm_loss_curve.png"

# run_influence.py
INFLUENCE_SCORES_FILE = "influence_scores.csv"
INFLUENCE_SUMMARY_FILE = "influence_summary.json"
INFLUENCE_HISTOGRAM_FILE = "influence_histogram.png"
INFLUENCE_MATRIX_FILE = "influence_matrix.npy"
INFLUENCE_QUERIES_FILE = "influence_queries.csv"
VALIDATION_CSV = "validation.csv"
VALIDATION_MD = "validation.md"
# run_influence.py --validate lds: the results, and the retrainings (shared between runs through --lds_dir)
LDS_SUBSETS_FILE = "lds_subsets.csv"
LDS_SUMMARY_FILE = "lds_summary.json"
LDS_GROUPS_FILE = "lds_groups.csv"
LDS_SCORES_FILE = "lds_scores.csv"  # every estimator@scope's score per pool molecule, for reuse
LDS_RETRAIN_DIR = "lds_retrains"
LDS_PLAN_FILE = "lds_plan.json"
# inside one retraining's folder: the molecules added, the options replayed, the log, run_regression's output
LDS_EXTRA_FILE = "extra_train.csv"
LDS_RETRAIN_OPTIONS_FILE = "retrain_options.yaml"
LDS_RETRAIN_LOG = "log.txt"
LDS_RUN_DIR = "run"

# run_selection.py
SELECTED_FILE = "selected.csv"
MANIFEST_FILE = "manifest.json"
MERGED_TRAIN_FILE = "merged_train.csv"
SHIFT_REPORT_FILE = "shift_report.json"
SHIFT_PLOT_FILE = "shift_diagnostics.png"

# checkpoints written by the Trainer
TRAINER_STATE_FILE = "trainer_state.json"
