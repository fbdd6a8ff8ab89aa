"""The cheap tier: run-level scalars of every training step, shipped as they come.

Every step the probe notes the loss (the model output's ``.loss``, or what
``xr.log`` was given), the input size, each param group's learning rate, a GradScaler's
scale, whether the step was skipped, the step rate, the gradient norm the
loop's clipping was given (:mod:`probes.capture.clipping`) and the
early-warning signals (:mod:`probes.capture.signals`). Device values (a
CUDA loss, the scaler's scale, the signals) are not read: they are kept as
tensors, and the steps kept so far are shipped every step, or every
:data:`SHIP_INTERVAL` seconds when steps come faster, and with each sampled
step: the kept device values are stacked into one tensor per device whose
copy to the host starts without waiting, and the publisher thread, not the
training thread, waits for it. So an alert about any step reaches a viewer
within a step or two (or :data:`SHIP_INTERVAL`), not at the next sampled step.
"""

from __future__ import annotations

import math
import time

import torch

from probes.capture import signals as tier
from probes.capture.eager import eager
from probes.engines.transfer import to_host_async
from probes.protocol import wire

#: Steps kept before they are shipped whatever the time (bounds memory).
RING_LIMIT = 1024
#: Seconds between two shipments of kept steps: slower steps ship one by one, faster ones in bursts
#: (each shipment is a builder on the publisher's queue and a frame per step). Each shipment
#: wakes the publisher thread, whose Python holds the GIL training needs: on nanoGPT's shape (20
#: ms steps) shipping every step cost the publisher ~100 us a step more than every 5th did.
SHIP_INTERVAL = 0.05


def _value(v):
    """A float, or a detached 0-d float tensor that stays on its device (no host read)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"a logged scalar must have one element, got shape {tuple(v.shape)}")
        v = v.detach()  # each further op is ~1.5 us of host time per step: only the ones needed
        v = v.reshape(()) if v.dim() else v
        return v if v.dtype == torch.float32 else v.float()
    return float(v)


class ScalarLog:
    """Per-step scalars of one rank: collect during a step, close it, ship in bursts.

    It reads what each training forward says (:meth:`note_inputs`,
    :meth:`note_loss`); ``first`` (a watched parameter, or None) tells it the
    device whose autocast state gives the precision, reported once through
    ``note("precision", precision=...)``.
    """

    def __init__(self, rank: int, optimizer=None, scaler=None, first: torch.Tensor | None = None,
                 note=None) -> None:
        self.rank = rank
        self.optimizer = optimizer
        self.scaler = scaler
        self._first = first
        self._note = note
        self.precision_seen = ""  # autocast's dtype once a training forward ran under it
        self._ring: list[tuple[int, float, dict, bool, tuple | None]] = []
        self._current: dict[str, object] = {}
        self._loss_sum = None  # sum of this step's training losses (gradient accumulation: several)
        self._loss_n = 0
        self._tokens = self._samples = 0
        self._logged: dict[str, tuple] = {}  # xr.log's sum and count of a name logged more than once this step
        self._last_time: float | None = None
        self._step_scale = None  # the scale this step used, kept before scaler.update() changes it
        self._shipped = time.perf_counter()  # when the kept steps were last taken

    def add_loss(self, loss, share: bool = False) -> None:
        """A training forward's loss (a tensor or a float): the step's loss is their mean.

        ``share``: the loss is already a share of the step's (the model divided its sum by
        ``num_items_in_batch``, the items of all the step's micro-batches, as the HF Trainer
        asks): the step's loss is then their sum, kept as one loss so the mean leaves it whole.
        """
        v = _value(loss)
        self._loss_sum = v if self._loss_sum is None else self._loss_sum + v
        self._loss_n = 1 if share else self._loss_n + 1

    def add_inputs(self, tokens: int, samples: int) -> None:
        """A training forward's input size, for tokens/s and samples/s."""
        self._tokens += tokens
        self._samples += samples

    @eager
    def note_inputs(self, args, kwargs) -> None:
        """A training forward's size (tokens/s, samples/s) and precision (autocast), read from
        the inputs' shapes and the autocast state: no tensor is read."""
        x = kwargs.get("input_ids")
        if not isinstance(x, torch.Tensor):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is not None and x.dim():
            if not x.is_floating_point():
                self.add_inputs(x.numel(), x.shape[0])  # token ids: (batch, sequence)
            else:
                self.add_inputs(0, x.shape[0])
        if not self.precision_seen and self._first is not None:
            device = self._first.device.type
            if torch.is_autocast_enabled(device):
                dtype = torch.get_autocast_dtype(device)
                name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype).replace("torch.", ""))
                self.precision_seen = f"{name}-autocast" + ("+scaler" if self.scaler is not None else "")
                self._note("precision", precision=self.precision_seen)

    @eager
    def note_loss(self, output, share: bool = False) -> None:
        """The loss of a training forward, when the model returns one (Hugging Face models
        given labels return ``.loss``; nanoGPT-style models a ``(logits, loss)`` tuple, whose
        first 0-d floating tensor that autograd tracks is taken); kept on its device.
        ``share``: the forward was given ``num_items_in_batch`` (see :meth:`add_loss`)."""
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if loss is None and isinstance(output, tuple) and not hasattr(output, "_fields"):
            loss = next((t for t in output if isinstance(t, torch.Tensor) and t.dim() == 0
                         and t.is_floating_point() and t.grad_fn is not None), None)
        if isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.is_floating_point():
            self.add_loss(loss, share)

    def _mean_with(self, name: str, v):
        """The mean of ``name``'s values this step with ``v`` added (``xr.log`` again in one step)."""
        total, n = self._logged.get(name) or (self._current[name], 1)
        self._logged[name] = (total + v, n + 1)
        return (total + v) / (n + 1)

    def log(self, values: dict) -> None:
        """User scalars for the current step (``xr.log(loss=..., acc=...)``); a ``loss`` here wins.

        A name logged several times within one step is their mean (``xr.log(loss=loss)`` in
        each micro-batch of a gradient-accumulation loop gives the step's mean loss).
        """
        for name, v in values.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"scalar names are non-empty strings, got {name!r}")
            if name in self._current:
                self._current[name] = self._mean_with(name, _value(v))
                continue
            self._logged.pop(name, None)  # a new step (its end emptied _current): a new sum
            self._current[name] = _value(v)

    def note_clip(self, total_norm, max_norm: float) -> None:
        """The loop clipped gradients (:mod:`probes.capture.clipping`): the norm it was given
        (a device tensor, not read) and its ``max_norm``."""
        self._current["grad_norm_preclip"] = _value(total_norm)
        self._current["clip"] = float(max_norm)

    def _scale(self):
        s = self.scaler
        if s is None or not getattr(s, "is_enabled", lambda: False)():
            return None
        scale = getattr(s, "_scale", None)  # a device tensor; get_scale() would read it on the host
        return scale.detach().clone() if isinstance(scale, torch.Tensor) else None

    def keep_scale(self) -> None:
        """Keep the scale this step uses (called before the optimizer steps: GradScaler's
        ``update()`` changes it right after)."""
        self._step_scale = self._scale()

    def end_step(self, step: int, skipped: bool = False, signals: tuple | None = None) -> None:
        """Close ``step``: learning rates, scale and rates are read now (no host sync);
        ``signals``: :meth:`probes.capture.signals.StepSignals.after`'s, or None."""
        now = time.perf_counter()
        values = dict(self._current)
        if "loss" not in values and self._loss_n:
            values["loss"] = self._loss_sum / self._loss_n if self._loss_n > 1 else self._loss_sum
        if self.optimizer is not None:
            for i, g in enumerate(self.optimizer.param_groups):
                lr = g.get("lr")
                if lr is not None:
                    values["lr" if i == 0 else f"lr/{i}"] = _value(lr)
        scale = self._step_scale if self._step_scale is not None else self._scale()
        self._step_scale = None
        if scale is not None:
            values["scale"] = scale
        if self._last_time is not None and now > self._last_time:
            dt = now - self._last_time
            values["steps_per_s"] = 1.0 / dt
            if self._tokens:
                values["tokens_per_s"] = self._tokens / dt
            if self._samples:
                values["samples_per_s"] = self._samples / dt
        self._last_time = now
        self._ring.append((step, time.time(), values, skipped, signals))
        self._current = {}
        self._loss_sum, self._loss_n, self._tokens, self._samples = None, 0, 0, 0

    def due(self) -> bool:
        """Whether the kept steps should be shipped now, sampled step or not."""
        return bool(self._ring) and (len(self._ring) >= RING_LIMIT or self._last_time - self._shipped >= SHIP_INTERVAL)

    def take(self):
        """Hand over the kept steps: a builder (run on the publisher thread) of their
        :class:`~probes.protocol.wire.Scalars`. The device values are stacked into one tensor
        per device here, and its copy to the host started, so the publisher waits for one
        copy per device and the training thread for none."""
        ring, self._ring = self._ring, []
        self._shipped = time.perf_counter()
        if not ring:
            return lambda: []
        tensors: dict[torch.device, list] = {}
        for _, _, values, _, _ in ring:
            for v in values.values():
                if isinstance(v, torch.Tensor):
                    tensors.setdefault(v.device, []).append(v)
        copies = {d: to_host_async(torch.stack(ts)) for d, ts in tensors.items()}
        # the tier's sums: on the device (stacked, one copy) or already on the host (the C kernel's)
        on_device = [s[0] for *_, s in ring if s is not None and isinstance(s[0], torch.Tensor)]
        sig_copy = to_host_async(torch.stack(on_device)) if on_device else None
        rank = self.rank

        def build() -> list[wire.Scalars]:
            host = {d: iter(_host(c).tolist()) for d, c in copies.items()}  # the publisher waits, not training
            sums = iter(_host(sig_copy).numpy()) if sig_copy is not None else None
            out = []
            for step, t, values, skipped, signals in ring:
                vals = {k: next(host[v.device]) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
                rms = ratio = b""
                if signals is not None:
                    raw = next(sums) if isinstance(signals[0], torch.Tensor) else signals[0]
                    r, u, est = tier.finish(raw, signals[1])
                    rms, ratio = r.astype("<f4").tobytes(), u.astype("<f4").tobytes()
                    vals["grad_norm_est"] = est
                out.append(wire.Scalars(step, rank, t, vals, skipped, rms, ratio))
            return out

        return build


def _host(copy) -> torch.Tensor:
    """A :func:`~probes.engines.transfer.to_host_async` copy, once it has arrived."""
    host, event = copy
    if event is not None:
        event.synchronize()
    return host


def grad_norm(step: wire.Step) -> float:
    """The global L2 norm of the gradients a Step holds (this rank's shards under FSDP)."""
    sq = [s.sumsq for s in step.samples if s.kind == "grad"]
    return math.sqrt(sum(sq)) if sq else math.nan
