"""The probe inside the training process: which modules, which hooks, which phase.

:mod:`~probes.capture.probe` holds :class:`XRay`, the coordinator that
:func:`probes.attach` returns. Imports torch.
"""
