"""Public name of the Lightning callback: ``probes.lightning.XRayCallback``.

The code lives in :mod:`probes.integrations.lightning`.
"""

from probes.integrations.lightning import XRayCallback

__all__ = ["XRayCallback"]
