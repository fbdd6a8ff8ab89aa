"""A rank's piece of a sharded tensor (FSDP2 DTensors, FSDP1's flat parameters)."""

from __future__ import annotations

import torch


try:
    from torch.distributed.tensor import DTensor as _DTensor
except ImportError:  # a torch built without distributed
    _DTensor = ()


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (FSDP2's parameters and gradients), else ``t``.

    Each rank measures its shard: the statistics are mergeable, so the ranks'
    samples merge into those of the whole tensor, and nothing is gathered
    (DTensor ops on the whole tensor would run collectives inside the probe).
    """
    return t.to_local() if isinstance(t, _DTensor) else t


def is_dtensor(t: torch.Tensor) -> bool:
    """An FSDP2 (DTensor) tensor: this rank holds only its own placement of it."""
    return isinstance(t, _DTensor)


def is_sharded(raw_name: str, p: torch.Tensor) -> bool:
    """Each rank holds a different piece of ``p``: an FSDP2 DTensor sharded on
    some mesh dimension, or a parameter under an FSDP1 wrapper (its name says so)."""
    if isinstance(p, _DTensor):
        return any(pl.is_shard() for pl in p.placements)
    return "_fsdp_wrapped_module" in raw_name.split(".")
