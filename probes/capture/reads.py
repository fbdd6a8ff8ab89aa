"""A sampled step's reads of the weights: parameters, gradients, updates, distance from init.

Before the optimizer steps, every watched parameter and its gradient (after
AMP unscaling) is held in the step's batch and reduced, and a fixed random
subset of each trainable weight's elements (``update_sample`` of them) is
copied; after the step, the same subset again gives the update and its size
against the weight. The subsets as they were at attach stay for the run and
give ||W_t - W_0|| / ||W_0||. With several ranks and no job view, each rank's
total gradient norm is all-gathered here.
"""

from __future__ import annotations

from typing import Callable

import torch

from probes import engines
from probes.capture.lora import LoraShifts
from probes.capture.selection import Watched, unreadable
from probes.distributed.shards import local
from probes.engines import cpu_kernel
from probes.engines.batch import Batch
from probes.engines.transfer import upload


class WeightReads:
    """The weight side of a sampled step, for the parameters ``watched`` chose.

    ``failed``/``fail`` are the probe's: a part that fails is switched off with
    one warning (``"params"``, ``"init"``, ``"lora"``, ``"ranks"``); ``skip``
    notes a gradient the probe cannot read.
    """

    def __init__(self, watched: Watched, lora: LoraShifts, update_k: int, seed: int, world: int,
                 failed: set[str], fail: Callable[[str], None], skip: Callable[[str, str, str], None]) -> None:
        self.params = watched.params
        self.trainable = watched.trainable
        self.sharded = watched.sharded
        self.lora = lora
        self.update_k = update_k
        self.world = world
        self._failed, self._fail, self._skip = failed, fail, skip
        self._gen = torch.Generator().manual_seed(seed)
        #: weight name -> the indices of its update subset (None: the whole weight, it is that small)
        self.subsets: dict[str, torch.Tensor | None] = {}
        self.snapshot: torch.Tensor | None = None  # update subsets of every trainable weight, concatenated
        self.rank_norms: torch.Tensor | None = None  # every rank's gradient norm, this sampled step
        # distance from initialisation: the update subsets as they are at attach, kept for the run
        self._init: torch.Tensor | None = None
        self._init_sumsq: torch.Tensor | None = None

    def keep_init(self) -> None:
        """Keep the update subsets as they are now (at attach): W_0 for the distance from init."""
        try:
            self._init = self.take_subsets()
            if self._init is not None:
                self._init_sumsq = self._segment_sumsq(self._init)
        except Exception:
            self._init = None
            self._fail("init")

    def held_bytes(self) -> int:
        """Bytes held on the model's device: the subsets' indices, W_0 and the snapshot."""
        tensors = [self._init, self._init_sumsq, self.snapshot, *self.subsets.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def lora_sumsq(self) -> dict[str, tuple[torch.Tensor, int]]:
        """||B A scale||_F^2 of every LoRA adapter (:meth:`LoraShifts.sumsq`); {} once it failed."""
        if not self.lora.adapters or "lora" in self._failed:
            return {}
        try:
            return self.lora.sumsq()
        except Exception:
            self._fail("lora")
            return {}

    def read_params(self, b: Batch) -> None:
        """Hold every watched weight and its gradient in ``b``, and reduce them now,
        before the optimizer changes them."""
        lora = self.lora_sumsq()
        for name, p in self.params:
            w = local(p)
            b.hold(name, "weight", w, lora_sumsq=lora.get(name))
            g = p.grad
            if g is None and w.numel() == 0 and p.requires_grad:
                g = w  # FSDP1 leaves an empty shard's gradient None: read it as the empty gradient it is
            if g is not None:
                g = local(g)
                if g.layout != torch.strided or g.is_meta:
                    self._skip(name, "grad", unreadable(g))
                else:
                    b.hold(name, "grad", g)
        b.reduce()  # now, before the optimizer changes them

    def _subset(self, name: str, p: torch.Tensor) -> torch.Tensor | None:
        if name not in self.subsets:
            n = local(p).numel()  # a subset of this rank's shard
            self.subsets[name] = (
                None if n <= self.update_k
                else torch.randperm(n, generator=self._gen)[: self.update_k].sort().values.to(p.device)
            )
        return self.subsets[name]

    def take_subsets(self) -> torch.Tensor | None:
        """The update subsets of all trainable weights, in one new float32 buffer."""
        if not self.trainable:
            return None
        return gather([local(p) for _, p in self.trainable], self.subset_indices())

    def subset_indices(self) -> list[torch.Tensor | None]:
        """Each trainable weight's subset indices, in :attr:`trainable` order (None: all of it)."""
        return [self._subset(name, p) for name, p in self.trainable]

    def keep_snapshot(self) -> None:
        """Copy the update subsets before the optimizer steps (sampled steps)."""
        self.snapshot = self.take_subsets()

    def _subset_lengths(self) -> list[int]:
        return [local(p).numel() if self.subsets[n] is None else self.update_k for n, p in self.trainable]

    def _segment_sumsq(self, flat: torch.Tensor) -> torch.Tensor:
        """Sum of squares (float64) of each trainable weight's piece of a subsets buffer."""
        lengths = upload(self._subset_lengths(), flat.device)
        return torch.segment_reduce(flat.double().square(), "sum", lengths=lengths, unsafe=True)

    def read_updates(self, b: Batch) -> None:
        """Hold the update (the subsets now minus the snapshot) in ``b``, with each weight's
        sum of squares before it and its distance from init."""
        before, self.snapshot = self.snapshot, None
        if before is None:
            return
        after = self.take_subsets()
        delta = after - before
        refs = self._segment_sumsq(before)
        dists = [None] * len(self.trainable)
        if self._init is not None and "init" not in self._failed:
            try:  # ||W_t - W_0|| / ||W_0|| on the same subset
                dists = (self._segment_sumsq(after - self._init) / self._init_sumsq).sqrt()
            except Exception:
                self._fail("init")
        b.hold_split([name for name, _ in self.trainable], "update", delta, self._subset_lengths(),
                     ref_sumsq=refs, init_dist=dists if isinstance(dists, torch.Tensor) else None)

    def gather_grad_norms(self) -> None:
        """Every rank's total gradient norm, with torch.distributed itself, into :attr:`rank_norms`.

        A collective, so every rank must sample the same steps (same
        ``every``); it moves one number per rank.
        """
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or "ranks" in self._failed:
            return
        # Only replicated parameters' gradients count: under FSDP each rank holds a different piece
        # of a sharded gradient, whose norms differ from rank to rank in a healthy run. A model
        # with nothing replicated sends no norms (the same on every rank: no collective).
        if self.sharded and len(self.sharded) == len(self.params):
            return
        try:
            grads = [local(p.grad).detach() for _, p in self.params
                     if p.grad is not None and p.grad.layout == torch.strided and id(p) not in self.sharded]
            if grads:
                local_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())
            else:
                local_norm = torch.zeros((), device=self.params[0][1].device if self.params else "cpu")
            gathered = [torch.empty_like(local_norm) for _ in range(self.world)]
            dist.all_gather(gathered, local_norm)
            self.rank_norms = torch.stack(gathered)
        except Exception:
            self._fail("ranks")


def gather(tensors: list[torch.Tensor], indices: list[torch.Tensor | None]) -> torch.Tensor:
    """``torch.cat([t.reshape(-1)[i] ...])`` as one new float32 buffer on the tensors' device:
    one launch of the device engine, one call of the C kernel, else an index op per tensor."""
    device = tensors[0].device
    engine = engines.for_device(device)
    if engine == "device":
        try:
            from probes.engines import device as device_engine

            # one launch instead of an index op per parameter, on the weights as they are
            out = device_engine.gather(tensors, indices)
            if out is not None:
                return out
        except Exception as e:
            engines.failed(device, e)
    if (engine == "cpu-kernel"
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)):
        return cpu_kernel.gather(tensors, indices)  # one call instead of an index op per parameter
    flats = [t.detach().reshape(-1) for t in tensors]
    pieces = [(f if i is None else f[i]).to(device=device, dtype=torch.float32) for f, i in zip(flats, indices)]
    return torch.cat(pieces)  # a copy: the optimizer's in-place update cannot reach it
