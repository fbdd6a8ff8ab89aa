"""xray-tui probes: attach to a PyTorch training run and stream its statistics.

``import probes`` does not import torch; :func:`attach` does, when called,
so the viewer can use :mod:`probes.protocol.wire`, :mod:`probes.protocol.stats` and
:mod:`probes.rules` on a machine without torch.
"""

from __future__ import annotations

__all__ = ["attach", "XRay", "AlertRaised"]


def attach(model, optimizer=None, **kwargs):
    """Attach a probe to ``model``; see :func:`probes.capture.probe.attach`."""
    from probes.capture.probe import attach as _attach

    return _attach(model, optimizer, **kwargs)


def __getattr__(name):
    if name == "XRay":
        from probes.capture.probe import XRay

        return XRay
    if name == "AlertRaised":
        from probes.capture.actions import AlertRaised

        return AlertRaised
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
