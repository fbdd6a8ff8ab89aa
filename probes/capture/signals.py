"""The every-step early-warning tier: what moves before the loss spikes, read on every step.

Large runs see Adam's second moment lag the squared gradient (StableAdamW's
RMS_t = sqrt(mean(g^2 / v_hat)) rises above 1 one to eight steps before a
loss spike: Wortsman et al. 2023) and the update norms jump before the
loss moves. Sampled steps (one in ``every``) cannot give that lead, so on
every optimizer step the probe reads, on a fixed element subset of each
trainable weight (:data:`TIER_SAMPLE` elements, drawn once at attach as
whole 64-byte lines of :data:`RUN` elements: a line costs one memory fetch
whether one of its floats is read or sixteen):

- before the step: the weight;
- after it: the weight again, its gradient (after clipping and unscaling:
  what the optimizer applied; the step leaves it as it was) and Adam's
  ``exp_avg_sq`` as the step left it (v_t, read in place: Adam's own, so
  no beta2 is needed but for the bias correction). Read after the step,
  they are in the cache the step just filled (the same C call, in the
  loop, took 113 us cold after the backward and 58 us called again at once).

Four sums per tensor come out of that (sum of g^2 / v_t, of g^2, of the
update's squares and of the weight's), in one small tensor that stays on
the device; :class:`~probes.capture.scalars.ScalarLog` copies it to the
host without waiting and the publisher thread turns it into each tensor's
RMS, update ratio and the global gradient-norm estimate
(:func:`finish`). On the CPU one call of the C kernel does each half
(``xray_runs_gather``, ``xray_signals``); elsewhere a gather before the
step, three after it and a few torch ops over the subsets.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import numpy as np
import torch

from probes import engines
from probes.distributed.shards import is_dtensor, local
from probes.engines import cpu_kernel
from probes.engines.transfer import upload

#: Adam's epsilon, squared, floors v_t: a zero second moment (a gradient never seen) is no signal.
EPS2 = 1e-16
#: Elements per tensor the tier reads (RMS and ratio to a few per cent; a rise of 2x or more is
#: what it watches), so a step's reads stay well under a millisecond on the CPU for GPT-2 small's
#: 148 tensors.
TIER_SAMPLE = 1024
#: Consecutive elements per run of the subset: a 64-byte cache line of float32. Runs at random
#: lines instead of single elements at random read 16x fewer lines of tensors that are cold
#: after the backward: on nanoGPT's shape the C call reading w, g and v before the step took 143
#: us a step with random elements, 82 us with lines (longer runs, 64 or 512, gained little more:
#: what is left is per tensor).
RUN = 16


class StepSignals:
    """The tier for the trainable weights ``trainable`` ((name, parameter) pairs, the probe's order).

    ``fail`` switches the tier off with one warning;
    ``start_step``: the optimizer's step count at attach (a resumed run's), from which each
    tensor's own count, which Adam's bias correction needs, is kept here without reading the
    optimizer's step tensors (each read would be a host read of a tensor, every step).
    """

    def __init__(self, trainable: list, optimizer, fail: Callable[[str], None], start_step: int = 0) -> None:
        self.names = [n for n, _ in trainable]
        self._params = [p for _, p in trainable]
        self.optimizer = optimizer
        self._fail = fail
        self.on = bool(self._params) and optimizer is not None
        #: each tensor's Adam beta2 (its param group's; 0.999 where it has none)
        self._beta2 = _beta2_of(optimizer, self._params) if self.on else np.zeros(0)
        self._indices: list | None = None
        self._starts: list | None = None  # where each subset's runs start (None: the whole tensor)
        self._fast: bool | None = None  # the C kernel's path (decided at the first step)
        self._plain = True  # no parameter is a DTensor (decided at the first step)
        self._counts = self._numels = None  # subset sizes and tensor sizes (numpy)
        self._lengths: torch.Tensor | None = None
        self._before = None  # the weights at the subsets before the step (w0), between the two halves
        self._missing: tuple | None = None  # tensors without a gradient, and without a second moment
        #: each tensor's Adam step count (steps with a gradient), for the bias correction
        self._t = np.full(len(self._params), float(start_step))
        # a weak reference to each tensor's exp_avg_sq as last seen, to tell a new state (an id could be reused)
        self._moments: list = [None] * len(self._params)
        # whether each second moment, when first seen, was one the C kernel reads (a weight stands in for none)
        self._moment_ok = np.ones(len(self._params), dtype=bool)
        self._state_of: list | None = None  # the optimizer's state dict of each parameter, cached...
        self._state_key: tuple = ()  # ...while the optimizer's state is this object of this size

    # -- the two halves of a step ----------------------------------------

    def before(self) -> None:
        """Before the optimizer steps: the weights at the subsets (what the update is measured from)."""
        if not self.on:
            return
        try:
            self._begin()
        except Exception:
            self.on = False
            self._before = None
            self._fail("signals")

    def after(self) -> tuple | None:
        """After the step: ``(sums, host facts)`` for :func:`finish`, or None (no ``before``): the
        update, the gradient and Adam's second moment, read at the subsets."""
        before, self._before = self._before, None
        if before is None or not self.on:
            return None
        try:
            return self._end(before)
        except Exception:
            self.on = False
            self._fail("signals")
            return None

    def skip(self) -> None:
        """The optimizer did not step (a GradScaler skipped it): forget the first half."""
        self._before = None

    # -- work --------------------------------------------------------------

    def prepare(self) -> None:
        """Choose the tier's subsets now (at attach), so that no training step pays for it."""
        if not self.on or self._indices is not None:
            return
        try:
            gen = torch.Generator().manual_seed(0x5eed)
            self._indices = [_lines(p, gen) for p in map(local, self._params)]
            # the C kernel's view of the same subsets: where each run starts
            self._starts = [None if i is None else i.view(-1, RUN)[:, 0].cpu() for i in self._indices]
            self._numels = np.array([local(p).numel() for p in self._params], dtype=np.float64)
            self._counts = np.array([n if i is None else i.numel() for n, i in zip(self._numels, self._indices)],
                                    dtype=np.float64)
            self._lengths = upload(self._counts.astype(np.int64), self._params[0].device)
            read = self._counts > 0  # an empty shard (FSDP) is read nowhere: no RMS, no share of the norm
            self._inv_counts = np.where(read, 1.0 / np.maximum(self._counts, 1.0), np.nan)
            self._grow = np.where(read, self._numels / np.maximum(self._counts, 1.0), 0.0)  # subset -> tensor
        except Exception:
            self.on = False
            self._fail("signals")

    def _setup(self) -> None:
        self.prepare()
        device = self._params[0].device
        self._plain = not any(is_dtensor(p) for p in self._params)
        self._fast = (engines.for_device(device) == "cpu-kernel" and cpu_kernel.load() is not None
                      and self._plain
                      and all(p.dtype == torch.float32 and p.is_contiguous() and p.device.type == "cpu"
                              for p in self._params))
        if self._fast:
            self._table = cpu_kernel.run_table(self._params, self._starts, RUN)

    def _begin(self) -> None:
        """The weights at the subsets, before the step moves them (all the first half reads)."""
        if self._fast is None:
            self._setup()
        if self._fast:
            self._before = cpu_kernel.runs_gather(self._params, self._table)
        else:
            self._before = _gather([local(p) for p in self._params], self._indices)

    def _states(self) -> list:
        """Each parameter's optimizer state dict (None: none yet), looked up again only when the
        optimizer's state changed (hashing a tensor is a Python call: 52 lookups a step cost
        more than the C kernel's pass; one a step tells a state made anew)."""
        state = self.optimizer.state
        # a state cleared and made again by the step has the same size: its first dict tells
        if (self._state_of is None or self._state_key != (id(state), len(state))
                or state.get(self._params[0]) is not self._state_of[0]):
            self._state_of = [state.get(p) for p in self._params]
            self._state_key = (id(state), len(state))
        return self._state_of

    def _inputs(self, fast: bool) -> tuple[list, list, tuple | None]:
        """This step's gradients and second moments, in the tensors' order; the weight stands
        in for a missing one (no gradient, a sparse one, no Adam state yet), whose figures
        :func:`finish` drops. ``fast``: also their data pointers for the C kernel, in the same
        pass (None when one is not a contiguous float32 CPU tensor: torch's ops take the step).
        The weights were checked at the first step, a second moment when first seen (the same
        object after that: :attr:`_moments`); the gradients, new each step, here."""
        grads, moments, no_grad, no_moment, new = [], [], [], [], []
        gp, vp = [], []
        f32, plain = torch.float32, self._plain  # plain: no DTensor, each tensor is its own local part
        for i, (p, st) in enumerate(zip(self._params, self._states())):
            g = p.grad
            if g is not None and (g.layout is not torch.strided or g.is_meta):
                g = None  # a sparse gradient (an embedding's sparse=True): not read, as the sampled reads skip it
            v = st.get("exp_avg_sq") if st else None
            if g is None or v is None:
                if g is None:
                    no_grad.append(i)
                no_moment.append(i)  # no RMS without both
                g = p if g is None else g
                v = p if v is None else v
            else:
                seen = self._moments[i]
                if seen is None or seen() is not v:
                    new.append((i, st, v))
            if not plain:
                g, v = local(g), local(v)
            grads.append(g)
            moments.append(v)
            if fast:
                if g.dtype is not f32 or not g.is_contiguous():
                    fast = False
                else:
                    gp.append(g.data_ptr())
                    vp.append(v.data_ptr())
        self._mark(no_grad, no_moment, new)
        ok = fast and bool(self._moment_ok.all())
        return grads, moments, (np.array(gp, dtype=np.uint64), np.array(vp, dtype=np.uint64)) if ok else None

    def _new_state(self, i: int, st: dict, v) -> None:
        """Tensor ``i`` has a second moment the tier has not seen: its first, or a new state (the
        optimizer's state cleared, or loaded from a checkpoint), whose step count restarts or is
        the checkpoint's. Read once then (a CPU step count; a device one is not read, and the
        tier's own count goes on)."""
        if self._moments[i] is not None:
            step = st.get("step")
            if isinstance(step, torch.Tensor) and step.device.type == "cpu" or isinstance(step, (int, float)):
                self._t[i] = float(step)
        self._moments[i] = weakref.ref(v)
        self._moment_ok[i] = v.dtype is torch.float32 and v.is_contiguous() and v.device.type == "cpu"

    def _mark(self, no_grad: list, no_moment: list, new: list) -> None:
        """This step's tensors without a gradient or second moment, and the step counts (the
        bias correction is the publisher's work, in :func:`finish`); ``new``: (index, state,
        second moment) of the moments not seen before."""
        self._missing = (np.array(no_grad, dtype=np.int64), np.array(no_moment, dtype=np.int64)) \
            if no_grad or no_moment else _NONE_MISSING
        self._t += 1.0
        if no_grad:
            self._t[self._missing[0]] -= 1.0  # Adam leaves a parameter without a gradient be
        for i, st, v in new:
            self._new_state(i, st, v)

    def _end(self, w0) -> tuple:
        """After the step: the gradient (which the step leaves as it was), Adam's second moment
        as the step left it (v_t, its own: no beta2 to guess) and the weights again."""
        on_host = isinstance(w0, np.ndarray)  # the C kernel's first half
        grads, moments, pointers = self._inputs(on_host)
        if pointers is not None:
            return cpu_kernel.signals(self._params, *pointers, self._table, w0, EPS2), self._facts()
        if on_host:
            w0 = torch.from_numpy(w0)  # this step in torch's ops (the tensors are on the CPU)
        w1 = _gather([local(p) for p in self._params], self._indices)
        g = _gather(grads, self._indices)
        v = _gather(moments, self._indices)
        g2, d = g.square(), w1 - w0
        columns = torch.stack([g2 / v.clamp_min(EPS2), g2, d.square(), w0.square()], dim=1)
        return _segment_sums(columns, self._lengths), self._facts()  # [4, m] float64 sums, on the device

    def _facts(self) -> tuple:
        """What :func:`finish` needs besides the sums (host arrays; the step counts as of now)."""
        return self._inv_counts, self._grow, self._beta2, self._t.copy(), self._missing


_NONE_MISSING = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))  # every tensor has both


def _lines(p: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """The indices of :data:`TIER_SAMPLE` elements of ``p`` (flat): runs of :data:`RUN` at
    distinct random multiples of RUN, in increasing (memory) order; None when all of ``p`` fits."""
    n = p.numel()
    runs = min(max(1, TIER_SAMPLE // RUN), n // RUN)
    if n <= TIER_SAMPLE or runs == 0:
        return None
    starts = torch.randperm(n // RUN, generator=gen)[:runs].sort().values * RUN
    return (starts[:, None] + torch.arange(RUN)).reshape(-1).to(p.device)


def _beta2_of(optimizer, params: list) -> np.ndarray:
    """Each parameter's beta2, from its param group's ``betas`` (0.999 where there are none:
    not an Adam-family optimizer, whose missing ``exp_avg_sq`` leaves the RMS NaN anyway)."""
    by_id = {}
    for group in optimizer.param_groups:
        betas = group.get("betas")
        beta2 = float(betas[1]) if isinstance(betas, (tuple, list)) and len(betas) > 1 else 0.999
        for q in group["params"]:
            by_id[id(q)] = beta2
    return np.array([by_id.get(id(p), 0.999) for p in params], dtype=np.float64)


def _segment_sums(columns: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-tensor sums of each column of ``columns`` ([N, c], the tensors' subsets one after
    another, ``lengths`` long): a [c, m] float64 tensor."""
    return torch.segment_reduce(columns.double(), "sum", lengths=lengths, axis=0, unsafe=True).T


def _gather(tensors: list, indices: list) -> torch.Tensor:
    """The subsets of ``tensors`` as one float32 vector (the reads' own gather)."""
    from probes.capture.reads import gather

    return gather(tensors, indices)


def finish(sums: np.ndarray, facts: tuple) -> tuple[np.ndarray, np.ndarray, float]:
    """Each tensor's RMS of g^2 / v_hat and update ratio, and the global gradient norm
    estimated from the subsets, from :meth:`StepSignals.after`'s sums (on the host). A few
    numpy calls and no error-state switch: this runs on the publisher thread every step."""
    inv_counts, grow, beta2, t, (no_grad, no_moment) = facts
    r, g2, d2, w2 = np.asarray(sums, dtype=np.float64)
    rms = np.sqrt(r * inv_counts * (1.0 - beta2 ** t))  # with Adam's bias correction of v, per tensor
    rms[no_moment] = np.nan  # no second moment yet (the first step), or not an Adam-family optimizer
    ratio = np.full(len(r), np.nan)
    np.divide(d2, w2, out=ratio, where=w2 > 0)  # a weight of zeros (a LoRA B at init) has no ratio
    np.sqrt(ratio, out=ratio)
    ratio[np.isinf(ratio)] = np.nan
    est = g2 * grow
    est[no_grad] = 0.0
    return rms, ratio, math.sqrt(float(est.sum()))
