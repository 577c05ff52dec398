"""Where a training run resumes, and whether saved weights can be read at all; shared by every training script.

A kill during a checkpoint save leaves `checkpoint-N` without `trainer_state.json` (the Trainer writes it
last) or with truncated weights. Resuming from it would crash with an error that names no file, on every
rerun, so such a checkpoint is skipped with a warning that names it, and the run resumes from the last
complete one. A weight file that cannot be read is named in the error of whatever tries to load it.

One behaviour for run_regression.py and run_mlm.py (`detect_last_checkpoint`), for a given `--output_dir`:

- `--overwrite_output_dir true`: start afresh; the main process drops a stale completion marker first.
- A finished run (`run_complete.json`) is never written into: every run, training or not, is refused.
- A training run resumes from the last complete checkpoint. Without one, it starts afresh only in a folder
  that holds nothing but what an interrupted run leaves before its first checkpoint (`EARLY_OUTPUTS`, log
  files, incomplete checkpoints); any other file makes it refuse, so a folder that is not a run (`.` with
  its README.md, say) is never written over.
- A run that does not train (evaluation, prediction, a hyperparameter search, which keeps no checkpoint)
  never resumes; the caller says so with `do_train=False`.
"""

from __future__ import annotations

import json
import logging
import re
import zipfile
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from molft.files import BASE_MODEL_DIR, DONE_MARKER, SPLIT_FILE, TRAINER_STATE_FILE
from molft.io import is_done

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# what a run writes before its first checkpoint: an interrupted run that left only these starts afresh
EARLY_OUTPUTS = frozenset(
    {
        SPLIT_FILE,  # run_regression.py, before training
        BASE_MODEL_DIR,  # run_regression.py, the base of an adapter trained from scratch
        "eval_initial_results.json",  # run_mlm.py, the evaluation before training
        "runs",  # the Trainer's TensorBoard logs
        "log.txt",  # scripts/sweep.sh sends each run's log there before the run starts
    }
)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive (since torch 1.6)


def weight_file_problem(path: str | Path) -> str | None:
    """Why the weight file `path` cannot be loaded (empty, truncated, not what its name says), else None.

    Reads the safetensors header, whose offsets must cover the file exactly, or a torch archive's central
    directory, which sits at its end: both catch a truncated file without reading the tensors.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return f"{path} is empty"
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt"):
                pass
        else:
            with path.open("rb") as handle:
                is_zip = handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
            if is_zip:  # a legacy (pre-zip) torch file has no cheap check; the loader reports it
                with zipfile.ZipFile(path) as archive:
                    archive.infolist()
    except Exception as error:  # noqa: BLE001  every reader error means the same thing here
        return f"{path} cannot be read, it is truncated or corrupt ({type(error).__name__}: {error})"
    return None


def weights_problem(folder: str | Path) -> str | None:
    """The first weight file of `folder` (not its subfolders) that cannot be loaded, or a missing shard."""
    folder = Path(folder)
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            problem = weight_file_problem(path)
            if problem:
                return problem
        elif path.is_file() and path.name.endswith(".index.json"):
            try:
                shards = set(json.loads(path.read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError) as error:
                return f"{path} cannot be read ({type(error).__name__}: {error})"
            missing = sorted(name for name in shards if not (folder / name).is_file())
            if missing:
                return f"{path} lists weight files that are missing: {', '.join(missing)}"
    return None


def check_weights(model_path: str | Path | None) -> None:
    """Raise an error naming the file when a local model folder holds weights that cannot be loaded.

    Call before `from_pretrained`, whose own error (safetensors' "incomplete metadata") names no file.
    A Hub id, or nothing, is left to the loader.
    """
    if model_path is None or not Path(model_path).is_dir():
        return
    problem = weights_problem(model_path)
    if problem:
        raise ValueError(f"Cannot load the model in {model_path}: {problem}.")


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why a Trainer checkpoint folder cannot be resumed from (its save was interrupted), else None."""
    checkpoint = Path(checkpoint)
    state = checkpoint / TRAINER_STATE_FILE
    if not state.is_file():
        return f"it has no {TRAINER_STATE_FILE} (its save was interrupted)"
    try:
        json.loads(state.read_text())
    except ValueError as error:
        return f"its {TRAINER_STATE_FILE} is truncated or corrupt ({error})"
    return weights_problem(checkpoint)


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest step) first."""
    found = [
        (int(match.group(1)), path)
        for path in Path(output_dir).iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))
    ]
    return [path for _, path in sorted(found, reverse=True)]


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint that can be resumed from; each newer, incomplete one is skipped with a warning."""
    for checkpoint in checkpoint_folders(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return str(checkpoint)
        logger.warning("Skipping incomplete checkpoint %s: %s.", checkpoint, problem)
    return None


def _is_early_output(path: Path) -> bool:
    """Left by a run interrupted before its first checkpoint: starting afresh over it loses nothing."""
    name = path.name
    return (
        name in EARLY_OUTPUTS
        or name.endswith(".log")
        or (name.startswith(".") and name.endswith(".tmp"))  # molft.io's temporary files
        or (CHECKPOINT_PATTERN.match(name) is not None and path.is_dir())  # incomplete: already skipped
    )


def detect_last_checkpoint(
    output_dir: str | Path,
    *,
    do_train: bool,
    overwrite: bool,
    resume_from_checkpoint: str | None = None,
    process_index: int = 0,
) -> str | None:
    """The checkpoint to resume an interrupted run from; refuse to write into a finished run or a foreign folder.

    See the module docstring for the rules. `resume_from_checkpoint` (the user's own choice, which the
    caller passes to the Trainer instead) is checked so that a broken one is named before training.
    """
    output_dir = Path(output_dir)
    if do_train and resume_from_checkpoint:
        if not Path(resume_from_checkpoint).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist.")
        problem = checkpoint_problem(resume_from_checkpoint)
        if problem:
            raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
    if not (output_dir.is_dir() and any(output_dir.iterdir())):
        return None
    if overwrite:
        if process_index == 0:  # a stale marker would claim the new run finished; one process removes it
            (output_dir / DONE_MARKER).unlink(missing_ok=True)
        return None
    if is_done(output_dir):
        raise ValueError(
            f"Output directory {output_dir} already holds a finished run ({DONE_MARKER}), whose results this run "
            f"would overwrite. Use another --output_dir (with --model_name_or_path {output_dir} to evaluate or "
            "predict with its model), or --overwrite_output_dir true to replace it."
        )
    if not do_train:
        return None
    last = last_complete_checkpoint(output_dir)
    if last is None:
        foreign = sorted(path.name for path in output_dir.iterdir() if not _is_early_output(path))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise ValueError(
                f"Output directory {output_dir} is not empty and holds no checkpoint to resume (it holds "
                f"{shown}); use --overwrite_output_dir true or another --output_dir."
            )
        logger.info("%s holds no complete checkpoint: starting afresh.", output_dir)
        return None
    if resume_from_checkpoint is None:
        logger.info("Resuming from %s (pass --overwrite_output_dir true to start afresh).", last)
    return last
