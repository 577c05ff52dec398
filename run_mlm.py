"""Masked-language-model training of MoLFormer on SMILES: pretraining from scratch or continued (domain) training.

The output folder is a complete checkpoint (MLM weights, tokenizer, config) that `run_regression.py
--model_name_or_path` loads directly; only the regression head is then newly initialised.

    python run_mlm.py configs/mlm_pretrain_small.yaml               # from scratch on the unlabeled corpus
    python run_mlm.py configs/mlm_adapt_lipophilicity.yaml          # continued on Lipophilicity TRAIN molecules
    python run_mlm.py configs/mlm_pretrain_small.yaml --bf16 true   # flags after the file override it

Molecules of held-out splits (`--split_file`, `--exclude_files`) are never trained on: they are removed from the
training corpus by canonical SMILES, and the overlap is logged and recorded in `mlm_data_summary.json`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import transformers
from transformers import EarlyStoppingCallback, TrainingArguments, set_seed

from molft import preflight
from molft.checkpoints import detect_last_checkpoint
from molft.cli import parse_args, setup_logging
from molft.files import ALL_RESULTS_FILE, MLM_DATA_SUMMARY_FILE, MLM_LOSS_CURVE_FILE, MODEL_CARD_FILE
from molft.io import mark_done, write_json, write_text
from molft.mlm import (
    MlmDataArguments,
    MlmModelArguments,
    compute_metrics,
    encode_smiles,
    load_model,
    load_tokenizer,
    mlm_collator,
    plot_loss_curve,
    preprocess_logits_for_metrics,
    push_output,
    with_perplexity,
)
from molft.mlm_corpus import evaluation_corpus, prepare_corpus
from molft.model_card import mlm_model_card
from molft.threads import choose_cpu_threads
from molft.trainer import ResultsTrainer, enable_mixed_precision, log_best_model

logger = logging.getLogger(__name__)


def main(args: list[str] | None = None) -> dict[str, float]:
    model_args, data_args, training_args = parse_args(
        (MlmModelArguments, MlmDataArguments, TrainingArguments), args, description=__doc__
    )
    if training_args.should_log:  # log_level "passive" then means info, as in the transformers examples
        transformers.utils.logging.set_verbosity_info()
    setup_logging(training_args.get_process_log_level())
    if data_args.early_stopping_patience is not None and not (
        training_args.load_best_model_at_end and training_args.eval_strategy != "no"
    ):
        raise ValueError("early_stopping_patience needs load_best_model_at_end=true and an eval_strategy.")
    # what the run needs from outside, checked before any data work or output (fails in seconds)
    new_model = model_args.model_name_or_path is None
    preflight.check_run_needs(
        models={
            "Model": model_args.model_name_or_path,
            "Config": model_args.config_name if new_model else None,
            "Tokenizer": model_args.tokenizer_name,
        },
        dataset=preflight.hub_dataset(data_args.dataset_name, local_files=bool(data_args.train_file)),
        push_to_hub=training_args.push_to_hub,
        report_to=training_args.report_to,
        cache_dir=model_args.cache_dir,
        revision=model_args.model_revision,
        offline_route=preflight.MLM_OFFLINE_ROUTE,
    )
    if data_args.auto_mixed_precision:
        enable_mixed_precision(training_args)
    logger.warning(
        "Process rank: %s, device: %s, n_gpu: %s, distributed: %s, 16-bits: %s",
        training_args.local_process_index,
        training_args.device,
        training_args.n_gpu,
        training_args.parallel_mode.value == "distributed",
        training_args.fp16 or training_args.bf16,
    )
    logger.info("Training/evaluation parameters %s", training_args)
    if training_args.remove_unused_columns:
        logger.info(
            "remove_unused_columns set to false: the collator reads the SMILES and mask seeds of items."
        )
        training_args.remove_unused_columns = False
    last_checkpoint = detect_last_checkpoint(
        training_args.output_dir,
        do_train=training_args.do_train,
        overwrite=data_args.overwrite_output_dir,
        resume_from_checkpoint=training_args.resume_from_checkpoint,
        process_index=training_args.process_index,
    )
    set_seed(training_args.seed)

    # Data: the corpus without held-out molecules, a tokenizer (built from it when training from scratch)
    if training_args.do_train or data_args.train_file or data_args.dataset_name:
        corpus = prepare_corpus(data_args, training_args.seed, model_args.cache_dir)
    else:  # evaluate a checkpoint on --validation_file only
        corpus = evaluation_corpus(data_args)
    evaluating = training_args.do_eval or training_args.eval_strategy != "no"
    if evaluating and not corpus.validation:
        raise ValueError(
            "Evaluation needs validation molecules: set validation_file or validation_split_percentage."
        )
    tokenizer = load_tokenizer(model_args, data_args, corpus.train, training_args.seed)
    model = load_model(model_args, tokenizer, data_args.max_seq_length)
    choose_cpu_threads(model.num_parameters(), on_cpu=training_args.device.type == "cpu")

    train_dataset = encode_smiles(
        corpus.train, tokenizer, data_args.max_seq_length, randomise=data_args.smiles_enumeration
    )
    eval_dataset = encode_smiles(
        corpus.validation, tokenizer, data_args.max_seq_length, mask_seed=training_args.seed
    )
    half_precision = training_args.fp16 or training_args.bf16
    trainer = ResultsTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if evaluating else None,
        processing_class=tokenizer,
        data_collator=mlm_collator(tokenizer, data_args, pad_to_multiple_of=8 if half_precision else None),
        compute_metrics=compute_metrics if evaluating else None,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics if evaluating else None,
    )

    # Baseline evaluation, training, final evaluation
    results: dict[str, float] = {}
    initial_metrics = None
    training_history: list[dict[str, Any]] = []
    resuming = training_args.resume_from_checkpoint is not None or last_checkpoint is not None
    if evaluating and data_args.eval_before_training and training_args.do_train and not resuming:
        initial_metrics = with_perplexity(trainer.evaluate(metric_key_prefix="eval_initial"), "eval_initial")
        trainer.log_metrics("eval_initial", initial_metrics)
        trainer.save_metrics("eval_initial", initial_metrics)
        results.update(initial_metrics)
    if data_args.early_stopping_patience is not None:
        # added after the baseline evaluation, whose metric names the callback would not recognise
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=data_args.early_stopping_patience))

    if training_args.do_train:
        train_result = trainer.train(
            resume_from_checkpoint=training_args.resume_from_checkpoint or last_checkpoint
        )
        log_best_model(trainer)
        trainer.save_model()  # model, config and tokenizer: a checkpoint run_regression.py loads directly
        train_metrics = {**train_result.metrics, "train_samples": len(train_dataset)}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        results.update(train_metrics)
        training_history = list(trainer.state.log_history)  # the curve ends before the final re-evaluation

    if evaluating and training_args.do_eval:
        eval_metrics = with_perplexity(trainer.evaluate(), "eval")
        eval_metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        results.update(eval_metrics)

    # Outputs: data summary, loss curve, model card, and the marker that the run finished
    if trainer.is_world_process_zero():
        output_dir = Path(training_args.output_dir)
        write_json(output_dir / MLM_DATA_SUMMARY_FILE, corpus.summary)
        if training_args.do_train:
            plot_loss_curve(training_history, initial_metrics, output_dir / MLM_LOSS_CURVE_FILE)
            card = mlm_model_card(model_args, data_args, trainer.model, corpus.summary, results)
            write_text(output_dir / MODEL_CARD_FILE, card)
            if training_args.push_to_hub:
                push_output(trainer, training_args)
        mark_done(output_dir, {"script": "run_mlm.py", "metrics": results, "data": corpus.summary})
        checkpoint = f"the checkpoint (run_regression.py --model_name_or_path {output_dir}), "
        logger.info(
            "Outputs are in %s: %smetrics in %s, the corpus summary in %s.",
            output_dir.resolve(),
            checkpoint if training_args.do_train else "",
            ALL_RESULTS_FILE,
            MLM_DATA_SUMMARY_FILE,
        )
    return results


if __name__ == "__main__":
    preflight.exit_on_missing_needs(main)
