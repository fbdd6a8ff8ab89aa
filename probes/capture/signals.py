"""The every-step early-warning tier: what moves before the loss spikes, read on every step.

Large runs see Adam's second moment lag the squared gradient (StableAdamW's
RMS_t = sqrt(mean(g^2 / v_hat)) rises above 1 one to eight steps before a
loss spike: Wortsman et al. 2023) and the update norms jump before the
loss moves. Sampled steps (one in ``every``) cannot give that lead, so on
every optimizer step the probe reads, on a fixed element subset of each
trainable weight (:data:`TIER_SAMPLE` elements drawn once from the update
subsets of :mod:`probes.capture.reads`):

- before the step: the weight, its gradient (after clipping and unscaling:
  what the optimizer applies) and Adam's ``exp_avg_sq`` (read in place);
- after the step: the weight again.

Four sums per tensor come out of that (sum of g^2 / v_t, of g^2, of the
update's squares and of the weight's), in one small tensor that stays on
the device; :class:`~probes.capture.scalars.ScalarLog` copies it to the
host without waiting and the publisher thread turns it into each tensor's
RMS, update ratio and the global gradient-norm estimate
(:func:`finish`). On the CPU one call of the C kernel does each half
(``xray_signals``); elsewhere a dozen torch ops over the subsets.
"""

from __future__ import annotations

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
#: Elements per tensor the tier reads: a random part of the update subset (RMS and ratio to a few
#: per cent; a rise of 2x or more is what it watches), so a step's reads stay a few hundred
#: microseconds on the CPU for GPT-2 small's 148 tensors.
TIER_SAMPLE = 1024


class StepSignals:
    """The tier for the trainable weights ``trainable`` ((name, parameter) pairs, the probe's order).

    ``subsets()`` gives each weight's subset indices (None: the whole weight), as the
    sampled reads use them; ``fail`` switches the tier off with one warning;
    ``start_step``: the optimizer's step count at attach (a resumed run's), from which each
    tensor's own count, which Adam's bias correction needs, is kept here without reading the
    optimizer's step tensors (each read would be a host read of a tensor, every step).
    """

    def __init__(self, trainable: list, subsets: Callable[[], list], optimizer, fail: Callable[[str], None],
                 start_step: int = 0) -> None:
        self.names = [n for n, _ in trainable]
        self._params = [p for _, p in trainable]
        self._subsets = subsets
        self.optimizer = optimizer
        self._fail = fail
        self.on = bool(self._params) and optimizer is not None
        #: each tensor's Adam beta2 (its param group's; 0.999 where it has none)
        self._beta2 = _beta2_of(optimizer, self._params) if self.on else np.zeros(0)
        self._indices: list | None = None
        self._fast: bool | None = None  # the C kernel's path (decided at the first step)
        self._counts = self._numels = None  # subset sizes and tensor sizes (numpy)
        self._lengths: torch.Tensor | None = None
        self._before = None  # (w0 subset, per-tensor r and g^2 sums) between the two halves
        self._missing: tuple | None = None  # tensors without a gradient, and without a second moment
        self._bc: np.ndarray | None = None
        #: each tensor's Adam step count (steps with a gradient), for the bias correction
        self._t = np.full(len(self._params), float(start_step))
        # a weak reference to each tensor's exp_avg_sq as last seen, to tell a new state (an id could be reused)
        self._moments: list = [None] * len(self._params)

    # -- the two halves of a step ----------------------------------------

    def before(self) -> None:
        """Before the optimizer steps: the weights' subsets and the gradient/second-moment sums."""
        if not self.on:
            return
        try:
            self._begin()
        except Exception:
            self.on = False
            self._before = None
            self._fail("signals")

    def after(self) -> tuple | None:
        """After the step: ``(sums, host facts)`` for :func:`finish`, or None (no ``before``)."""
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
        """Choose the tier's subsets now (at attach, after the update subsets exist), so that
        no training step pays for it."""
        if not self.on or self._indices is not None:
            return
        try:
            gen = torch.Generator().manual_seed(0x5eed)
            self._indices = [_thin(p, i, gen) for p, i in zip(map(local, self._params), self._subsets())]
            self._numels = np.array([local(p).numel() for p in self._params], dtype=np.float64)
            self._counts = np.array([n if i is None else i.numel() for n, i in zip(self._numels, self._indices)],
                                    dtype=np.float64)
            self._lengths = upload(self._counts.astype(np.int64), self._params[0].device)
        except Exception:
            self.on = False
            self._fail("signals")

    def _setup(self) -> None:
        self.prepare()
        device = self._params[0].device
        self._fast = (engines.for_device(device) == "cpu-kernel" and cpu_kernel.load() is not None
                      and not any(is_dtensor(p) for p in self._params)
                      and all(p.dtype == torch.float32 and p.is_contiguous() and p.device.type == "cpu"
                              for p in self._params))
        if self._fast:
            self._table = cpu_kernel.subset_table(self._params, self._indices)

    def _begin(self) -> None:
        if self._fast is None:
            self._setup()
        if self._fast:
            self._before = self._fast_before()
            if self._before is not None:
                return
        state = self.optimizer.state
        weights = [local(p) for p in self._params]
        grads, moments, no_grad, no_moment = [], [], [], []
        for i, (p, w) in enumerate(zip(self._params, weights)):
            g = p.grad
            if g is not None and (g.layout != torch.strided or g.is_meta):
                g = None  # a sparse gradient (an embedding's sparse=True): not read, as the sampled reads skip it
            st = state.get(p)
            v = st.get("exp_avg_sq") if st else None
            if g is None or v is None:  # read the weight in their place, and forget what it gives
                if g is None:
                    no_grad.append(i)
                no_moment.append(i)
                g = w if g is None else local(g)
                v = w if v is None else local(v)
            else:
                if self._moments[i] is None or self._moments[i]() is not v:
                    self._new_state(i, st, v)
                g, v = local(g), local(v)
            grads.append(g)
            moments.append(v)
        self._mark(no_grad, no_moment)
        w0 = _gather(weights, self._indices)
        g = _gather(grads, self._indices)
        v = _gather(moments, self._indices)
        b2 = self._beta2
        if len(set(b2.tolist())) == 1:
            beta2 = float(b2[0])
            vt = v.mul(beta2).addcmul_(g, g, value=1.0 - beta2)
        else:
            per = upload(np.repeat(b2, self._counts.astype(np.int64)).astype(np.float32), g.device)
            vt = v.mul(per).addcmul_(g, g * (1 - per))
        g2 = g.square()
        r = g2 / vt.clamp_min(EPS2)
        self._before = (w0, _segment_sums(torch.stack([r, g2], dim=1), self._lengths))

    def _fast_before(self):
        """The first half on contiguous float32 CPU tensors: one C call, no torch op (None: a
        gradient or moment is not such a tensor this step, and torch's ops take it)."""
        state, f32 = self.optimizer.state, torch.float32
        gp, vp, no_grad, no_moment = [], [], [], []
        for i, p in enumerate(self._params):
            g = p.grad
            st = state.get(p)
            v = st.get("exp_avg_sq") if st else None
            if g is None:
                no_grad.append(i)
                g = p
            elif g.layout is not torch.strided or g.dtype is not f32 or not g.is_contiguous():
                return None
            if v is None:
                no_moment.append(i)
                v = p
            else:
                seen = self._moments[i]
                if seen is None or seen() is not v:
                    if v.dtype is not f32 or not v.is_contiguous() or v.device.type != "cpu":
                        return None
                    self._new_state(i, st, v)
            gp.append(g.data_ptr())
            vp.append(v.data_ptr())
        self._mark(no_grad, no_moment)
        return cpu_kernel.signals_before(self._params, np.array(gp, dtype=np.uint64), np.array(vp, dtype=np.uint64),
                                         self._table, self._beta2, EPS2)

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

    def _mark(self, no_grad: list, no_moment: list) -> None:
        """This step's tensors without a gradient or second moment, and the bias correction."""
        self._missing = (np.array(no_grad, dtype=np.int64), np.array(no_moment, dtype=np.int64))
        self._t += 1.0
        if no_grad:
            self._t[self._missing[0]] -= 1.0  # Adam leaves a parameter without a gradient be
        self._bc = 1.0 - self._beta2 ** self._t  # Adam's bias correction of v at this step, per tensor

    def _end(self, before) -> tuple:
        w0, sums = before
        facts = (self._counts, self._numels, self._bc, self._missing)
        if isinstance(w0, np.ndarray):  # the C kernel's first half
            return cpu_kernel.signals_after(self._params, self._table, w0, sums), facts
        w1 = _gather([local(p) for p in self._params], self._indices)
        d = w1 - w0
        moved = _segment_sums(torch.stack([d.square(), w0.square()], dim=1), self._lengths)
        return torch.cat([sums, moved]), facts  # [4, n] float64: r, g^2, dW^2, W^2 sums, on the device


def _thin(p: torch.Tensor, idx: torch.Tensor | None, gen: torch.Generator) -> torch.Tensor | None:
    """At most :data:`TIER_SAMPLE` of ``p``'s update subset ``idx`` (None: all of ``p``), chosen
    at random once, in increasing order (memory order); None when all of ``p`` fits."""
    n = p.numel() if idx is None else idx.numel()
    if n <= TIER_SAMPLE:
        return idx
    pick = torch.randperm(n, generator=gen)[:TIER_SAMPLE].sort().values
    return pick.to(p.device) if idx is None else idx[pick.to(idx.device)]


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
    estimated from the subsets, from :meth:`StepSignals.after`'s sums (on the host)."""
    counts, numels, bc, (no_grad, no_moment) = facts
    r, g2, d2, w2 = (np.asarray(sums[i], dtype=np.float64) for i in range(4))
    with np.errstate(divide="ignore", invalid="ignore"):
        rms = np.sqrt(r / counts * bc)
        ratio = np.sqrt(d2 / w2)
        est = g2 * numels / counts
    rms[no_moment] = np.nan  # no second moment yet (the first step), or not an Adam-family optimizer
    est[no_grad] = 0.0
    ratio[~np.isfinite(ratio)] = np.nan
    return rms, ratio, float(np.sqrt(est.sum()))
