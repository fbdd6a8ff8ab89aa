"""The torch engine: a row of sufficient statistics from torch ops, on any device.

The fallback where neither the CPU kernel (:mod:`probes.engines.cpu_kernel`)
nor the device engine (:mod:`probes.engines.device`) runs, and the reference
both are tested against: :func:`segment_rows` reduces many tensors
concatenated into one flat buffer (segment sums, minima and maxima: few
launches for many small tensors), :func:`tensor_row` one large tensor.
:func:`sample_plan` picks a tensor's histogram sample, :func:`dead_units` the
share of units never active.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from probes.engines.transfer import upload

#: Largest |x| for which x^3 and x^4 are summed in float32 (n * x^4 stays below ~1e25).
POW4_SAFE = 1e4
#: Below this largest |x|, x^4 would sink into float32's subnormals (a vanishing gradient's kurtosis).
POW4_TINY = 1e-7


def _flat32(x: torch.Tensor) -> torch.Tensor:
    """A flat float32 view (or copy, for other float types) of ``x``."""
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    return x.reshape(-1)


def segment_rows(flat: torch.Tensor, lengths: list[int], eps: float) -> torch.Tensor:
    """Exact statistics of consecutive segments of ``flat``: ``[len(lengths), _NBASE]``.

    Sums are accumulated in float64. A NaN in a segment makes its sums, min
    and max NaN, as they are for the tensor itself; the counts stay exact.
    """
    lens = upload(lengths, flat.device)

    def seg(data: torch.Tensor, how: str = "sum") -> torch.Tensor:
        return torch.segment_reduce(data, how, lengths=lens, unsafe=True).double()

    d = flat.double()
    d2 = d * d
    a = flat.abs()
    cols = [
        lens.double(),
        seg(d),
        seg(d2),
        seg(a.double()),
        seg(flat, "min"),
        seg(flat, "max"),
        seg((a < eps).double()),
        seg((flat == 0).double()),
        seg(torch.isnan(flat).double()),
        seg((flat == math.inf).double()),
        seg((flat == -math.inf).double()),
        seg(d2 * d),
        seg(d2 * d2),
    ]
    return torch.stack(cols, 1)


def tensor_row(f: torch.Tensor, eps: float) -> torch.Tensor:
    """The same statistics for one large flat tensor (no segment bookkeeping).

    Here the passes over memory cost, not the launches, so the row is built
    from few of them: norms give the sums of |x| and x^2 without
    materialising a copy, one float32 ``y*y`` (y = x - mean) serves x^3 and
    x^4 as dot products (in float64 where |x| is huge or tiny, or the device
    is not the CPU, which would need a host read to tell), and on the CPU,
    where a host read is free, the NaN/Inf counts are skipped when the sums
    show the tensor is finite. Sums of x and x^2 accumulate in float64, like
    :func:`segment_rows`.
    """
    n = f.numel()
    s1 = f.sum(dtype=torch.float64)
    s2 = torch.linalg.vector_norm(f, dtype=torch.float64).square()
    zero = torch.zeros((), dtype=torch.float64, device=f.device)
    if f.device.type == "cpu" and bool(torch.isfinite(s1 + s2)):
        nan = posinf = neginf = zero  # a NaN or an Inf anywhere would make the sums non-finite
    else:
        nan = torch.isnan(f).sum().double()
        posinf = (f == math.inf).sum().double()
        neginf = (f == -math.inf).sum().double()
    mn, mx = torch.aminmax(f)
    if f.device.type == "cpu" and POW4_TINY <= float(torch.maximum(-mn, mx)) <= POW4_SAFE:
        # float32 suffices for powers of y = x - c, c the mean, as in the CPU kernel: the rounding
        # is relative to the spread, so a mean that dwarfs it leaves skewness and kurtosis intact
        c = float(np.float32(float(s1) / n))
        y = f - c
        sq = y * y
        p1, p2 = y.sum(dtype=torch.float64), sq.sum(dtype=torch.float64)
        # each power rounded once or twice in float32 (<= 3 ulp of |y|^p) and summed in float64, so
        # the sums are good to ~4e-7 of sum |y|^p whatever the BLAS: a float32 dot product's own
        # accumulation error depends on the BLAS kernel (AMD's and Intel's differed by 4x)
        p3, p4 = (sq * y).sum(dtype=torch.float64), sq.square().sum(dtype=torch.float64)
        sum3 = p3 + 3 * c * p2 + 3 * c * c * p1 + n * c**3
        sum4 = p4 + 4 * c * p3 + 6 * c * c * p2 + 4 * c**3 * p1 + n * c**4
    else:
        d = f.double()
        sq = d.square()
        sum3, sum4 = torch.dot(sq, d), torch.dot(sq, sq)
    cols = [
        zero + n,
        s1,
        s2,
        torch.linalg.vector_norm(f, 1, dtype=torch.float64),
        mn.double(),
        mx.double(),
        (f.abs() < eps).sum().double(),
        (n - torch.count_nonzero(f)).double(),
        nan,
        posinf,
        neginf,
        sum3,
        sum4,
    ]
    return torch.stack(cols)


def sample_plan(x: torch.Tensor, k: int, generator: torch.Generator | np.random.Generator | None = None,
                n: int | None = None) -> tuple[int, int, int]:
    """Which elements of ``x`` go into the histogram: ``(offset, stride, count)`` of its flat view
    (of its first ``n`` elements when given: a piece of a flat buffer).

    At most ``k`` elements. A plain stride aliases with row widths
    (DESIGN.md); we take an odd stride coprime with the last dimension and a
    random offset (from a numpy generator, or a torch one).
    """
    width = (x.shape[-1] if x.dim() else 1) if n is None else max(n, 1)
    n = x.numel() if n is None else n
    if n <= k:
        return 0, 1, n
    stride = -(-n // k) | 1
    while math.gcd(stride, width) != 1:
        stride += 2
    if generator is None:
        offset = 0
    elif isinstance(generator, np.random.Generator):  # no torch op: nothing a device counts
        offset = int(generator.integers(stride))
    else:
        offset = int(torch.randint(stride, (1,), generator=generator))
    return offset, stride, min(k, -(-(n - offset) // stride))


def dead_units(x: torch.Tensor, eps: float) -> torch.Tensor | None:
    """Fraction of last-dimension units never above eps in the batch (torch ops: any device,
    and traceable by torch.compile; the CPU kernel counts them in its own pass)."""
    if not _has_units(x):
        return None
    alive = (x.detach().abs() > eps).reshape(-1, x.shape[-1]).any(0)
    return 1.0 - alive.float().mean()


def _has_units(x: torch.Tensor) -> bool:
    return x.dim() >= 2 and x.shape[-1] > 0 and x.numel() > 0
