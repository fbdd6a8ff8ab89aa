"""The probe inside the training process: which modules, which hooks, which phase.

:mod:`~probes.capture.probe` holds :class:`XRay`, which :func:`probes.attach`
returns: it attaches, wires and closes the probe and is its public face.
The work is done by modules with one job each: ``selection`` (what is
watched, and its names), ``hooks`` (the hooks and the per-step state they
read, on one object: the hot path), ``activations`` (held module outputs),
``reads`` (weights, gradients, updates, distance from init), ``lora``
(adapters' shift), ``scalars`` (the every-step tier), ``step`` (rows to a
wire Step), ``handoff`` (builders for the publisher or the job thread),
``hello`` (the Hello's layers), ``outlets`` (publisher and job view), ``run``
(rank, name, resumed step), ``actions`` (``on_alert``), ``options``
(attach's checks) and ``eager`` (kept out of torch.compile). Imports torch.
"""
