"""The gradient norm before clipping, as the training loop's own clipping computed it.

Once the loop clips (``torch.nn.utils.clip_grad_norm_``, or Accelerate's and
the Hugging Face Trainer's clipping, which compute the norm and then call
``torch.nn.utils.clip_grads_with_norm_``), every gradient the optimizer
sees is clipped: a run clipped at 1.0 reads 1.0 at every step, through a
blow-up. The norm that predicts trouble is the one the clipping was given.
While a probe is attached, ``clip_grads_with_norm_`` is wrapped (as
``torch.nn.utils.clip_grads_with_norm_``, which Accelerate calls, and as
``torch.nn.utils.clip_grad._clip_grads_with_norm_``, which
``clip_grad_norm_`` calls): the wrapper passes ``total_norm`` (a
device tensor, never read here) and ``max_norm`` to each probe whose model
owns the parameters, then clips as before. The last probe to close puts
the original back.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

import torch
import torch.nn.utils
import torch.nn.utils.clip_grad

log = logging.getLogger("xray-tui")

Listener = Callable[[torch.Tensor, float], None]

_lock = threading.Lock()
_listeners: list[tuple[frozenset, Listener]] = []  # (ids of a model's parameters, the probe's callback)
#: where torch keeps the function, and the name it has there
_PLACES = ((torch.nn.utils, "clip_grads_with_norm_"), (torch.nn.utils.clip_grad, "_clip_grads_with_norm_"))
# each place's function as it was before the first probe wrapped it (kept after unwrapping: a later
# wrapper of someone else's may still call ours)
_originals: dict = {}
_wrappers: dict = {}


def _wrap(place):
    def wrapped(parameters, max_norm, total_norm, *args, **kwargs):
        """``clip_grads_with_norm_``, telling the probes that own ``parameters`` what it was given."""
        parameters = _tell(parameters, max_norm, total_norm)
        return _originals[place](parameters, max_norm, total_norm, *args, **kwargs)

    return wrapped


def _tell(parameters, max_norm, total_norm):
    if _listeners:
        params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
        parameters = params  # a generator could not be read twice
        first = id(params[0]) if params else None
        for ids, listener in list(_listeners):
            if first in ids:
                try:
                    listener(total_norm, float(max_norm))
                except Exception:  # the probe's failure must never reach training
                    log.exception("xray-tui: noting the clipped gradient norm failed")
    return parameters


def watch(params: list[torch.Tensor], listener: Listener) -> Callable[[], None]:
    """Call ``listener(total_norm, max_norm)`` whenever the loop clips gradients of ``params``;
    returns the function that stops it (and unwraps torch when no probe is left)."""
    entry = (frozenset(id(p) for p in params), listener)
    with _lock:
        for place in _PLACES:
            module, name = place
            current = getattr(module, name, None)
            if current is None:  # a torch without it (older than 2.6): no pre-clip norm from there
                continue
            wrapper = _wrappers.setdefault(place, _wrap(place))
            if current is not wrapper:
                _originals[place] = current
                setattr(module, name, wrapper)
        _listeners.append(entry)

    def stop() -> None:
        with _lock:
            if entry in _listeners:
                _listeners.remove(entry)
            if not _listeners:
                for place, wrapper in _wrappers.items():
                    module, name = place
                    if getattr(module, name, None) is wrapper:  # someone else's wrapper stays
                        setattr(module, name, _originals[place])

    return stop
