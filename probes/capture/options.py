"""The options of :func:`~probes.capture.probe.attach` that are checked before anything is hooked."""

from __future__ import annotations


def check_options(every, hist_sample, update_sample, on_alert, start_step, scaler, alert_level) -> None:
    """ValueError for an option :func:`~probes.capture.probe.attach` cannot take."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if not 1 <= hist_sample < 2**32:  # the kernel's and the wire's counts are 32-bit
        raise ValueError(f"hist_sample must be between 1 and 2**32 - 1, got {hist_sample}")
    if update_sample < 1:
        raise ValueError(f"update_sample must be >= 1, got {update_sample}")
    if not (on_alert is None or callable(on_alert) or on_alert in ("raise", "stop")):
        raise ValueError(f"on_alert must be a callable, 'raise' or 'stop', got {on_alert!r}")
    if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int)
                                   or start_step < 0):
        raise ValueError(f"start_step must be an int >= 0, got {start_step!r}")
    if scaler is not None and not callable(getattr(scaler, "update", None)):
        raise ValueError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if alert_level not in ("warning", "critical"):
        raise ValueError(f"alert_level must be 'warning' or 'critical', got {alert_level!r}")
