"""Hugging Face ``Trainer`` integration: ``Trainer(..., callbacks=[XRayCallback(every=10)])``.

The callback takes the same keyword arguments as :func:`probes.attach`.
Gradients are read in ``on_pre_optimizer_step`` (after the Trainer has
unscaled and clipped them), updates in ``on_optimizer_step``, so the numbers
are the ones the optimizer sees. Under torch.distributed only the ranks in
``ranks`` (default: all) attach a probe.
"""

from __future__ import annotations

from transformers import TrainerCallback

from probes.capture.probe import XRay
from probes.capture.run import rank_and_world


class XRayCallback(TrainerCallback):
    """Attach an xray-tui probe to the model a ``Trainer`` trains."""

    def __init__(self, ranks: tuple[int, ...] | None = None, **kwargs) -> None:
        self.kwargs = kwargs
        self.ranks = ranks
        self.xray: XRay | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        """Attach to the model (the Trainer's own optimizer step is hooked by events)."""
        rank, _ = rank_and_world()
        if self.ranks is not None and rank not in self.ranks:
            return
        opts = dict(self.kwargs)
        # the whole-job view's collectives need every rank: off when only some ranks attach
        opts.setdefault("job", self.ranks is None)
        opts.setdefault("name", args.run_name or "hf-trainer")
        optimizer = kwargs.get("optimizer")
        opts.setdefault("start_step", state.global_step)  # a resumed run goes on from its step
        # accelerate's optimizer wrapper holds the GradScaler under fp16 and says when it skipped a step
        opts.setdefault("scaler", getattr(optimizer, "scaler", None))
        # the optimizer's param groups give the learning rates; its steps are this callback's events
        self.xray = XRay(model, optimizer, hook_optimizer=False, **opts)
        if args.max_grad_norm and args.max_grad_norm > 0:
            # the Trainer clips every step: the rules judge gradients as clipped, and advise no clipping
            self.xray.note("clip", max_norm=float(args.max_grad_norm))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Weights and gradients, as the optimizer is about to see them."""
        if self.xray is not None:
            self.xray.before_update()

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Updates; then the step is shipped."""
        if self.xray is not None:
            optimizer = kwargs.get("optimizer")
            self.xray.after_update(skipped=bool(getattr(optimizer, "step_was_skipped", False)))

    def on_step_end(self, args, state, control, **kwargs):
        """With ``on_alert="stop"``, ask the Trainer to stop after an alert."""
        if self.xray is not None and self.xray.should_stop:
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        """Close the probe: socket and manifest removed, recording flushed."""
        if self.xray is not None:
            self.xray.close()
            self.xray = None
