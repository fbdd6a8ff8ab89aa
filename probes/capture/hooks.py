"""What the probe does inside training, pass by pass and step by step.

:class:`Hooks` holds every flag and buffer the hooks read, on one object, so
that a step that is not sampled costs each hook a flag check and a few
attribute reads: the root pre-hook says which pass runs (training or
evaluation) and whether it is sampled, the module hooks hold outputs on
sampled passes, and the optimizer's hooks (or a GradScaler's ``update``, or
``xr.step()``) read the weights, close the step and hand a sampled one off.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable

import numpy as np
import torch

from probes.capture.actions import AlertActions
from probes.capture.activations import Activations
from probes.capture.eager import eager
from probes.capture.handoff import Handoff
from probes.capture.reads import WeightReads
from probes.capture.scalars import ScalarLog
from probes.capture.signals import StepSignals
from probes.engines.batch import Batch

log = logging.getLogger("xray-tui")


class Hooks:
    """The hooks of one probe and the state they share: step count, sampling flags, the pass's batches.

    Built by :class:`~probes.capture.probe.XRay` once its collaborators exist;
    ``failed``/``fail`` are the probe's (a failing part is switched off with one
    warning). ``hooked``: the optimizer's own hooks drive the steps (with a
    GradScaler, its ``update`` ends them). XRay registers ``_begin_forward``,
    ``_end_forward``, the hooks ``_make_hook`` makes and ``_on_scaler_update``;
    their names are what torch.compile's logs and the benchmarks (bench/) show.
    """

    def __init__(self, *, step_index: int, every: int, eps: float, hist_k: int, seed: int, world: int,
                 optimizer, scaler, hooked: bool, job, scalars: ScalarLog, acts: Activations, reads: WeightReads,
                 handoff: Handoff, actions: AlertActions, failed: set[str], fail: Callable[[str], None],
                 signals: StepSignals | None = None) -> None:
        self.optimizer, self.scaler, self._hooked = optimizer, scaler, hooked
        self.every, self.eps, self.hist_k, self.world, self._job = every, eps, hist_k, world, job
        self._scalars, self._acts, self._reads, self._handoff, self._actions = scalars, acts, reads, handoff, actions
        self._failed, self._fail = failed, fail
        self._signals = signals  # the every-step early-warning tier, or None
        self._step_signals = None  # this step's, between after_update and the step's end
        self.step_index = step_index
        self._sampling = self.step_index % every == 0
        #: the activation hooks' one flag: this forward pass is sampled (set per forward by the root pre-hook)
        self._active = self._sampling
        self._phase: str | None = None  # "train" or "eval" inside a forward of the model, else None
        self._loss_share = False  # this training forward was given num_items_in_batch (ScalarLog.add_loss)
        self._eval_armed = True  # the next evaluation forward is sampled (re-armed by each sampled step)
        self._seen: set[str] = set()
        self._eval_seen: set[str] = set()
        self._plan_rng = np.random.default_rng(seed)  # histogram sample offsets: no torch op, no host read
        self._batch = self._new_batch()
        self._eval_batch = self._new_batch()
        self._closed = False  # the probe closed: nothing more is handed off
        self._warned_step = False
        self._stepped = False  # optimizer.step ran in this iteration (a GradScaler may skip it)
        self._scaler_update = None  # the GradScaler's own update, while ours stands in for it
        # wall clock of step ends (one perf_counter a step), for the job's step-time and straggler figures
        self._t_end = self._t_sampled = time.perf_counter()
        self._t_fwd = math.nan  # the sampled step's forward end
        self._since_sampled = 0

    # -- forward passes ---------------------------------------------------

    def _begin_forward(self, module, args, kwargs) -> None:
        """Root pre-hook: a training pass (gradients enabled) is sampled with
        its step; an evaluation pass (``torch.no_grad()`` or
        ``inference_mode``) when armed: the first one after each sampled
        training step. ``model.eval()`` alone does not make a pass an
        evaluation: a pass that can be backpropagated is training (dropout-free
        fine-tuning and ``xray-tui inspect`` run ``model.eval()`` with a
        backward). A training pass reads only
        ``_sampling`` and an eval pass only ``_eval_armed``, so torch.compile
        keeps two variants of each kind of pass, not one per combination."""
        if torch.is_grad_enabled():
            self._phase, self._active = "train", self._sampling
            if not torch.compiler.is_compiling():
                self._scalars.note_inputs(args, kwargs)
                # the HF Trainer's num_items_in_batch: the model's loss is a share of the step's
                self._loss_share = kwargs.get("num_items_in_batch") is not None
        else:
            self._phase, self._active = "eval", self._eval_armed and "eval" not in self._failed

    def _end_forward(self, module, args, output) -> None:
        """Root hook: the forward is over; reduce what it held (and ship an eval pass).

        When torch.compile traces this hook, nothing is reduced here (that
        would break the graph): the held activations are reduced with the
        parameters at the optimizer step, and an eval pass is shipped then.
        """
        phase, self._phase = self._phase, None
        if phase == "train" and not torch.compiler.is_compiling():
            self._scalars.note_loss(output, self._loss_share)
        if phase == "eval":
            if self._active:
                self._eval_armed = False
                if not torch.compiler.is_compiling():
                    self.flush_eval()
            self._active = False  # the next forward's pre-hook sets it (not _sampling: one guard less)
        elif self._sampling and not torch.compiler.is_compiling():
            self._t_fwd = time.perf_counter()  # data loading + forward of this step end here
            self._acts.reduce(self._batch)

    def _make_hook(self, name: str):
        def hook(module, inputs, output):
            if not self._active:
                return
            self._take_act(name, output)

        return hook

    def _take_act(self, name: str, output) -> None:
        """Hold one module's output (sampled passes only), in the batch of the pass it belongs to."""
        if self._phase == "eval":
            part, batch, seen = "eval", self._eval_batch, self._eval_seen
        elif self._phase is None and not torch.is_grad_enabled():
            return  # called outside a forward of the model, under no_grad: not a training activation
        else:
            part, batch, seen = "act", self._batch, self._seen
        if torch.compiler.is_compiling():
            self._acts.hold_traced(name, output, part, batch)
            return
        self._acts.hold(name, output, part, batch, seen)

    def _new_batch(self) -> Batch:
        return Batch(self.eps, self.hist_k, self._plan_rng)

    @eager
    def flush_eval(self) -> None:
        """Ship the evaluation pass's activations as their own Step (``phase="eval"``)."""
        if not len(self._eval_batch):
            return
        batch, self._eval_batch = self._eval_batch, self._new_batch()
        self._eval_seen.clear()
        if len(batch) and not self._closed and "eval" not in self._failed:
            self._handoff.eval_pass(batch, self.step_index)

    # -- step boundaries --------------------------------------------------

    @eager
    def before_update(self) -> None:
        """Read weights and gradients, and keep the update subset (sampled steps)."""
        if len(self._eval_batch):
            self.flush_eval()  # an eval pass that torch.compile traced
        self._stepped = True
        if self.scaler is not None:
            self._scalars.keep_scale()
        if self._signals is not None:
            self._signals.before()  # every step: what precedes a loss spike cannot wait for a sample
        if not self._sampling or "params" in self._failed:
            return
        try:
            self._reads.read_params(self._batch)
            self._reads.keep_snapshot()
        except Exception:
            self._fail("params")
        if self.world > 1 and self._job is None:
            self._reads.gather_grad_norms()  # with the job, the norms travel in its all-gather, off this thread

    @eager
    def after_update(self, skipped: bool = False) -> None:
        """Reduce the updates, ship the step, and move to the next one.

        ``skipped``: the optimizer did not step (an integration's GradScaler
        found inf/NaN gradients); the step still counts, without an update.
        With a GradScaler given to :func:`attach` the step ends at
        ``scaler.update()`` instead.
        """
        if self._sampling and not skipped:
            try:
                self._reads.read_updates(self._batch)
            except Exception:
                self._fail("params")
        if self._signals is not None:
            if skipped:
                self._signals.skip()
            else:
                self._step_signals = self._signals.after()
        if skipped:
            self._reads.snapshot = None  # nothing moved: no update to measure
        if self._hooked and self.scaler is not None:
            return  # the step ends in scaler.update()
        self._end_step(skipped)

    @eager
    def _on_scaler_update(self, *args, **kwargs):
        """``scaler.update`` while attached: the iteration's end, whether or not
        ``optimizer.step`` ran (it did not when the scaler found inf/NaN gradients)."""
        skipped, self._stepped = not self._stepped, False
        if skipped and self._signals is not None:
            self._signals.skip()
        try:
            if skipped and self._sampling and "params" not in self._failed:
                try:
                    self._reads.read_params(self._batch)  # the gradients that overflowed (unscaled by scaler.step)
                except Exception:
                    self._fail("params")
            if skipped:
                self._scalars.keep_scale()  # the scale this step used, before update() changes it
        finally:
            result = self._scaler_update(*args, **kwargs)
        self._end_step(skipped)
        return result

    def _end_step(self, skipped: bool = False) -> None:
        """Close the step: its scalars; on a sampled step ship everything; then advance."""
        signals, self._step_signals = self._step_signals, None
        self._scalars.end_step(self.step_index, skipped, signals)
        now = time.perf_counter()
        self._since_sampled += 1
        if self._sampling:
            # seconds per step since the last sampled step, and this step's data + forward time
            self._timing = ((now - self._t_sampled) / self._since_sampled, self._t_fwd - self._t_end)
            self._t_sampled, self._since_sampled, self._t_fwd = now, 0, math.nan
            self._flush(skipped)
        elif self._scalars.due() and not self._closed:
            self._handoff.ship(self._scalars.take())  # every step or two: an alert about it need not wait
        self._t_end = now
        self._advance()

    def _flush(self, skipped: bool = False) -> None:
        """Hand the sampled step off (its rows, every rank's gradient norm, the scalars since
        the last one); the next step gets a new batch, and the next evaluation pass is sampled."""
        batch, self._batch = self._batch, self._new_batch()
        norms, self._reads.rank_norms = self._reads.rank_norms, None
        self._seen.clear()
        self._eval_armed = True  # the next evaluation pass is sampled
        scalars = self._scalars.take()
        if not self._closed:
            self._handoff.step(batch, self.step_index, norms, scalars, skipped, self._timing)

    @eager
    def step(self) -> None:
        """Mark a step boundary in loops that did not pass an optimizer.

        Call it once per optimizer step, after ``backward()`` and before
        ``zero_grad()``. The update is measured between two calls.
        """
        if self.optimizer is not None:
            if not self._warned_step:
                log.warning("xray-tui: step() ignored: the optimizer's own hooks count steps")
                self._warned_step = True
            return
        if len(self._eval_batch):
            self.flush_eval()  # an eval pass that torch.compile traced
        if self._sampling:
            try:
                self._reads.read_params(self._batch)
                self._reads.read_updates(self._batch)
            except Exception:
                self._fail("params")
        self._end_step()
        if self._sampling:
            self._reads.keep_snapshot()

    def _advance(self) -> None:
        self.step_index += 1
        self._sampling = self._active = self.step_index % self.every == 0
        if self._actions.pending is not None and not self._closed:
            raise self._actions.take()  # on_alert="raise": the alert, at the step boundary
