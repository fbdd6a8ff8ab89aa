"""Host values to the device and rows back, without making the training thread wait.

:func:`upload` stages host values through pinned memory (a queued copy, no
host sync); :class:`HostCopy` is a step's rows on their way back, waited for
on the publisher thread.
"""

from __future__ import annotations

import numpy as np
import torch

from probes.engines.layout import NCOL
from probes.protocol import histogram


class HostCopy:
    """A step's rows on their way to the host: :meth:`wait` (on the publisher thread) gives them.

    The device blocks left in one non-blocking copy into pinned memory, with a
    CUDA event recorded after it; the training thread never waits for it.
    """

    def __init__(self, blocks: list, copies: list[tuple[torch.Tensor, object]]) -> None:
        self._blocks = blocks  # ("np", rows, counts) | ("dev", copy index, first row, rows)
        self._copies = copies  # (host tensor [n, NCOL + NUM_BINS], CUDA event or None)

    def wait(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ``[n, NCOL]`` and histograms ``[n, NUM_BINS]`` (waits for the copy's event)."""
        hosts = []
        for host, event in self._copies:
            if event is not None:
                event.synchronize()
            hosts.append(host.numpy())
        if not self._blocks:
            return np.zeros((0, NCOL)), np.zeros((0, histogram.NUM_BINS), dtype=np.int64)
        rows, counts = [], []
        for block in self._blocks:
            if block[0] == "np":
                rows.append(block[1])
                counts.append(block[2])
            else:
                _, c, at, n = block
                rows.append(hosts[c][at : at + n, :NCOL])
                counts.append(hosts[c][at : at + n, NCOL:])
        return np.concatenate(rows), np.concatenate(counts).astype(np.int64)


def upload(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Host values (a list, a numpy array, a float) as a tensor on ``device``, without a host sync.

    On CUDA ``torch.tensor(..., device=)`` copies from pageable memory and then waits for the
    stream to drain, which costs the training its run-ahead. Staged through pinned memory, the
    copy is queued like a kernel; torch's caching host allocator keeps the pinned block until the
    copy is done. (bench/gpu.py counts a sampled step's host syncs on a GPU: 0.)
    """
    t = torch.as_tensor(values, dtype=dtype)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_host_async(t: torch.Tensor) -> tuple[torch.Tensor, object]:
    """``t`` copied to (pinned) host memory without blocking, and the CUDA event that marks the end."""
    if t.device.type == "cpu":
        return t, None
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return host, event
    return t.cpu(), None  # other devices: a plain (blocking) copy


def _element(v):
    """An extra column's value: ``(vector, index)`` is that element of the vector."""
    return v[0][v[1]] if isinstance(v, tuple) else v


def _on(v, device: torch.device) -> torch.Tensor:
    """An extra column's value as a 0-d float64 tensor on ``device`` (host values uploaded without a sync)."""
    v = _element(v)
    if isinstance(v, torch.Tensor) and v.device == device:
        return v.to(torch.float64).reshape(())
    return upload(v.detach() if isinstance(v, torch.Tensor) else float(v), device, torch.float64).reshape(())
