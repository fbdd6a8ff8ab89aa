"""Who the run is: its rank and world, its name, and the step it resumes at.

Read once, at attach; nothing here runs during training.
"""

from __future__ import annotations

import os
import sys

import torch

from probes.protocol import rundir


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the job's size: torch.distributed's, else ``RANK``/``WORLD_SIZE``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def default_name() -> str:
    """The script's name without its extension (``train`` for ``train.py``), else ``run``."""
    return os.path.splitext(os.path.basename(sys.argv[0] or "run"))[0] or "run"


def unique_run_name(name: str) -> str:
    """``name``, or ``name-2``, ``name-3``... if a live run already has it,
    so that `xray-tui attach NAME` always means one run."""
    try:
        taken = {r.name for r in rundir.live_runs()}
    except rundir.RunDirError:
        return name  # the publisher reports the run directory problem
    n = 2
    candidate = name
    while candidate in taken:
        candidate = f"{name}-{n}"
        n += 1
    return candidate


def optimizer_step(optimizer) -> int:
    """The steps an optimizer has taken (a resumed run's): Adam-family ``state["step"]``, else 0.

    Read once, at attach; the count is a CPU tensor or a float in torch's
    optimizers (a capturable optimizer's device count costs one host read here)."""
    if optimizer is None:
        return 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step") if hasattr(optimizer, "state") else None
            if step is not None:
                try:
                    return max(0, int(float(step)))
                except (TypeError, ValueError):
                    return 0
    return 0
