"""LoRA adapters: found at attach, and how far each moves its base weight.

An adapter's shift is ||B A scale||_F / ||W||: the base weight's row gives
||W|| (see :func:`probes.capture.step.build_step`); this module computes
||B A scale||_F^2 on sampled steps, and tells the Hello which adapter modules
belong to which base module.
"""

from __future__ import annotations

import torch
from torch import nn

from probes.protocol.names import unwrap_name
from probes.engines.transfer import upload


def lora_adapters(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module, nn.Module, float]]:
    """peft-style LoRA adapters: (wrapper path, base_layer, A module, B module, scale).

    A LoRA layer (peft's ``LoraLayer``, or a hand-written one with the same
    attributes) has a ``base_layer`` and ``lora_A``/``lora_B``, each a module
    or a ``ModuleDict`` of one module per adapter name; ``scaling`` is a dict
    (adapter name -> float) or a float (``scale`` is read too), default 1.
    The change it makes to the base weight is ``B @ A * scale`` (A and B
    flattened to matrices: conv adapters too).
    """
    out = []
    for mname, m in model.named_modules():
        base, la, lb = (getattr(m, a, None) for a in ("base_layer", "lora_A", "lora_B"))
        if not all(isinstance(x, nn.Module) for x in (base, la, lb)):
            continue
        if isinstance(la, nn.ModuleDict) != isinstance(lb, nn.ModuleDict):
            continue
        pairs = [(k, la[k], lb[k]) for k in la.keys() if k in lb] if isinstance(la, nn.ModuleDict) else [("", la, lb)]
        scaling = getattr(m, "scaling", getattr(m, "scale", 1.0))
        for key, a, b in pairs:
            scale = scaling.get(key, 1.0) if isinstance(scaling, dict) else scaling
            try:
                scale = float(scale)
            except (TypeError, ValueError):
                continue
            out.append((unwrap_name(mname), base, a, b, scale))
    return out


class LoraShifts:
    """The LoRA adapters of ``model`` whose base weight and B are among ``params``
    (the watched parameters): their shift is computed on sampled steps, and the
    Hello groups them with their base.

    ``bases``: B weight name -> base weight name; ``adapter_of``: adapter
    module path -> base module path.
    """

    def __init__(self, model: nn.Module, params: list[tuple[str, torch.Tensor]]) -> None:
        #: (B weight name, A weight, B weight, scale) per adapter
        self.adapters: list[tuple[str, torch.Tensor, torch.Tensor, float]] = []
        self.bases: dict[str, str] = {}
        self.adapter_of: dict[str, str] = {}
        names = {id(p): n for n, p in params}
        paths = {id(m): unwrap_name(n) for n, m in model.named_modules()}
        for _, base, a, b, scale in lora_adapters(model):
            w, wa, wb = (getattr(x, "weight", None) for x in (base, a, b))
            if not all(isinstance(t, torch.Tensor) and id(t) in names for t in (w, wa, wb)):
                continue  # a quantised base weight, or outside ``layers``
            if wa.dim() < 2 or wb.dim() < 2 or wb.reshape(wb.shape[0], -1).shape[1] != wa.shape[0]:
                continue  # not the B @ A shape
            self.adapters.append((names[id(wb)], wa, wb, scale))
            self.bases[names[id(wb)]] = names[id(w)]
            for x in (a, b):
                self.adapter_of[paths[id(x)]] = paths[id(base)]

    def sumsq(self) -> dict[str, tuple[torch.Tensor, int]]:
        """||B A scale||_F^2 of every adapter, on the device and without forming B A:
        trace((B^T B)(A A^T)) with r x r matrices; adapters of the same shapes in one batched
        product (a few ops per shape, not per adapter). Each B weight's value is ``(vector, index)``."""
        out: dict[str, tuple[torch.Tensor, int]] = {}
        groups: dict[tuple, list] = {}
        for bname, wa, wb, scale in self.adapters:
            groups.setdefault((wa.shape, wb.shape, wa.dtype, wb.dtype, wa.device), []).append((bname, wa, wb, scale))
        with torch.no_grad():
            for items in groups.values():
                a = torch.stack([wa if wa.dim() == 2 else wa.reshape(wa.shape[0], -1) for _, wa, _, _ in items])
                b = torch.stack([wb if wb.dim() == 2 else wb.reshape(wb.shape[0], -1) for _, _, wb, _ in items])
                a, b = a.float(), b.float()
                scales = upload([s * s for _, _, _, s in items], a.device, torch.float32)
                vals = ((b.transpose(1, 2) @ b) * (a @ a.transpose(1, 2))).sum((1, 2)).clamp_min(0) * scales
                for i, (bname, _, _, _) in enumerate(items):
                    out[bname] = (vals, i)
        return out
