"""Watched modules' outputs on a sampled forward pass: held, then reduced together.

The forward hooks hand each output here; it is held (a reference, no copy)
in the pass's batch and reduced with the others when the forward ends, or
early when the held outputs pass :data:`ACT_HOLD_BYTES`. Under
torch.compile the hold is traced into the graph instead (graph outputs, no
Python-side bookkeeping) and reduced at the optimizer step.
"""

from __future__ import annotations

from typing import Callable

import torch

from probes.capture.eager import eager
from probes.capture.selection import unreadable
from probes.engines.batch import Batch
from probes.engines.reduce import dead_units

#: Activation bytes held for a batched reduction before it runs early (in the hook): what the
#: probe may add to the step's peak memory (with its workspace, under 64 MiB + 1% of the parameters).
ACT_HOLD_BYTES = 32 << 20


def first_tensor(out):
    """A module's output tensor: the output itself, or the first item of a tuple or list."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


class Activations:
    """Holds and reduces the outputs of the hooked modules on sampled passes.

    ``units``: names of the activation-function modules, whose dead units are
    counted. ``part`` is the probe part that a failure switches off: ``"act"``
    (training passes) or ``"eval"`` (evaluation passes), in the probe's
    ``failed`` set.
    """

    def __init__(self, units: set[str], eps: float, failed: set[str], fail: Callable[[str], None],
                 skip: Callable[[str, str, str], None]) -> None:
        self.units = units
        self.eps = eps
        self._failed, self._fail, self._skip = failed, fail, skip

    def hold_traced(self, name: str, output, part: str, batch: Batch) -> None:
        """Traced by torch.compile: tensor ops and list appends only, so the hook adds graph
        outputs instead of breaking the graph (no logging, no early reduction, and no
        read of the `seen` set, whose contents dynamo would guard on)."""
        x = first_tensor(output)
        if x is not None and x.is_floating_point() and x.layout == torch.strided and part not in self._failed:
            batch.hold(name, "act", x, dead=dead_units(x, self.eps) if name in self.units else None,
                       detach=False)

    @eager
    def hold(self, name: str, output, part: str, batch: Batch, seen: set) -> None:
        """Hold one module's output in ``batch`` once per pass (``seen``), reducing early
        when the held outputs grow past :data:`ACT_HOLD_BYTES`."""
        if name in seen or part in self._failed:
            return
        try:
            x = first_tensor(output)
            if x is None or not x.is_floating_point():
                return
            if x.layout != torch.strided or x.is_meta:
                self._skip(name, "act", unreadable(x))
                return
            seen.add(name)  # gradient checkpointing runs forward twice
            batch.hold(name, "act", x, units=name in self.units)
            if batch.held_bytes > ACT_HOLD_BYTES:
                batch.reduce()  # bound the memory that held activations keep alive
        except Exception:
            self._fail(part)

    @eager
    def reduce(self, batch: Batch) -> None:
        """Reduce the held outputs of a training forward that just ended, and let them go."""
        if "act" not in self._failed:
            try:
                batch.reduce()
            except Exception:
                self._fail("act")
