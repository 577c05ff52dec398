"""How many CPU threads a training run uses.

torch starts one thread per core. For a small MoLFormer (the offline configs have 0.8-2.5M parameters) the
matrices are too small for two threads to help much, and on a shared machine the extra thread fights the
other jobs for a core: the README main command took 45 min instead of 6 on a busy 2-core box.
`benchmarks/bench_threads.py` measures both cases; README quotes its figures. Large models (the XL backbone)
keep torch's default. An explicit OMP_NUM_THREADS always wins.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

SMALL_MODEL_PARAMETERS = 5_000_000


def choose_cpu_threads(n_parameters: int, on_cpu: bool) -> int | None:
    """Set torch's thread count for a CPU run of a model this size; return it, or None when left alone."""
    if not on_cpu or os.environ.get("OMP_NUM_THREADS") or n_parameters >= SMALL_MODEL_PARAMETERS:
        return None
    if torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        logger.info(
            "Small model (%.1fM parameters) on the CPU: training on 1 thread, which is about as fast and "
            "does not fight other jobs for cores (set OMP_NUM_THREADS to choose).",
            n_parameters / 1e6,
        )
    return 1
