"""Hand-written SVG pictures (histograms, heatmaps) and the PNG inside a heatmap: no matplotlib."""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib

import numpy as np
import torch



def fmt(v: float) -> str:
    return f"{v:.3g}"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) inside [lo, hi], about ``n`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(n, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi * (1 + 1e-12) + 1e-300:
        v = first + k * step
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        k += 1
    return ticks


class HistogramFrame:
    """What every histogram picture shares: the title, a y axis of counts per bin (linear, or
    log10(1 + count) with ``scale="log"``) with grid lines, the x axis of values with its ticks
    and a dashed line at 0, and the labels. Bars are ``<rect class="bar" data-count=...>`` and
    tick labels carry ``data-value``, so a picture can be checked by parsing it."""

    left, right, top, bottom = 64, 14, 30, 46
    fg, dim = "#cdd6f4", "#a6adc8"

    def __init__(self, edges, cmax: float, title: str, scale: str = "linear", width: int = 560,
                 height: int = 300, every: int = 1) -> None:
        if scale not in ("linear", "log"):
            raise ValueError(f"scale must be linear or log, got {scale!r}")
        self.edges, self.title, self.scale, self.every = edges, title, scale, every
        self.width, self.height = width, height
        self.w, self.h = width - self.left - self.right, height - self.top - self.bottom
        if scale == "linear":
            self.yticks = nice_ticks(0.0, max(cmax, 1.0))
            if self.yticks[-1] < cmax:
                self.yticks.append(self.yticks[-1] + (self.yticks[1] - self.yticks[0]))
            self._ytop = self.yticks[-1]
        else:
            decades = max(1, math.ceil(math.log10(1.0 + max(cmax, 1.0))))
            self.yticks = [0.0] + [10.0**k for k in range(decades + 1)]
            self._ytop = math.log10(1.0 + self.yticks[-1])
        self.x0, self.x1 = float(edges[0]), float(edges[-1])

    def ypos(self, c: float) -> float:
        """A count's bar height in pixels."""
        return self.h * (c if self.scale == "linear" else math.log10(1.0 + c)) / self._ytop

    def xpos(self, v: float) -> float:
        """A value's x in pixels."""
        x0, x1 = self.x0, self.x1
        return self.left + self.w * (v - x0) / (x1 - x0) if x1 > x0 else self.left + self.w / 2

    def head(self) -> list[str]:
        """The SVG's opening, background, title, grid lines and y tick labels."""
        left, top, w, h = self.left, self.top, self.w, self.h
        parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.width}" height="{self.height}" '
                 f'viewBox="0 0 {self.width} {self.height}" font-family="monospace" font-size="11">',
                 f'<rect width="{self.width}" height="{self.height}" fill="#1e1e2e"/>',
                 f'<text x="{left}" y="18" fill="{self.fg}">{html.escape(self.title)}</text>']
        for t in self.yticks:
            y = top + h - self.ypos(t)
            parts.append(f'<line x1="{left}" y1="{y:.2f}" x2="{left + w}" y2="{y:.2f}" stroke="#313244"/>')
            parts.append(f'<text class="ytick" data-value="{t:g}" x="{left - 5}" y="{y + 4:.2f}" fill="{self.dim}" '
                         f'text-anchor="end">{_count_label(t)}</text>')
        return parts

    def bar(self, i: int, c: float, attrs: str, tip: str, series: str = "") -> str:
        """Bin ``i``'s bar of count ``c`` (``attrs``: its fill and stroke; ``tip``: its tooltip)."""
        bh = self.ypos(c)
        xa, xb = self.xpos(self.edges[i]), self.xpos(self.edges[i + 1])
        data = f'data-series="{series}" ' if series else ""
        return (f'<rect class="bar" {data}data-count="{int(c)}" x="{xa:.2f}" y="{self.top + self.h - bh:.2f}" '
                f'width="{max(xb - xa - 0.5, 0.5):.2f}" height="{bh:.2f}" {attrs}><title>{html.escape(tip)}'
                '</title></rect>')

    def axes(self) -> list[str]:
        """x ticks, the line at 0, both axes and their labels."""
        left, top, w, h, fg, dim = self.left, self.top, self.w, self.h, self.fg, self.dim
        parts = []
        for t in nice_ticks(self.x0, self.x1):
            x = self.xpos(t)
            parts.append(f'<line x1="{x:.2f}" y1="{top + h}" x2="{x:.2f}" y2="{top + h + 4}" stroke="{dim}"/>')
            parts.append(f'<text class="xtick" data-value="{t!r}" x="{x:.2f}" y="{top + h + 16}" fill="{dim}" '
                         f'text-anchor="middle">{fmt(t)}</text>')
        if self.x0 < 0 < self.x1:
            x = self.xpos(0.0)
            parts.append(f'<line x1="{x:.2f}" y1="{top}" x2="{x:.2f}" y2="{top + h}" stroke="#f38ba8" '
                         'stroke-dasharray="3,3"/>')
        n = len(self.edges) - 1
        parts += [f'<line class="axis" data-axis="x" x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" '
                  f'stroke="{fg}"/>',
                  f'<line class="axis" data-axis="y" x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="{fg}"/>',
                  f'<text class="xlabel" x="{left + w / 2}" y="{self.height - 8}" fill="{fg}" text-anchor="middle">'
                  f'value ({n} bins of {fmt((self.x1 - self.x0) / max(n, 1))})</text>',
                  f'<text class="ylabel" x="14" y="{top + h / 2}" fill="{fg}" text-anchor="middle" '
                  f'transform="rotate(-90 14 {top + h / 2})">{_ylabel(self.scale, self.every)}</text>']
        return parts


def svg_histogram(edges: np.ndarray, counts: np.ndarray, title: str, summary: dict | None = None,
                  scale: str = "linear", width: int = 560, height: int = 300, every: int = 1) -> str:
    """An SVG histogram with axes: bar heights are counts per bin (``scale="log"``: on a
    log10(1 + count) axis), the x axis the value, and a box of mean/std/min/max (``summary``);
    ``every > 1``: the counts are of every ``every``-th element, and the y label says so.

    Bars are ``<rect class="bar" data-count=...>`` and tick labels carry ``data-value``, so the
    picture can be checked by parsing it."""
    counts = np.asarray(counts, dtype=np.float64)
    frame = HistogramFrame(edges, float(counts.max()) if counts.size else 0.0, title, scale, width, height, every)
    parts = frame.head()
    for i, c in enumerate(counts):
        parts.append(frame.bar(i, c, 'fill="#89b4fa"', f"[{fmt(edges[i])}, {fmt(edges[i + 1])}): {int(c)}"))
    parts += frame.axes()
    left, top, w, fg = frame.left, frame.top, frame.w, frame.fg
    if summary:
        rows = [(k, summary.get(k)) for k in ("mean", "std", "min", "max") if summary.get(k) is not None]
        bx, by = left + w - 128, top + 6
        parts.append(f'<rect class="summary" x="{bx}" y="{by}" width="122" height="{14 * len(rows) + 8}" '
                     f'fill="#181825" stroke="#585b70" opacity="0.9"/>')
        for j, (k, v) in enumerate(rows):
            parts.append(f'<text class="stat" data-name="{k}" data-value="{float(v)!r}" x="{bx + 6}" '
                         f'y="{by + 16 + 14 * j}" fill="{fg}">{k:<5}{float(v): .4g}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _ylabel(scale: str, every: int = 1) -> str:
    text = "count per bin" + (f", 1 in {every} elements" if every > 1 else "")
    return text + (" (log scale)" if scale == "log" else "")


def _count_label(c: float) -> str:
    return f"{c:.0f}" if c == int(c) and c < 1e6 else f"{c:.3g}"


def _png(rgb: np.ndarray) -> bytes:
    """A PNG file of an [H, W, 3] uint8 image (zlib and CRC by hand: no imaging library)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[i].tobytes() for i in range(h))  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


def colours(m: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Diverging colours: blue (negative), dark (0), red (positive), linear in x / ``scale``
    (default: the largest finite |value|), clipped at full colour; non-finite cells yellow.
    Returns [H, W, 3] uint8."""
    finite = np.isfinite(m)
    if scale is None:
        scale = float(np.abs(m[finite]).max()) if finite.any() else 0.0
    v = np.clip(np.where(finite, m, 0.0) / (scale or 1.0), -1.0, 1.0)
    base = np.array([30, 30, 46], dtype=np.float64)
    pos, neg = np.array([243, 139, 168.0]), np.array([137, 180, 250.0])
    a = np.abs(v)[..., None]
    rgb = base + (np.where(v[..., None] > 0, pos, neg) - base) * a
    rgb[~finite] = (249, 226, 175)
    return rgb.round().astype(np.uint8)


#: Largest heatmap side in cells; bigger matrices are block-averaged down to it.
HEATMAP_MAX = 128
POOLS = ("max", "mean")


def downsample(x: torch.Tensor, max_side: int = HEATMAP_MAX, pool: str = "max") -> np.ndarray:
    """Pool a 2-D tensor (on its device) so that neither side exceeds ``max_side``.

    ``pool="max"``: each cell holds the block's element of largest magnitude, sign kept, so
    an outlier stays visible at its true value; ``"mean"``: the block mean. Blocks are
    adaptive pooling's: rows ``floor(i*H/h)`` to ``ceil((i+1)*H/h)``."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    rows, cols = x.shape
    x = x.detach().float()
    if rows > max_side or cols > max_side:
        size = (min(rows, max_side), min(cols, max_side))
        if pool == "mean":
            x = torch.nn.functional.adaptive_avg_pool2d(x[None, None], size)[0, 0]
        else:
            finite = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)  # a NaN would win every block
            _, idx = torch.nn.functional.adaptive_max_pool2d(finite.abs()[None, None], size, return_indices=True)
            x = x.reshape(-1)[idx.reshape(-1)].reshape(size)
    return x.cpu().numpy().astype(np.float64)


def svg_heatmap(m: np.ndarray, title: str, shape: tuple, vmin: float | None = None, vmax: float | None = None,
                pool: str = "max", axes: tuple[str, str] = ("row", "column")) -> str:
    """An SVG heatmap of a (pooled) matrix: a pixelated PNG image inside an SVG, with row and
    column axes in the tensor's own indices and a colour bar whose ends are the true
    -|x|max and +|x|max (``vmin``/``vmax``: the whole tensor's; default the picture's), with
    the true min and max marked on it."""
    rows, cols = m.shape
    finite = m[np.isfinite(m)]
    if vmin is None or not math.isfinite(vmin):
        vmin = float(finite.min()) if finite.size else 0.0
    if vmax is None or not math.isfinite(vmax):
        vmax = float(finite.max()) if finite.size else 0.0
    scale = max(abs(vmin), abs(vmax))
    cell = max(1, min(8, 384 // max(rows, cols)))
    left, top, bottom = 58, 30, 44
    iw, ih = cols * cell, rows * cell
    bar_x = left + iw + 16
    width, height = max(bar_x + 90, 360), top + max(ih, 120) + bottom
    bh = max(ih, 120)
    fg, dim = "#cdd6f4", "#a6adc8"
    data = base64.b64encode(_png(colours(m, scale))).decode("ascii")
    ramp = np.linspace(scale, -scale, 256)[:, None]  # top: +scale, bottom: -scale
    bar = base64.b64encode(_png(colours(ramp, scale))).decode("ascii")
    full_rows = shape[0] if len(shape) == 2 else int(np.prod(shape[:-1]))
    full_cols = shape[-1] if len(shape) == 2 else int(np.prod(shape)) // max(full_rows, 1)

    def ybar(v):
        return top + bh * (scale - v) / (2 * scale) if scale > 0 else top + bh / 2

    how = {"max": "largest |x| per block", "mean": "block means"}[pool]
    pooled = f"pooled to {rows}x{cols}, {how}" if (rows, cols) != (full_rows, full_cols) else "every element"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="#1e1e2e"/>',
        f'<text x="10" y="18" fill="{fg}">{html.escape(title)}</text>',
        f'<image x="{left}" y="{top}" width="{iw}" height="{ih}" preserveAspectRatio="none" '
        f'style="image-rendering:pixelated" href="data:image/png;base64,{data}"/>',
        f'<line class="axis" data-axis="x" x1="{left}" y1="{top + ih}" x2="{left + iw}" y2="{top + ih}" '
        f'stroke="{fg}"/>',
        f'<line class="axis" data-axis="y" x1="{left}" y1="{top}" x2="{left}" y2="{top + ih}" stroke="{fg}"/>',
        f'<text class="ytick" data-value="0" x="{left - 4}" y="{top + 9}" fill="{dim}" text-anchor="end">0</text>',
        f'<text class="ytick" data-value="{full_rows - 1}" x="{left - 4}" y="{top + ih}" fill="{dim}" '
        f'text-anchor="end">{full_rows - 1}</text>',
        f'<text class="xtick" data-value="0" x="{left}" y="{top + ih + 13}" fill="{dim}">0</text>',
        f'<text class="xtick" data-value="{full_cols - 1}" x="{left + iw}" y="{top + ih + 13}" fill="{dim}" '
        f'text-anchor="end">{full_cols - 1}</text>',
        f'<text class="ylabel" x="14" y="{top + ih / 2}" fill="{fg}" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ih / 2})">{html.escape(axes[0])}</text>',
        f'<text class="xlabel" x="{left + iw / 2}" y="{top + ih + 26}" fill="{fg}" text-anchor="middle">'
        f'{html.escape(axes[1])}</text>',
        f'<image class="colourbar" x="{bar_x}" y="{top}" width="12" height="{bh}" preserveAspectRatio="none" '
        f'href="data:image/png;base64,{bar}"/>',
    ]
    for v in (scale, 0.0, -scale):
        parts.append(f'<text class="cbar-tick" data-value="{v!r}" x="{bar_x + 16}" y="{ybar(v) + 4:.2f}" '
                     f'fill="{dim}">{v: .3g}</text>')
    for name, v in (("min", vmin), ("max", vmax)):
        y = ybar(v)
        parts.append(f'<line class="cbar-mark" data-name="{name}" data-value="{v!r}" x1="{bar_x - 4}" y1="{y:.2f}" '
                     f'x2="{bar_x + 12}" y2="{y:.2f}" stroke="{fg}"/>')
    parts += [f'<text class="caption" x="10" y="{height - 8}" fill="{dim}">{"x".join(map(str, shape))}; {pooled}; '
              f'min {fmt(vmin)} max {fmt(vmax)}</text>', "</svg>"]
    return "\n".join(parts)
