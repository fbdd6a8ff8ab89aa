"""Which weight matrices of a model are analysed, and the metrics of all of them.

Every floating-point parameter with 2 or more dimensions, named as the probe
names it (:func:`probes.protocol.names.unwrap_name`), with peft-style LoRA
adapters merged into their base weight (W + B·A·scaling); FSDP2 shards and
matrices too small to fit are listed as skipped, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from probes.distributed.shards import is_dtensor
from probes.protocol.names import unwrap_name
from probes.spectral.analysis import MIN_EVALS, Metrics, analyze_matrix


@dataclass
class Target:
    """One matrix to analyse: a parameter, and the LoRA adapters to merge into it."""

    name: str
    param: torch.Tensor
    lora: list = field(default_factory=list)  # (A, B, scaling, fan_in_fan_out)

    def tensor(self) -> torch.Tensor:
        """The weight to analyse: the parameter, or W + B·A·scaling with LoRA."""
        w = self.param.detach()
        if not self.lora:
            return w
        w = w.float().clone()
        for a, b, scaling, fan_in_fan_out in self.lora:
            delta = (b.detach().float() @ a.detach().float()) * scaling
            w += delta.T if fan_in_fan_out else delta
        return w


def _lora_parts(module: nn.Module) -> list:
    """peft-style adapters of ``module`` (active, unmerged ones) as (A, B, scaling, fan_in_fan_out)."""
    la, lb = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not isinstance(la, nn.ModuleDict) or not isinstance(lb, nn.ModuleDict) or getattr(module, "merged", False):
        return []
    active = getattr(module, "active_adapters", None) or list(la.keys())
    if isinstance(active, str):
        active = [active]
    scaling = getattr(module, "scaling", {}) or {}
    parts = []
    for key in active:
        if key in la and key in lb and hasattr(la[key], "weight") and hasattr(lb[key], "weight"):
            parts.append((la[key].weight, lb[key].weight, float(scaling.get(key, 1.0)),
                          bool(getattr(module, "fan_in_fan_out", False))))
    return parts


def targets(model: nn.Module, min_evals: int = MIN_EVALS) -> tuple[list[Target], list[tuple[str, str]]]:
    """The matrices of ``model`` to analyse, and the (name, reason) of weights left out.

    Every floating-point parameter with 2 or more dimensions counts, in
    ``named_parameters`` order, except LoRA's own A/B factors (they are merged
    into their base weight) and matrices with fewer than ``min_evals``
    eigenvalues (WeightWatcher's ``min_evals``), which are listed as skipped.
    """
    lora_of: dict[int, list] = {}
    lora_params: set[int] = set()
    for module in model.modules():
        parts = _lora_parts(module)
        base = getattr(module, "base_layer", None)
        if parts and base is not None and getattr(base, "weight", None) is not None:
            lora_of[id(base.weight)] = parts
            for a, b, *_ in parts:
                lora_params.update((id(a), id(b)))
    out, skipped = [], []
    for pname, p in model.named_parameters():
        if not p.is_floating_point() or p.dim() < 2 or id(p) in lora_params:
            continue
        name = unwrap_name(pname)  # the probe's names: one list of wrappers for both
        if is_dtensor(p):
            # FSDP2: this rank holds a shard; the spectrum needs the whole matrix, and DTensor ops
            # here would run collectives from the monitor's thread, out of step with training's
            skipped.append((name, "sharded (DTensor): the spectrum needs the whole matrix"))
            continue
        short = min(p.shape[0], p.shape[1]) if p.dim() == 2 else min(p.shape[0], p.shape[1]) * int(np.prod(p.shape[2:]))
        if short < min_evals:
            skipped.append((name, f"{short} eigenvalues < min_evals {min_evals}"))
            continue
        out.append(Target(name, p, lora_of.get(id(p), [])))
    return out, skipped


def analyze_model(model: nn.Module, *, max_dim: int = 4096, bins: int = 32, progress=None) -> list[Metrics]:
    """Metrics of every target matrix of ``model`` (in the calling thread)."""
    tg, _ = targets(model)
    out = []
    for t in tg:
        out.append(analyze_matrix(t.tensor(), t.name, max_dim=max_dim, bins=bins))
        if progress is not None:
            progress(t.name)
    return out
