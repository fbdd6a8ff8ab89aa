"""What `xray-tui inspect` and `xray-tui compare` are asked for, what they wrote, and the one error they raise."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from probes.inspect.pictures import HEATMAP_MAX, POOLS


DEFAULT_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
                "it was the age of foolishness.")




class InspectError(Exception):
    """A model directory that cannot be inspected; the message is one line."""


@dataclass
class Options:
    """What `xray-tui inspect` computes and where it writes."""

    text: str = DEFAULT_TEXT
    layers: list[int] | None = None  # transformer block indices; None: all
    weights: bool = True
    activations: bool = True
    gradients: bool = True
    bins: int = 64
    device: str = "cpu"
    progress: bool = True
    max_dim: int = 4096
    plots: bool = True  # False: the JSON statistics and the recording only, no SVG
    heatmaps: bool = True  # False: histograms only
    heatmap_max_dim: int = HEATMAP_MAX  # largest heatmap side in cells
    eps: float = 0.05  # near-zero threshold (|x| < eps), also for dead units
    hist_scale: str = "linear"  # histogram bar heights: counts on a "linear" or "log" axis
    heatmap_pool: str = "max"  # "max": largest |x| per block (outliers stay); "mean": block means


@dataclass
class Report:
    """What was written."""

    out: Path
    json_path: Path
    recording: Path
    entries: int
    pictures: list[Path] = field(default_factory=list)
    loss: float | None = None
    notes: list[str] = field(default_factory=list)  # what was done instead of the expected


def check(opts: Options) -> None:
    """One-line errors for options out of range (before any model is loaded)."""
    if opts.bins < 1:
        raise InspectError(f"--bins must be >= 1, got {opts.bins}")
    if opts.heatmap_max_dim < 1:
        raise InspectError(f"--heatmap-max-dim must be >= 1, got {opts.heatmap_max_dim}")
    if opts.hist_scale not in ("linear", "log"):
        raise InspectError(f"--hist-scale must be linear or log, got {opts.hist_scale!r}")
    if opts.heatmap_pool not in POOLS:
        raise InspectError(f"--heatmap-pool must be max or mean, got {opts.heatmap_pool!r}")
    if not (math.isfinite(opts.eps) and opts.eps > 0):
        raise InspectError(f"--eps must be a finite number > 0, got {opts.eps}")
