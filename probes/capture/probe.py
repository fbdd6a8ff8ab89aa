"""The training-side probe: hooks, sampling, and hand-off to the publisher.

On a step that is not sampled every hook returns after one flag check. On a
sampled step the forward hooks reduce each watched module's output on its
device, the optimizer pre-step hook reduces every parameter and its gradient
(after AMP unscaling, since GradScaler unscales before calling
``optimizer.step``) and keeps a fixed subset of each weight's elements, and
the post-step hook reduces the update on that subset. The rows of the step
come to the host once, and the publisher thread does everything else.

:class:`XRay` attaches and closes the probe and is its public face; it
builds collaborators with one job each and wires them together:
:class:`~probes.capture.selection.Watched` (what is watched),
:class:`~probes.capture.hooks.Hooks` (the hooks, and the per-step state they
read), :class:`~probes.capture.activations.Activations` (held outputs),
:class:`~probes.capture.reads.WeightReads` (weights, gradients, updates),
:class:`~probes.capture.lora.LoraShifts`, :class:`~probes.capture.scalars.ScalarLog`
(the every-step tier), :class:`~probes.capture.handoff.Handoff` (to the
publisher or the job thread), :mod:`~probes.capture.outlets` (publisher and job
view) and :class:`~probes.capture.actions.AlertActions` (``on_alert``).
"""

from __future__ import annotations

import atexit
import logging
from typing import Iterable

import torch
from torch import nn

from probes import engines
from probes.capture import handoff, optimizers
from probes.capture.actions import AlertActions
from probes.capture.activations import Activations
from probes.capture.hello import build_hello
from probes.capture.lora import LoraShifts
from probes.capture.options import check_options
from probes.capture.reads import WeightReads
from probes.capture.outlets import open_publisher, start_job
from probes.capture.run import default_name, optimizer_step, rank_and_world, unique_run_name
from probes.capture.scalars import ScalarLog
from probes.capture.signals import StepSignals
from probes.capture import clipping
from probes.capture.hooks import Hooks
from probes.capture.selection import Watched
from probes.distributed.job import DEFAULT_TIMEOUT, Job
from probes.engines import cpu_kernel
from probes.protocol import wire
from probes.publish import lifecycle
from probes.rules.engine import RuleEngine

log = logging.getLogger("xray-tui")


class XRay:
    """A probe attached to a model; see :func:`attach`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *, every: int = 10,
                 name: str | None = None, log: str | None = None, eps: float = 0.05, serve: bool = True,
                 include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                 hist_sample: int = 65535,  # counts then fit 16 bits on the wire
                 update_sample: int = 4096, rules: RuleEngine | None = None, on_alert=None,
                 alert_level: str = "critical", seed: int = 0, tcp: str | int | bool | None = None,
                 spectral_every: int | None = 500, layers: Iterable[int] | None = None, scaler=None,
                 start_step: int | None = None, hook_optimizer: bool = True, job: bool = True,
                 job_timeout: float = DEFAULT_TIMEOUT, serve_local: bool = True, signals: bool = True) -> None:
        check_options(every, hist_sample, update_sample, on_alert, start_step, scaler, alert_level)
        # Accelerate's, DeepSpeed's or a user's wrapper: the torch optimizer inside it is read and hooked
        optimizer, scaler = optimizers.unwrap(optimizer, scaler, hook=hook_optimizer)
        self.model = model
        self.optimizer = optimizer
        self.eps = eps
        self.scaler = scaler
        # the step a resumed run is at: given, or the optimizer's own count (Adam-family state["step"])
        start = start_step if start_step is not None else optimizer_step(optimizer)
        self._handles: list = []
        self._failed: set[str] = set()
        self._actions = AlertActions(on_alert, alert_level)
        self._skipped: set[tuple[str, str]] = set()  # (tensor name, kind) already noted as unreadable
        self._skip_notes: list[tuple[str, str, str]] = []  # noted before the publisher existed

        watched = Watched(model, include, exclude, layers, self._skip)  # ValueError before any hook
        self.params, self.trainable = watched.params, watched.trainable
        if any(p.device.type == "cpu" for _, p in self.params):
            cpu_kernel.ready()  # start building the CPU kernel now, off the training thread
        self._lora = LoraShifts(model, self.params)
        self._acts = Activations(watched.activations, eps, self._failed, self._fail, self._skip)
        rank, world = rank_and_world()
        self.rank = rank
        self.world = world
        self._reads = WeightReads(watched, self._lora, update_sample, seed, world, self._failed, self._fail,
                                  self._skip)
        #: every step's loss, learning rates, scale and rates (the cheap tier), shipped with sampled steps
        self._scalars = ScalarLog(rank, optimizer, scaler, self.params[0][1] if self.params else None, self.note)
        #: the every-step early-warning tier (Adam's RMS of g^2/v, update ratios) on subsets of its own
        self._signals = StepSignals(self.trainable, optimizer, self._fail, start) if signals else None
        if self._signals is not None and not self._signals.on:
            self._signals = None
        self.run = name or default_name()
        if serve and world == 1:
            self.run = unique_run_name(self.run)
        #: the whole job's view (probes/distributed/job.py): None with one rank, job=False, or a failed setup
        self._job: Job | None = None
        if job and world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            self._job = start_job(watched, self._lora.bases, self.run, every, job_timeout,
                                  lambda build: self.publisher.submit(build))
        if not serve_local and rank != 0:
            serve = False  # a very large job: rank 0 serves the whole job, the others only compute
        hello = build_hello(model, watched, self._lora.adapter_of, optimizer, scaler, run=self.run, rank=rank,
                            world=world, every=every, eps=eps, spectral=bool(spectral_every),
                            start_step=start, hosts=self._job.hosts if self._job is not None else [],
                            signal_tensors=self._signals.names if self._signals is not None else [])
        self.publisher = open_publisher(hello, serve=serve, log=log, rules=rules, tcp=tcp)
        self._hooked = optimizer is not None and hook_optimizer
        #: the hooks and the per-step state they read (one object: an unsampled step reads only it)
        self._hooks = hooks = Hooks(
            step_index=start, every=every, eps=eps, hist_k=hist_sample, seed=seed, world=world, optimizer=optimizer,
            scaler=scaler, hooked=self._hooked, job=self._job, scalars=self._scalars, acts=self._acts,
            reads=self._reads, actions=self._actions, failed=self._failed, fail=self._fail,
            handoff=handoff.Handoff(self.publisher, self._job, rank, self._lora.bases, self._fail),
            signals=self._signals)
        # the norm the loop's clipping was given: clipped gradients read the clip value through a blow-up
        self._unwatch_clip = clipping.watch(list(model.parameters()), self._scalars.note_clip)
        if on_alert is not None:
            self.publisher.subscribe(self._actions)
        # the device engine's fallback reaches the viewers (the header shows it, headless prints it)
        self._unsubscribe_engine = engines.on_fallback(
            lambda device, why: self.note("engine-fallback", device=device, why=why))
        if self._job is not None and not self._job.on and rank == 0:
            self.note("job-off", why=self._job.why_off)  # e.g. the ranks watch different layers
        for n, kind, why in self._skip_notes:
            self.note("skipped", layer=n, kind=kind, why=why)
        self._skip_notes.clear()
        self._reads.keep_init()  # distance from initialisation: the update subsets as they are at attach
        if self._signals is not None:
            self._signals.prepare()  # the tier's subsets, before any step
        for mname, module in watched.modules:
            self._handles.append(module.register_forward_hook(hooks._make_hook(mname)))
        # which pass this is (training or evaluation), and whether it is sampled
        self._handles.append(model.register_forward_pre_hook(hooks._begin_forward, with_kwargs=True))
        # the forward is over: reduce the held activations together, then let them go
        self._handles.append(model.register_forward_hook(hooks._end_forward))
        if self._hooked:
            self._handles.append(optimizer.register_step_pre_hook(lambda *_: hooks.before_update()))
            self._handles.append(optimizer.register_step_post_hook(lambda *_: hooks.after_update()))
            if scaler is not None:
                # with a GradScaler the step ends at scaler.update(): it runs every iteration, while
                # optimizer.step (and its hooks) does not when the gradients overflowed
                hooks._scaler_update = scaler.update
                scaler.update = hooks._on_scaler_update
        #: spectral health (WeightWatcher's metrics) in a background thread every N steps; None: off
        self.spectral = None
        if spectral_every:
            from probes.spectral.monitor import SpectralMonitor

            self.spectral = SpectralMonitor(self, every=spectral_every)
        atexit.register(self.close)  # socket, manifest and recording are cleaned up at exit
        lifecycle.register(self)  # so End says whether the run crashed or was killed (probes/publish/lifecycle.py)

    @property
    def step_index(self) -> int:
        """The step the run is at (the optimizer steps taken, from ``start_step``)."""
        return self._hooks.step_index

    @property
    def every(self) -> int:
        """The sampling cadence: one step in ``every`` is sampled."""
        return self._hooks.every

    @every.setter
    def every(self, n: int) -> None:
        self._hooks.every = n

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run (nothing more is read or sent)."""
        return self._hooks._closed

    def before_update(self) -> None:
        """Read weights and gradients before the optimizer steps (for integrations that drive the steps)."""
        self._hooks.before_update()

    def after_update(self, skipped: bool = False) -> None:
        """Read the update and close the step (``skipped``: the optimizer did not step)."""
        self._hooks.after_update(skipped)

    def step(self) -> None:
        """Mark a step boundary in loops that did not pass an optimizer.

        Call it once per optimizer step, after ``backward()`` and before
        ``zero_grad()``. The update is measured between two calls.
        """
        self._hooks.step()

    def hold_activation(self, name: str, output) -> None:
        """Hold one module's output as a hooked one would be (``xray-tui inspect``'s extra hooks)."""
        self._hooks._take_act(name, output)

    @property
    def should_stop(self) -> bool:
        """Set when an alert at ``alert_level`` fired and ``on_alert="stop"``: the loop should stop."""
        return self._actions.should_stop

    def _skip(self, name: str, kind: str, why: str) -> None:
        """Leave a tensor out, saying why once per (name, kind): an info log and a ``skipped`` Note."""
        if (name, kind) in self._skipped:
            return
        self._skipped.add((name, kind))
        log.info("xray-tui: %s (%s) is not read: %s", name, kind, why)
        if hasattr(self, "publisher"):
            self.note("skipped", layer=name, kind=kind, why=why)
        else:
            self._skip_notes.append((name, kind, why))

    def _fail(self, part: str) -> None:
        """Switch off a failing part of the probe with one warning."""
        self._failed.add(part)
        log.exception("xray-tui: the probe's %s statistics failed and are switched off", part)

    def log(self, **values) -> None:
        """Record run-level scalars of the current step: ``xr.log(loss=loss, acc=0.9)``.

        Tensors stay on their device (no host read) and travel with the next
        sampled step; a ``loss`` given here replaces the one read from the
        model's output. A name given several times within one step records
        their mean (one call per micro-batch of an accumulation loop). Call it
        before the step ends (before ``optimizer.step()``, or ``scaler.update()``
        with a GradScaler).
        """
        self._scalars.log(values)

    # -- lifecycle --------------------------------------------------------

    def memory(self) -> dict[str, int]:
        """Bytes the probe itself holds now: ``buffers`` on the model's device (the
        update subsets' indices, W_0 and the snapshot between a sampled step's two
        hooks) and the publisher's ``backlog`` of Step frames for late viewers."""
        return {"buffers": self._reads.held_bytes(), "backlog": self.publisher.backlog_size}

    def note(self, event: str, **data) -> None:
        """Send an event (e.g. an injected fault) along with the statistics."""
        step, rank = self.step_index, self.rank
        self.publisher.submit(lambda: wire.Note(step, rank, event, data))

    def close(self, reason: str | None = None, error: str = "") -> None:
        """Remove the hooks, send what is queued, close socket and recording.

        ``reason`` is :attr:`wire.End.reason`; by default it is worked out:
        ``crashed`` or ``interrupted`` when an uncaught exception is ending the
        process (the ``atexit`` close), ``stopped`` when ``on_alert="stop"``
        set :attr:`should_stop`, else ``finished``. ``error`` is the exception
        as ``Type: message``.
        """
        if self.closed:
            return
        if reason is None:
            reason, error = lifecycle.exit_reason()
            if reason == "finished" and self.should_stop:
                reason = "stopped"
        self._hooks.flush_eval()  # an eval pass that torch.compile traced
        if self._job is not None:
            self._job.close()  # its last rounds reach the publisher before End
        self.publisher.submit(self._scalars.take())  # the steps since the last sampled one
        self._hooks._closed = True
        atexit.unregister(self.close)
        self._unsubscribe_engine()
        self._unwatch_clip()
        lifecycle.unregister(self)
        for h in self._handles:
            h.remove()
        if self.spectral is not None:
            # its optimizer hooks removed here, in the training thread, and its thread joined: left to
            # the thread, they went up to a poll later, and a removal racing opt.step could break it
            self.spectral.close()
        if self._hooked and self.scaler is not None:
            self.scaler.__dict__.pop("update", None)  # the class's own update again
        step, rank = self.step_index, self.rank
        self.publisher.submit(lambda: wire.End(step, rank, reason, error))
        self.publisher.close()

    def __enter__(self) -> "XRay":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Close with how the block ended: ``crashed`` (the exception, which still
        propagates), ``interrupted`` (Ctrl-C), ``stopped`` or ``finished``."""
        if exc_type is None:
            self.close()
            return
        reason, error = lifecycle.reason_of(exc if exc is not None else exc_type())
        if reason == "finished" and self.should_stop:
            reason = "stopped"
        self.close(reason, error)


def attach(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs) -> XRay:
    """Attach a probe to ``model`` (and ``optimizer``, to count steps).

    ``optimizer`` is a torch optimizer or a wrapper that holds one in
    ``.optimizer`` (Accelerate's, DeepSpeed's): the one inside is hooked
    (:mod:`probes.capture.optimizers`), so accumulation counts optimizer steps.

    Keyword arguments: ``every`` (sample one step in N, default 10), ``name``
    (the run's name in ``xray-tui ls``), ``log`` (record the stream to this
    file), ``eps`` (near-zero threshold, 0.05), ``serve`` (listen for
    viewers, default True), ``include``/``exclude`` (glob patterns of module
    paths whose outputs are hooked), ``hist_sample`` (elements histogrammed
    per tensor), ``update_sample`` (elements per weight used for updates),
    ``rules`` (a :class:`~probes.rules.RuleEngine`), ``on_alert`` (a callable
    given each warning/critical :class:`~probes.protocol.wire.Alert` on the publisher
    thread; ``"raise"``: raise :class:`AlertRaised` in the training loop at the
    next step boundary; ``"stop"``: set ``xr.should_stop``), ``alert_level``
    (the least severity that raises or stops: ``"critical"``), ``tcp``
    (also listen on TCP: ``True`` for a free port on 127.0.0.1, ``PORT`` or
    ``"HOST:PORT"``; viewers need the random token the probe writes, readable
    by you only, next to its socket; see docs/reliability.md), ``layers``
    (transformer-block indices, e.g. ``[0, 1, 2]``: only modules and
    parameters inside those items of the model's block ``ModuleList``, e.g.
    ``transformer.h.0``, are watched; ValueError for an index the model does
    not have), ``job`` (with torch.distributed: rank 0 merges every rank's
    statistics into the whole job's, ``rank=-1``, through collectives on a
    gloo group of the probe's own, off the training thread; see
    :mod:`probes.distributed.job`; default True), ``job_timeout`` (seconds a round of
    those collectives may take before the view is switched off and the
    missing ranks named, 60), ``serve_local`` (False: ranks other than 0
    open no socket), ``signals`` (the every-step early-warning tier: Adam's
    RMS of g^2/v and the update ratio of each trainable weight on its update
    subset, every optimizer step; default True; see probes/capture/signals.py).
    Usable as a context manager; without an optimizer call ``xr.step()``.
    """
    return XRay(model, optimizer, **kwargs)
