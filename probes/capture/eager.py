"""Keeping the probe's own work out of torch.compile's graphs."""

from __future__ import annotations

import torch


def eager(fn):
    """Never compiled, nor anything it calls: a hook that runs eagerly inside a
    torch.compile'd call (a frame dynamo skipped or fell back on) would
    otherwise have each function it calls compiled on its own."""
    return torch.compiler.disable(fn, recursive=True)
