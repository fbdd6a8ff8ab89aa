"""Public name of the Hugging Face callback: ``probes.hf.XRayCallback``.

The code lives in :mod:`probes.integrations.hf`.
"""

from probes.integrations.hf import XRayCallback

__all__ = ["XRayCallback"]
