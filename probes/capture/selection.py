"""Which modules and parameters a probe watches, and the names it gives them.

Decided once, at attach: the modules whose outputs are hooked
(:func:`select_modules`, narrowed by ``include``/``exclude`` patterns and by
``layers``, :func:`block_filter`), the parameters that are read (floating
point, dense, with values), which of them each rank holds only a piece of
(FSDP), and the tensors left out with the reason why. Names are given
without the wrappers' parts (:func:`~probes.protocol.names.unwrap_name`): DDP, torch.compile, PEFT,
FSDP1 and activation checkpointing (:mod:`probes.protocol.names`); a rank's
shard of a tensor is :mod:`probes.distributed.shards`'s.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable

import torch
from torch import nn

from probes.distributed.shards import is_sharded
from probes.protocol.names import unwrap_name


def is_activation(module: nn.Module) -> bool:
    """Activation functions: torch's own and those named like them."""
    if type(module).__module__ == "torch.nn.modules.activation":
        return True
    name = type(module).__name__
    return name.endswith("Activation") or name in {"GELU", "ReLU", "SiLU", "Tanh", "Sigmoid"}


def _is_block(name: str, module: nn.Module, parent_is_list: bool) -> bool:
    """Transformer blocks: the items of a ModuleList of composite modules."""
    return parent_is_list and any(True for _ in module.children())


def select_modules(model: nn.Module, include: Iterable[str] | None = None,
                   exclude: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Modules whose outputs are hooked by default: leaf modules with
    parameters, activation functions and transformer blocks; narrowed by
    glob patterns on the module path."""
    list_children = {id(c) for m in model.modules() if isinstance(m, nn.ModuleList) for c in m}
    chosen = []
    for name, module in model.named_modules():
        if not name:
            continue
        leaf = not any(True for _ in module.children())
        has_params = any(True for _ in module.parameters(recurse=False))
        if not ((leaf and has_params) or is_activation(module) or _is_block(name, module, id(module) in list_children)):
            continue
        if include and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if exclude and any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        chosen.append((name, module))
    return chosen


def block_list(model: nn.Module) -> tuple[str, int] | None:
    """The model's list of transformer blocks: its (unwrapped) path, e.g.
    ``transformer.h``, and length. It is the longest ``ModuleList`` of
    composite modules (the first of equals, in model order); None if the
    model has none."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and any(True for _ in m[0].children()):
            if best is None or len(m) > best[1]:
                best = (unwrap_name(name), len(m))
    return best


def block_filter(model: nn.Module, layers: Iterable[int]):
    """A predicate over (unwrapped) module or parameter paths: inside one of
    the transformer blocks ``layers`` (indices into :func:`block_list`).
    Raises ValueError for a model without blocks or an index it lacks."""
    layers = list(layers)
    if not layers:
        raise ValueError("layers=[]: give at least one block index, or None for every layer")
    found = block_list(model)
    if found is None:
        raise ValueError(f"layers={layers}: this model has no list of transformer blocks "
                         "(a ModuleList of composite modules); use include/exclude patterns")
    prefix, n = found
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layers={layers}: no block {', '.join(map(repr, bad))}; "
                         f"{prefix} has blocks 0..{n - 1}")
    heads = tuple(f"{prefix}.{i}" for i in sorted(set(layers)))
    starts = tuple(h + "." for h in heads)
    return lambda path: path in heads or path.startswith(starts)


def unreadable(t: torch.Tensor) -> str:
    """Why the probe cannot read ``t`` ("" if it can): no values, or not a dense tensor."""
    if t.is_meta:
        return "on the meta device: it has no values"
    if t.layout != torch.strided:
        return f"{str(t.layout).replace('torch.', '')} layout: only dense (strided) tensors are read"
    return ""


class Watched:
    """What a probe watches in ``model``, chosen once at attach.

    ``params``: (name, parameter) of every floating-point parameter read, in
    model order; ``trainable``: those that require a gradient; ``sharded``:
    ids of the parameters each rank holds a different piece of (FSDP);
    ``modules``: (name, module) whose outputs are hooked; ``activations``: the
    names among them that are activation functions (their dead units are
    counted); ``unread``: module -> {"weight": why, "weight.grad": why, ...}
    for the tensors left out, each also given to ``skip(name, kind, why)``.
    Raises ValueError (before anything is hooked) for ``layers`` the model lacks.
    """

    def __init__(self, model: nn.Module, include: Iterable[str] | None, exclude: Iterable[str] | None,
                 layers: Iterable[int] | None, skip: Callable[[str, str, str], None]) -> None:
        inside = block_filter(model, layers) if layers is not None else None
        self.unread: dict[str, dict[str, str]] = {}
        self.params: list[tuple[str, nn.Parameter]] = []
        self.sharded: set[int] = set()
        for raw, p in model.named_parameters():
            n = unwrap_name(raw)
            if not p.is_floating_point() or (inside is not None and not inside(n)):
                continue
            why = unreadable(p)
            if why:
                mod, _, short = n.rpartition(".")
                self.unread.setdefault(mod, {})[short] = why
                skip(n, "weight", why)
                continue
            self.params.append((n, p))
            if is_sharded(raw, p):
                self.sharded.add(id(p))
        watched = {id(p) for _, p in self.params}
        for mname, m in model.named_modules():  # gradients known to come sparse
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse and id(m.weight) in watched:
                self.unread.setdefault(unwrap_name(mname), {})["weight.grad"] = "sparse gradient (sparse=True)"
        modules = [(unwrap_name(n), m) for n, m in select_modules(model, include, exclude)]
        if inside is not None:
            modules = [(n, m) for n, m in modules if inside(n)]
        self.modules: list[tuple[str, nn.Module]] = modules
        self.activations: set[str] = {n for n, m in modules if is_activation(m)}
        self.trainable: list[tuple[str, nn.Parameter]] = [(n, p) for n, p in self.params if p.requires_grad]
