"""Check, before any data work, what a run needs from outside this machine, and fail in seconds if it is missing.

Without this, an offline run that names a Hub model spends minutes preparing data, then prints a screen of
retries and chained tracebacks ending in a bare connection error. Here every need (a Hub model or dataset,
`--push_to_hub`, a `--report_to` backend) is checked first and all that is missing is reported in one message
that names the offline way to proceed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

OFFLINE_ROUTE = (
    "Offline, train a new small MoLFormer instead: `python run_regression.py configs/regression_small.yaml` "
    "(or add `--config_name configs/molformer-small.json`), or give --model_name_or_path a local checkpoint folder."
)
MLM_OFFLINE_ROUTE = (
    "Offline, pretrain a new small MoLFormer instead: `python run_mlm.py configs/mlm_pretrain_small.yaml` "
    "(a --config_name without --model_name_or_path), or give --model_name_or_path a local checkpoint folder."
)

# `--report_to` names and the module each needs (the transformers integration names)
REPORT_BACKENDS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "trackio": ("trackio",),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
    "dvclive": ("dvclive",),
    "neptune": ("neptune",),
    "codecarbon": ("codecarbon",),
    "swanlab": ("swanlab",),
    "azure_ml": ("azureml",),
}
REPORT_INSTALL_HINT = "pip install '.[tracking]' (tensorboard and trackio), or --report_to none"


class PreflightError(RuntimeError):
    """What a run needs from outside and cannot have, with the way to proceed; raised before any output."""


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: nothing will be downloaded."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "0") in (
        "1",
        "true",
        "TRUE",
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub endpoint answers a TCP connection within `timeout` seconds (never retried)."""
    if hub_offline():
        return False
    from huggingface_hub import constants

    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def is_cached(
    repo_id: str, filename: str, cache_dir: str | None, revision: str | None, repo_type: str
) -> bool:
    """Whether `filename` of a Hub repository is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        repo_id, filename, cache_dir=cache_dir, revision=revision, repo_type=repo_type
    )
    return isinstance(found, str)


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a Hub repository id ('name' or 'owner/name'), i.e. is not only a local path."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def missing_model(
    name: str | None, what: str, cache_dir: str | None, revision: str | None, online: bool
) -> str | None:
    """Why `name` cannot be loaded here, or None when it is a local folder, cached or downloadable."""
    if name is None or Path(name).exists():
        return None
    if not is_hub_id(name):
        return f"{what} {name!r} does not exist (no such file or folder, and not a model id)."
    if online or is_cached(name, "config.json", cache_dir, revision, "model"):
        return None
    return (
        f"{what} {name!r} is not a local folder and not in the Hugging Face cache, and the Hub cannot be "
        "reached" + (" (HF_HUB_OFFLINE is set)." if hub_offline() else ".")
    )


def missing_dataset(name: str | None, cache_dir: str | None, online: bool) -> str | None:
    """Why a Hub dataset `name` cannot be loaded here (None for local files and downloadable datasets)."""
    if name is None or Path(name).exists() or online:
        return None
    if is_cached(name, "README.md", cache_dir, None, "dataset"):
        return None
    return f"Dataset {name!r} is on the Hub, which cannot be reached; pass --train_file with a local file."


def hub_dataset(dataset_name: str | None, local_files: bool) -> str | None:
    """The Hub dataset a run will download: None for local files and for embedded copies (Lipophilicity, ESOL)."""
    from molft.data import EMBEDDED_DATASETS, embedded_path

    if local_files or not dataset_name:
        return None
    if dataset_name.lower() not in EMBEDDED_DATASETS:
        return dataset_name
    try:
        embedded_path(dataset_name.lower())
    except (ImportError, FileNotFoundError):
        return EMBEDDED_DATASETS[dataset_name.lower()].hub_id  # what molft.data falls back to
    return None


def adapter_base_model(path: str | None) -> str | None:
    """The Hub id of an adapter folder's base model; None for a full model, a local base or no folder.

    A local base (absolute, or relative to the adapter folder) is found or reported when the adapter loads.
    """
    config = Path(path) / "adapter_config.json" if path else None
    if config is None or not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base or base.startswith((".", "/", "~")) or Path(base).exists() or (Path(path) / base).exists():
        return None
    return base if is_hub_id(base) else None


def missing_report_backends(report_to: Iterable[str] | str | None) -> list[str]:
    """The `--report_to` backends whose package is not installed (unknown names are left to transformers)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names or "none" in names:
        return []
    return [
        name
        for name in names
        if name in REPORT_BACKENDS
        and not any(importlib.util.find_spec(module) for module in REPORT_BACKENDS[name])
    ]


def check_run_needs(
    *,
    models: dict[str, str | None],
    dataset: str | None = None,
    push_to_hub: bool = False,
    report_to: Iterable[str] | str | None = None,
    cache_dir: str | None = None,
    revision: str | None = None,
    timeout: float = 3.0,
    offline_route: str = OFFLINE_ROUTE,
) -> None:
    """Raise one PreflightError listing everything the run needs from outside and cannot get.

    `models` maps a flag's meaning (e.g. "Model") to a Hub id or local path; `dataset` is a Hub dataset id
    (None when the data is local or embedded). The Hub is asked at most once, with a short timeout.
    `offline_route` is the script's way to proceed without the Hub, added when the Hub is missed.
    """
    problems: list[str] = []
    remote = [n for n in (*models.values(), dataset) if n is not None and not Path(n).exists()]
    online = bool(remote or push_to_hub) and hub_reachable(timeout)
    for what, name in models.items():
        problem = missing_model(name, what, cache_dir, revision, online)
        if problem:
            problems.append(problem)
    problem = missing_dataset(dataset, cache_dir, online)
    if problem:
        problems.append(problem)
    if push_to_hub and not online:
        problems.append("--push_to_hub needs the Hub, which cannot be reached; push later with `hf upload`.")
    backends = missing_report_backends(report_to)
    if backends:
        problems.append(f"--report_to {','.join(backends)}: not installed ({REPORT_INSTALL_HINT}).")
    if problems:
        route = offline_route if any("Hub" in p for p in problems) else ""
        raise PreflightError(" ".join(["Cannot start this run:", *problems, route]).strip())


def exit_on_missing_needs(main: Callable[[], Any]) -> None:
    """Run a script's main(); a PreflightError ends it as argparse ends a bad command line.

    One line on stderr and exit status 2, instead of a traceback for something that is not a bug;
    main() itself still raises, for callers in Python. After a run under a DDP launcher, the process
    group is closed on every rank before the interpreter exits.
    """
    try:
        main()
    except PreflightError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    end_process_group()


def end_process_group() -> None:
    """Close the torch.distributed group that a DDP launch opened, once every rank has finished.

    A process that exits with its gloo group still open can abort in the group's C++ threads while the
    interpreter shuts down ("terminate called without an active exception", SIGABRT), which fails a run
    whose outputs were all written (pytorch/pytorch#190489). The barrier keeps one rank from closing the
    group while another is still inside its last collective.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
