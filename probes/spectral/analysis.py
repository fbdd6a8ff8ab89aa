"""Spectral health of weight matrices: WeightWatcher's metrics, on the weight's device.

For a weight W (N x M, M <= N) the empirical spectral density (ESD) is the
set of eigenvalues λ of WᵀW, the squared singular values of W. From them,
with WeightWatcher's definitions (weightwatcher 0.7.x, ``analyze()`` with
its defaults):

- ``alpha``: the continuous power-law exponent by maximum likelihood,
  α = 1 + n / Σ ln(λᵢ/λ_min) over the n eigenvalues ≥ λ_min, where λ_min is
  the candidate (every eigenvalue above 1e-5 but the largest) whose fit has
  the smallest Kolmogorov-Smirnov distance; with fewer than 20 eigenvalues,
  WeightWatcher's small-sample variant (bias-corrected MLE (n-1)/Σ, tails of
  at least 8 eigenvalues);
- ``alpha_weighted`` = α · log10 λmax; ``log_norm`` = log10 Σλ (the squared
  Frobenius norm); ``log_spectral_norm`` = log10 λmax; ``stable_rank`` =
  Σλ / λmax;
- an ESD histogram with log10-spaced bins.

How the eigenvalues are computed (see docs/spectral.md):

- dense (Linear, Embedding, HF Conv1D): the M x M Gram matrix WᵀW in
  float32 (float64 on a GPU, or when the float32 matmul precision is not
  "highest", because TF32 or bf16 Gram matrices lose small eigenvalues), then
  ``eigvalsh`` in float64. The cost is linear in the long side N, so a 50k-row
  embedding is computed exactly (WeightWatcher itself skips N > 50,000);
- conv weights (out, in, k...) are cut into the k-position slices of
  out x in, as WeightWatcher does, their eigenvalues pooled and, as
  WeightWatcher's default ``conv2d_norm`` does, halved;
- when the short side M exceeds ``max_dim`` (default 4096) a full
  eigendecomposition is too slow for a background pass: the top ``max_dim``
  eigenvalues come from a randomised SVD (``torch.svd_lowrank``) and the
  power law is fitted on them; ``log_norm`` and ``stable_rank`` still use the
  exact Σλ = ‖W‖²_F. ``method`` says "lowrank".

LoRA (peft-style modules with ``base_layer``, ``lora_A``, ``lora_B``,
``scaling``): the metrics are those of the merged W + B·A·scaling.

Which matrices of a model are analysed: :mod:`probes.spectral.matrices`; the
background pass during training: :mod:`probes.spectral.monitor`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from probes.protocol import messages, wire
from probes.rules.spectral import alpha_sigma, band, untrusted


#: WeightWatcher's EVALS_THRESH: eigenvalues at or below it are left out of the fit.
EVALS_THRESH = 1e-5
#: WeightWatcher's DEFAULT_MIN_EVALS: matrices with fewer eigenvalues are skipped.
MIN_EVALS = 8
#: WeightWatcher's SMALL_N_CUTOFF: below it the small-sample fit is used.
SMALL_N = 20
#: Elements of the candidate x tail matrix of the vectorised fit held at once.
_FIT_CHUNK = 1 << 22


# -- eigenvalues ------------------------------------------------------------------


def _gram_dtype(device: torch.device) -> torch.dtype:
    """float32 Gram matrices on a CPU with exact float32 matmuls, else float64."""
    if device.type == "cpu" and torch.get_float32_matmul_precision() == "highest":
        return torch.float32
    return torch.float64


def _slices(w: torch.Tensor) -> torch.Tensor:
    """The matrices of a weight as a batch [B, N, M] with N >= M.

    2-D weights are one matrix; conv weights (out, in, k1, k2...) are cut into
    one out x in matrix per kernel position (WeightWatcher's pooled conv).
    """
    w = w.detach()
    if w.dim() == 2:
        b = w.unsqueeze(0)
    else:
        b = w.reshape(w.shape[0], w.shape[1], -1).permute(2, 0, 1)
    if b.shape[1] < b.shape[2]:
        b = b.transpose(1, 2)
    return b


@dataclass
class Eigen:
    """Eigenvalues of WᵀW (ascending, float64, host) and how they were got."""

    evals: np.ndarray
    total: float  # Σλ over all eigenvalues (= ‖W‖²_F, exact even for "lowrank")
    method: str
    shape: tuple


def eigenvalues(w: torch.Tensor, *, max_dim: int = 4096, conv_norm: bool = True,
                generator: torch.Generator | None = None) -> Eigen:
    """Eigenvalues of WᵀW for a weight ``w`` (2-D, or a conv weight), on its device."""
    shape = tuple(w.shape)
    b = _slices(w)
    n_mats, _, m = b.shape
    conv = w.dim() > 2
    scale = 0.5 if conv and conv_norm else 1.0  # WeightWatcher scales conv W by sqrt(1/2)
    if m > max_dim and not conv:
        x = b[0].float()
        total = float((x.double() ** 2).sum()) * scale
        q = max_dim
        _, s, _ = torch.svd_lowrank(x, q=q, niter=4)
        evals = np.sort((s.double() ** 2).cpu().numpy())[-q:] * scale
        return Eigen(evals, total, "lowrank", shape)
    dt = _gram_dtype(b.device)
    x = b.to(dt)
    gram = x.transpose(1, 2) @ x  # [B, M, M]
    ev = torch.linalg.eigvalsh(gram.double()).clamp_min(0.0)
    evals = np.sort(ev.reshape(-1).cpu().numpy()) * scale
    return Eigen(evals, float(evals.sum()), "conv-slices" if conv else "exact", shape)


# -- the power-law fit --------------------------------------------------------------


@dataclass
class PowerLaw:
    """A continuous power-law fit of the ESD tail."""

    alpha: float | None
    xmin: float | None
    ks: float | None
    n_tail: int = 0


def _fit_standard(data: np.ndarray) -> PowerLaw:
    """WeightWatcher's WWFit.fit_power_law_standard, vectorised over xmin."""
    n_all = len(data)
    x = torch.from_numpy(data)
    logx = torch.log(x)
    suffix = torch.flip(torch.cumsum(torch.flip(logx, [0]), 0), [0])  # Σ_{j>=i} ln x_j
    idx = torch.arange(n_all - 1, dtype=torch.float64)
    n = n_all - idx
    with np.errstate(divide="ignore"):
        alphas = 1.0 + n / (suffix[:-1] - n * logx[:-1])
    ds = torch.ones(n_all - 1, dtype=torch.float64)
    rows = max(1, _FIT_CHUNK // n_all)
    for a in range(0, n_all - 1, rows):
        b = min(n_all - 1, a + rows)
        cand = torch.arange(a, b)
        j = torch.arange(a, n_all)
        al = alphas[a:b, None]
        # theoretical CDF 1 - (x_j/xmin)^(1-alpha) minus the empirical (j-i)/n, for j >= i
        fit = 1.0 - torch.exp((1.0 - al) * (logx[None, a:] - logx[a:b, None]))
        emp = (j[None, :] - cand[:, None]).to(torch.float64) / n[a:b, None]
        diff = (fit - emp).abs()
        diff = torch.where(j[None, :] >= cand[:, None], diff, torch.zeros((), dtype=torch.float64))
        d = diff.amax(1)
        ok = (al[:, 0] > 1) & torch.isfinite(al[:, 0])
        ds[a:b] = torch.where(ok, d, ds[a:b])
    i = int(torch.argmin(ds))
    return PowerLaw(float(alphas[i]), float(data[i]), float(ds[i]), n_all - i)


def _fit_small(data: np.ndarray, k_min: int = 8) -> PowerLaw:
    """WeightWatcher's fit for fewer than 20 eigenvalues, as weightwatcher 0.7.7 runs it.

    ``WWFit.fit_powerlaw_smallN`` computes bias-corrected alphas (n-1)/Σln
    for tails of at least ``k_min`` and picks xmin by D - 0.868/√n, but
    ``WWFit.__init__`` then re-picks xmin by the least KS distance D over the
    same candidates (D = 1 for those skipped), and that is what ``analyze()``
    reports; we reproduce the reported result.
    """
    n_all = len(data)
    logx = np.log(data)
    alphas = np.zeros(n_all - 1)
    ds = np.ones(n_all - 1)
    js = np.full(n_all - 1, np.inf)
    for i in range(n_all - 1):
        n = n_all - i
        if n < k_min:
            continue
        s = logx[i:].sum() - n * logx[i]
        if s <= 1e-12:
            continue
        alphas[i] = 1.0 + (n - 1.0) / s
        if alphas[i] <= 1.0:
            continue
        fit = 1.0 - (data[i:] / data[i]) ** (1.0 - alphas[i])
        ds[i] = float(np.max(np.abs(np.arange(n) / n - fit)))
        js[i] = ds[i] - 0.868 / math.sqrt(n)
    if not np.isfinite(js).any():  # WeightWatcher's fallback: the whole set as the tail
        s = logx.sum() - n_all * logx[0]
        if s <= 1e-12:
            return PowerLaw(None, None, None, 0)
        alphas[0] = 1.0 + (n_all - 1.0) / s
        fit = 1.0 - (data / data[0]) ** (1.0 - alphas[0])
        ds[0] = float(np.max(np.abs(np.arange(n_all) / n_all - fit)))
    i = int(np.argmin(ds))
    if alphas[i] <= 1.0:
        return PowerLaw(None, None, None, 0)
    return PowerLaw(float(alphas[i]), float(data[i]), float(ds[i]), n_all - i)


def fit_power_law(evals: np.ndarray, thresh: float = EVALS_THRESH) -> PowerLaw:
    """Fit the tail of the ESD (eigenvalues above ``thresh``) as WeightWatcher does."""
    data = np.sort(np.asarray(evals, dtype=np.float64))
    data = data[data > thresh]
    if len(data) < 2:
        return PowerLaw(None, None, None, len(data))
    fit = _fit_small(data) if len(data) < SMALL_N else _fit_standard(data)
    if fit.alpha is None or not math.isfinite(fit.alpha):
        return PowerLaw(None, None, None, 0)
    return fit


# -- metrics ----------------------------------------------------------------------


@dataclass
class Metrics:
    """WeightWatcher's metrics of one matrix (see the module docstring)."""

    name: str
    shape: tuple
    n_evals: int
    alpha: float | None
    alpha_weighted: float | None
    log_norm: float
    log_spectral_norm: float
    stable_rank: float
    lambda_max: float
    xmin: float | None
    ks: float | None
    n_tail: int
    method: str
    esd_lo: float
    esd_hi: float
    esd: list[int] = field(default_factory=list)
    seconds: float = 0.0
    #: The matrix's magnitude as a grid for the viewer's heatmap (see :func:`heat_grid`).
    heat_shape: tuple = ()
    heat: bytes = b""

    @property
    def warning(self) -> str:
        """WeightWatcher's label: "over-trained", "under-trained" or ""."""
        return band(self.alpha)

    @property
    def sigma(self) -> float | None:
        """Standard error of alpha, (alpha - 1) / sqrt(n_tail): WeightWatcher's ``sigma`` column."""
        return alpha_sigma(self.alpha, self.n_tail)

    def as_dict(self) -> dict:
        """Plain JSON-able fields (for layer_statistics.json)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("heat", "heat_shape")}
        d["shape"] = list(self.shape)
        d["warning"] = self.warning
        d["sigma"] = self.sigma
        d["untrusted"] = untrusted(self)
        return d

    def to_wire(self, step: int, rank: int, untrusted: str = "") -> wire.Spectral:
        """The :class:`probes.protocol.wire.Spectral` message of these metrics (``untrusted``: why the fit is not)."""
        return wire.Spectral(step=step, rank=rank, layer=self.name, alpha=self.alpha,
                             alpha_weighted=self.alpha_weighted, log_norm=self.log_norm,
                             log_spectral_norm=self.log_spectral_norm, stable_rank=self.stable_rank,
                             n_evals=self.n_evals, xmin=self.xmin, ks=self.ks, shape=list(self.shape),
                             esd_lo=self.esd_lo, esd_hi=self.esd_hi, esd=self.esd, method=self.method,
                             n_tail=self.n_tail, sigma=self.sigma, untrusted=untrusted,
                             heat_shape=list(self.heat_shape), heat=self.heat)


def esd_histogram(evals: np.ndarray, bins: int = 32, thresh: float = EVALS_THRESH) -> tuple[float, float, list[int]]:
    """Counts of the eigenvalues above ``thresh`` in ``bins`` log10-spaced bins.

    Returns (log10 of the lowest edge, log10 of the highest edge, counts).
    """
    pos = evals[evals > thresh]
    if not len(pos):
        return 0.0, 0.0, []
    lo, hi = float(np.log10(pos.min())), float(np.log10(pos.max()))
    if hi <= lo:
        hi = lo + 1e-6
    counts, _ = np.histogram(np.log10(pos), bins=bins, range=(lo, hi))
    return lo, hi, counts.astype(int).tolist()


def metrics_of(eig: Eigen, name: str = "", bins: int = 32) -> Metrics:
    """WeightWatcher's metrics from the eigenvalues ``eig``."""
    evals = eig.evals
    lmax = float(evals.max()) if len(evals) else 0.0
    total = eig.total
    fit = fit_power_law(evals)
    log_spec = math.log10(lmax) if lmax > 0 else -math.inf
    lo, hi, counts = esd_histogram(evals, bins)
    return Metrics(
        name=name, shape=eig.shape, n_evals=len(evals), alpha=fit.alpha,
        alpha_weighted=None if fit.alpha is None else fit.alpha * log_spec,
        log_norm=math.log10(total) if total > 0 else -math.inf, log_spectral_norm=log_spec,
        stable_rank=total / lmax if lmax > 0 else 0.0, lambda_max=lmax, xmin=fit.xmin, ks=fit.ks,
        n_tail=fit.n_tail, method=eig.method, esd_lo=lo, esd_hi=hi, esd=counts,
    )


def heat_grid(w: torch.Tensor, rows: int = messages.HEAT_MAX_ROWS, cols: int = messages.HEAT_MAX_COLS
              ) -> tuple[tuple[int, int], bytes]:
    """The matrix's magnitude on a grid of at most ``rows`` x ``cols`` cells, for the viewer's heatmap.

    Each cell is the RMS of its block of W (a conv weight as out x in*kh*kw),
    so a dead row or column, an outlier feature or a block of large weights
    shows even where many elements share one terminal cell; a plain strided
    pick would miss them. float16 little-endian (capped at its largest finite
    value; NaN stays NaN): 16 KiB for the largest grid.
    """
    w2 = w.detach().float().reshape(w.shape[0], -1)
    shape = (min(rows, w2.shape[0]), min(cols, w2.shape[1]))
    rms = torch.nn.functional.adaptive_avg_pool2d(w2.square()[None, None], shape)[0, 0].sqrt()
    return shape, rms.clamp(max=65504.0).to(torch.float16).cpu().numpy().astype("<f2").tobytes()


def analyze_matrix(w: torch.Tensor, name: str = "", *, max_dim: int = 4096, bins: int = 32) -> Metrics:
    """Eigenvalues, metrics and the heatmap grid of one weight (2-D or conv) in one call."""
    t0 = time.perf_counter()
    with torch.no_grad():
        m = metrics_of(eigenvalues(w, max_dim=max_dim), name, bins)
        m.heat_shape, m.heat = heat_grid(w)
    m.seconds = time.perf_counter() - t0
    return m
