"""What a probe's Hello says about the model: its layers, param groups and precision.

Worked out once, at attach, from what :class:`~probes.capture.selection.Watched`
chose; viewers build their layer table from it.
"""

from __future__ import annotations

import os
import sys
import time

import torch
from torch import nn

from probes.capture.selection import is_activation
from probes.protocol.names import unwrap_name
from probes.protocol import histogram, wire


def precision(params, scaler) -> str:
    """The training precision the parameters show: fp32, bf16 or fp16, with "+scaler"."""
    dtypes = {p.dtype for _, p in params}
    name = "fp16" if torch.float16 in dtypes else "bf16" if torch.bfloat16 in dtypes else "fp32"
    return name + "+scaler" if scaler is not None else name


def layer_infos(model: nn.Module, params, hooked: dict[str, nn.Module], unread: dict[str, dict[str, str]],
                adapter_of: dict[str, str], optimizer=None) -> tuple[list[wire.LayerInfo], dict[str, int]]:
    """The Hello's layers, in model order (each LoRA adapter right after its base
    module), and each optimized parameter's param group (``Hello.param_groups``).

    A layer is a module with watched parameters, a hooked output, or tensors left
    out (``unread``); its parameters are marked frozen (no gradient) or
    unoptimized (a gradient, but in none of ``optimizer``'s param groups).
    """
    by_module: dict[str, list[str]] = {}
    frozen: dict[str, list[str]] = {}
    unoptimized: dict[str, list[str]] = {}
    groups = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]} \
        if optimizer is not None else {}
    param_groups: dict[str, int] = {}
    for pname, p in params:
        mod, _, short = pname.rpartition(".")
        by_module.setdefault(mod, []).append(short)
        if not p.requires_grad:
            frozen.setdefault(mod, []).append(short)
        elif id(p) in groups:
            param_groups[pname] = groups[id(p)]
        elif optimizer is not None:
            unoptimized.setdefault(mod, []).append(short)
    infos = []
    # a wrapper (FSDP1, CheckpointWrapper) has the unwrapped name of the module it wraps; that
    # module comes after it in named_modules, so it is the one kept, in the wrapper's place
    named = {}
    for mname, module in model.named_modules():
        named[unwrap_name(mname)] = module
    for mname, module in named.items():
        if mname in by_module or mname in hooked or mname in unread:
            role = "activation" if is_activation(module) else ("block" if mname in hooked and
                                                               mname not in by_module and
                                                               any(True for _ in module.children()) else "")
            base = adapter_of.get(mname, "")
            infos.append(wire.LayerInfo(mname, type(module).__name__, by_module.pop(mname, []),
                                        mname in hooked, "lora" if base else role, frozen.get(mname, []),
                                        skipped=dict(unread.get(mname, {})), adapter_of=base,
                                        unoptimized=unoptimized.get(mname, [])))
    # each base module's adapters follow it, whatever order the modules were registered in
    adapters = [li for li in infos if li.adapter_of]
    infos = [li for li in infos if not li.adapter_of]
    for li in adapters:
        at = next((i for i, x in enumerate(infos) if x.name == li.adapter_of), None)
        if at is None:
            infos.append(li)
            continue
        while at + 1 < len(infos) and infos[at + 1].adapter_of == li.adapter_of:
            at += 1
        infos.insert(at + 1, li)
    return infos, param_groups


def build_hello(model: nn.Module, watched, adapter_of: dict[str, str], optimizer, scaler, *, run: str, rank: int,
                world: int, every: int, eps: float, spectral: bool, start_step: int, hosts: list,
                signal_tensors: list | None = None) -> wire.Hello:
    """The run's Hello: who it is, how it samples, and its layers (``watched`` is the
    :class:`~probes.capture.selection.Watched` of ``model``)."""
    infos, param_groups = layer_infos(model, watched.params, dict(watched.modules), watched.unread, adapter_of,
                                      optimizer)
    return wire.Hello(
        version=wire.PROTOCOL_VERSION, run=run, rank=rank, world_size=world, pid=os.getpid(),
        started=time.time(), argv=list(sys.argv), every=every, eps=eps, hist=histogram.SPEC, layers=infos,
        accepts=["spectral"] if spectral else [],  # so the recorded Hello equals the served one
        precision=precision(watched.params, scaler), param_groups=param_groups,
        start_step=start_step, hosts=hosts, signal_tensors=list(signal_tensors or []),
    )
