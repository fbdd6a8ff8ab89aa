"""PyTorch Lightning integration: ``Trainer(callbacks=[XRayCallback(every=10)])``.

The callback takes the same keyword arguments as :func:`probes.attach`, plus
``ranks`` (the ranks that attach a probe; default: all). It works with
``lightning`` (``lightning.pytorch``) or the standalone ``pytorch_lightning``;
importing :mod:`probes` imports neither.

Where the numbers are read, in Lightning 2.x (``Precision._after_closure``)::

    closure (training_step, backward) -> GradScaler.unscale_ (16-mixed only)
    -> on_before_optimizer_step -> configure_gradient_clipping -> optimizer update
    -> on_train_batch_end

Lightning clips *after* ``on_before_optimizer_step``, inside the
LightningModule's ``configure_gradient_clipping`` hook, so a callback's
``on_before_optimizer_step`` sees unscaled but unclipped gradients. To read
what the optimizer uses, the callback wraps that hook on the module instance
while attached (the class is untouched; the instance attribute is removed at
close): weights and gradients are read right after the clipping (the
default or the user's own), before the optimizer changes the weights. Under
manual optimization Lightning does not call that hook (the user clips before
``opt.step()``), so there they are read in ``on_before_optimizer_step``.
Updates are read in ``on_train_batch_end`` of a batch that stepped (the
optimizer is done by then; a step that GradScaler skipped reads as zero).
The probe closes at the end of ``fit`` or when it raises (``End.reason``
``crashed`` with the exception, ``interrupted`` for Ctrl-C).
"""

from __future__ import annotations

import functools

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package; Lightning calls callbacks' hooks by name either way
    from pytorch_lightning import Callback

from probes.publish import lifecycle
from probes.capture.probe import XRay
from probes.capture.run import rank_and_world

_HOOK = "configure_gradient_clipping"


class XRayCallback(Callback):
    """Attach an xray-tui probe to the LightningModule a ``Trainer`` fits."""

    def __init__(self, ranks: tuple[int, ...] | None = None, **kwargs) -> None:
        self.kwargs = kwargs
        self.ranks = ranks
        self.xray: XRay | None = None
        self._module = None  # the module whose clipping hook is wrapped
        self._pending = False  # weights and gradients were read; the update is not yet
        self._stepped = False  # the optimizer stepped in this batch (GradScaler skips it on inf/NaN)
        self._step_hooks: list = []

    def on_fit_start(self, trainer, pl_module) -> None:
        """Attach to the module (after the strategy set it up: the process group exists)."""
        rank, _ = rank_and_world()
        if self.xray is not None or (self.ranks is not None and rank not in self.ranks):
            return
        opts = dict(self.kwargs)
        # the whole-job view's collectives need every rank: off when only some ranks attach
        opts.setdefault("job", self.ranks is None)
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        opts.setdefault("start_step", trainer.global_step)  # a resumed fit goes on from its step
        opts.setdefault("scaler", getattr(getattr(trainer, "precision_plugin", None), "scaler", None))
        # the optimizer gives the learning rates; the steps are this callback's events
        self.xray = XRay(pl_module, optimizer, hook_optimizer=False, **opts)
        for opt in trainer.optimizers:
            self._step_hooks.append(opt.register_step_pre_hook(self._on_step))
        original = getattr(pl_module, _HOOK)

        @functools.wraps(original)  # __wrapped__: Lightning's is_overridden still sees the user's hook
        def clip_then_read(*args, **kwargs):
            out = original(*args, **kwargs)
            self._read()
            return out

        setattr(pl_module, _HOOK, clip_then_read)  # an instance attribute; close() deletes it
        self._module = pl_module

    def _on_step(self, *_) -> None:
        self._stepped = True

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        """Manual optimization only: Lightning calls no clipping hook there."""
        if not pl_module.automatic_optimization:
            self._read()

    def _read(self) -> None:
        # once per training batch: a second optimizer stepped in one batch (manual
        # optimization) is read at the next sampled batch, not as a step of its own
        if self.xray is not None and not self._pending:
            self._pending = True
            self.xray.before_update()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Updates, after the batch's optimizer step; then the step is shipped."""
        if self.xray is None or not self._pending:
            return  # an accumulation batch: the optimizer did not step
        self._pending = False
        skipped, self._stepped = not self._stepped, False
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            try:
                self.xray.log(loss=loss)  # what training_step returned (kept on its device)
            except (TypeError, ValueError):
                pass  # not a one-element loss: nothing to log
        try:
            self.xray.after_update(skipped=skipped)  # raises AlertRaised with on_alert="raise"
        finally:
            if self.xray.should_stop:
                trainer.should_stop = True

    def on_fit_end(self, trainer, pl_module) -> None:
        """Close the probe (``finished``, or ``stopped`` after ``on_alert="stop"``)."""
        self._close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Close the probe when fit raises: ``crashed`` with ``Type: message``, or ``interrupted``."""
        self._close(*lifecycle.reason_of(exception))

    def _close(self, reason: str | None = None, error: str = "") -> None:
        for h in self._step_hooks:
            h.remove()
        self._step_hooks.clear()
        if self._module is not None:
            self._module.__dict__.pop(_HOOK, None)
            self._module = None
        if self.xray is not None:
            self.xray.close(reason, error)
            self.xray = None
        self._pending = False
