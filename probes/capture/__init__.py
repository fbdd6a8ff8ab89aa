"""The probe inside the training process: which modules, which hooks, which phase.

:mod:`~probes.capture.probe` holds :class:`XRay`, the coordinator that
:func:`probes.attach` returns; it owns the step count and the per-pass flags
(the hot path reads one object) and hands the work to modules with one job
each: ``selection`` (what is watched, and its names), ``activations`` (held
module outputs), ``reads`` (weights, gradients, updates, distance from init),
``lora`` (adapters' shift), ``scalars`` (the every-step tier), ``step``
(rows to a wire Step), ``handoff`` (builders for the publisher or the job
thread), ``hello`` (the Hello's layers), ``outlets`` (publisher and job
view), ``run`` (rank, name, resumed step), ``actions`` (``on_alert``),
``options`` (attach's checks) and ``eager`` (kept out of torch.compile).
Imports torch.
"""
