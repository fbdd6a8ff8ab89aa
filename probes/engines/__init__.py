"""Which engine reduces a device's tensors: the one place the choice is made.

``XRAY_TUI_ENGINE``:

* ``auto`` (default): the C kernel (:mod:`probes.engines.cpu_kernel`) for CPU
  tensors, the device engine (:mod:`probes.engines.device`, Triton) for CUDA
  tensors, torch's ops for anything else (MPS, XPU...) and wherever the
  chosen engine cannot run (no C compiler, no Triton);
* ``device``: the device engine for every tensor (CPU tensors run in
  Triton's interpreter: slow, for tests);
* ``cpu-kernel``: the C kernel for CPU tensors, torch's ops elsewhere;
* ``torch``: torch's ops everywhere.

``XRAY_TUI_CPU_KERNEL=0`` still switches the C kernel off. A failure inside
the device engine switches it off for that device with one warning, and the
listeners (the probe, which sends a ``engine-fallback`` Note to viewers)
are told; the step's tensors are then reduced by torch's ops.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

import torch

from probes.engines import cpu_kernel

log = logging.getLogger("xray-tui")

CHOICES = ("auto", "device", "cpu-kernel", "torch")
_warned: set[str] = set()
_disabled: dict[str, str] = {}  # device type -> why the device engine is off there
_listeners: list[Callable[[str, str], None]] = []
_lock = threading.Lock()
_triton: bool | None = None
_triton_why = ""


def _once(key: str, level: int, msg: str, *args) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    log.log(level, msg, *args)


def choice() -> str:
    """The engine asked for in ``XRAY_TUI_ENGINE`` (``auto`` when unset or unknown)."""
    asked = os.environ.get("XRAY_TUI_ENGINE", "auto").strip().lower() or "auto"
    if asked not in CHOICES:
        _once("bad:" + asked, logging.WARNING, "xray-tui: XRAY_TUI_ENGINE=%s is not one of %s; using auto",
              asked, ", ".join(CHOICES))
        return "auto"
    return asked


def triton_ready() -> bool:
    """Whether the device engine imports (Triton is installed and loads)."""
    global _triton, _triton_why
    if _triton is None:
        try:
            from probes.engines import device as device_engine  # noqa: F401
            _triton = True
        except Exception as e:  # ImportError, or a broken install
            _triton, _triton_why = False, str(e).splitlines()[0] if str(e) else type(e).__name__
            _once("triton", logging.DEBUG, "xray-tui: device engine unavailable: %s", e)
    return _triton


def for_device(device: torch.device) -> str:
    """``"device"``, ``"cpu-kernel"`` or ``"torch"``: how this device's tensors are reduced now."""
    asked = choice()
    if asked == "torch":
        return "torch"
    if device.type == "cpu" and asked in ("auto", "cpu-kernel"):
        return "cpu-kernel" if cpu_kernel.ready() is not None else "torch"
    if asked == "cpu-kernel" or (asked == "auto" and device.type != "cuda"):
        return "torch"
    if device.type in _disabled:
        return "torch"
    if not triton_ready():
        if asked == "device":
            _once("no-triton", logging.WARNING,
                  "xray-tui: XRAY_TUI_ENGINE=device but Triton is not available (%s): statistics use torch's ops",
                  _triton_why or "not installed")
        return "torch"
    return "device"


def failed(device: torch.device, error: BaseException) -> None:
    """The device engine failed on ``device``: off there from now on, said once, listeners told."""
    why = f"{type(error).__name__}: {error}".splitlines()[0][:300]
    with _lock:
        if device.type in _disabled:
            return
        _disabled[device.type] = why
        listeners = list(_listeners)
    log.warning("xray-tui: the device engine failed on %s (%s); statistics use torch's ops from now on",
                device.type, why)
    for fn in listeners:
        try:
            fn(device.type, why)
        except Exception:
            log.exception("xray-tui: an engine-fallback listener failed")


def on_fallback(fn: Callable[[str, str], None]) -> Callable[[], None]:
    """Call ``fn(device_type, why)`` when the device engine falls back; returns the unsubscribe."""
    with _lock:
        _listeners.append(fn)

    def remove() -> None:
        with _lock:
            if fn in _listeners:
                _listeners.remove(fn)

    return remove


def reset() -> None:
    """Forget fallbacks and warnings (tests)."""
    with _lock:
        _disabled.clear()
        _warned.clear()
