"""`xray-tui inspect`: offline statistics and pictures of a local causal-LM directory.

Loads a transformers model directory (GPT-2, LLaMA or anything
``AutoModelForCausalLM`` loads) from local files only, runs one forward and
backward pass on a text with the probe attached (so the statistics are the
live stream's, from :mod:`probes.engines.reduce`), computes the spectral metrics of
every weight matrix (:mod:`probes.spectral.analysis`), and writes into ``out``:

- ``layer_statistics.json``: one entry per (layer, kind), the export
  contract's statistics (README, ``xray-tui export``) plus a linear
  ``histogram`` with ``bins`` bins and, for weights, ``spectral``;
- ``weights/``, ``activations/``, ``gradients/``: an SVG histogram per tensor
  and, for matrices, an SVG heatmap (hand-written SVG, no matplotlib);
- ``inspection.xray``: the same as a recording (Hello, one Step, the
  Spectral messages, End), which ``xray-tui replay`` or ``--tui`` opens.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import json
import math
import re
import struct
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from probes.spectral import analysis as spectral
from probes.spectral import matrices
from probes.protocol import stats, wire

DEFAULT_TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
                "it was the age of foolishness.")
KIND_DIRS = {"weight": "weights", "act": "activations", "grad": "gradients"}
#: Files whose presence means the directory has its own tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model")
#: Largest heatmap side in cells; bigger matrices are block-averaged down to it.
HEATMAP_MAX = 128
#: Elements read for a picture's linear histogram (a strided sample above it).
PICTURE_SAMPLE = 1 << 20


class InspectError(Exception):
    """A model directory that cannot be inspected; the message is one line."""


@dataclass
class Options:
    """What `xray-tui inspect` computes and where it writes."""

    text: str = DEFAULT_TEXT
    layers: list[int] | None = None  # transformer block indices; None: all
    weights: bool = True
    activations: bool = True
    gradients: bool = True
    bins: int = 64
    device: str = "cpu"
    progress: bool = True
    max_dim: int = 4096
    plots: bool = True  # False: the JSON statistics and the recording only, no SVG
    heatmaps: bool = True  # False: histograms only
    heatmap_max_dim: int = HEATMAP_MAX  # largest heatmap side in cells
    eps: float = 0.05  # near-zero threshold (|x| < eps), also for dead units
    hist_scale: str = "linear"  # histogram bar heights: counts on a "linear" or "log" axis
    heatmap_pool: str = "max"  # "max": largest |x| per block (outliers stay); "mean": block means


@dataclass
class Report:
    """What was written."""

    out: Path
    json_path: Path
    recording: Path
    entries: int
    pictures: list[Path] = field(default_factory=list)
    loss: float | None = None
    notes: list[str] = field(default_factory=list)  # what was done instead of the expected


# -- loading --------------------------------------------------------------------------


def load(path: str, device: str = "cpu", notes: list[str] | None = None):
    """The model (and a tokenizer, or None) of a local causal-LM directory; what was done
    instead of the expected is appended to ``notes``."""
    p = Path(path)
    if not p.exists():
        raise InspectError(f"{path}: no such directory")
    if not p.is_dir():
        raise InspectError(f"{path}: not a directory (give a transformers model directory)")
    if not (p / "config.json").is_file():
        raise InspectError(f"{path}: not a transformers model directory (no config.json)")
    try:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError as exc:
        raise InspectError(f"inspect needs transformers ({exc}): pip install 'xray-tui[demo]'") from None
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise InspectError(f"{path}: unreadable config.json: {_one_line(exc)}") from None
    archs = list(getattr(config, "architectures", None) or [])
    causal = ("ForCausalLM", "LMHeadModel")
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not any(a.endswith(causal)
                                                                                        for a in archs)):
        what = archs[0] if archs else f"{config.model_type!r} model"
        raise InspectError(f"{path}: a {what} is not a causal language model (inspect loads "
                           "AutoModelForCausalLM directories: GPT-2, LLaMA, ...)")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as exc:
        raise InspectError(f"{path}: cannot load the model: {_one_line(exc)}") from None
    try:
        model.to(device)
    except Exception as exc:
        raise InspectError(f"device {device!r}: {_one_line(exc)}") from None
    tokenizer = None  # a bare checkpoint: the text's bytes become token ids
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            _note(notes, f"the tokenizer in {path} does not load ({_one_line(exc)})")
    else:
        _note(notes, f"no tokenizer in {path} ({', '.join(TOKENIZER_FILES)})")
    return model, tokenizer


def _note(notes: list[str] | None, text: str) -> None:
    if notes is not None:
        notes.append(text)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def token_ids(text: str, tokenizer, vocab_size: int, max_len: int | None = None, eos_id: int | None = None,
              notes: list[str] | None = None) -> torch.Tensor:
    """Token ids of ``text``: the tokenizer's, or its UTF-8 bytes modulo the vocabulary;
    a text of one token gets ``eos_id`` appended (as Visible-Distribution does: a loss needs
    two positions); cut to the model's ``max_len`` positions. Each of these is said in ``notes``."""
    ids = None
    if tokenizer is not None:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        if ids.numel() and int(ids.max()) >= vocab_size:
            _note(notes, f"the tokenizer gives ids up to {int(ids.max())}, beyond the model's vocabulary "
                         f"of {vocab_size}: not used")
            ids = None  # a tokenizer that does not fit this model
        if ids is not None and tokenizer.eos_token_id is not None:
            eos_id = tokenizer.eos_token_id
    if ids is None:
        ids = torch.tensor([[b % vocab_size for b in text.encode("utf-8")]], dtype=torch.long)
        _note(notes, f"the text was read as its {ids.shape[1]} UTF-8 bytes (modulo the vocabulary of "
                     f"{vocab_size}) as token ids")
    if ids.shape[1] == 1 and eos_id is not None and 0 <= eos_id < vocab_size:
        ids = torch.cat([ids, torch.tensor([[eos_id]], dtype=ids.dtype)], dim=1)
        _note(notes, f"the text gives one token: EOS (id {eos_id}) appended, so the loss has a target")
    if ids.shape[1] < 2:
        raise InspectError("the text must give at least 2 tokens (and the model names no EOS token to append)")
    if max_len and ids.shape[1] > max_len:
        _note(notes, f"the text's {ids.shape[1]} tokens were cut to the model's {max_len} positions")
        ids = ids[:, :max_len]
    return ids


# -- selection ------------------------------------------------------------------------------


def block_prefix(model: nn.Module) -> str | None:
    """The path of the model's list of transformer blocks (e.g. ``transformer.h``)."""
    best = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and any(True for _ in m[0].children()):
            if best is None or len(m) > best[1]:
                best = (name, len(m))
    return best[0] if best else None


def layer_patterns(model: nn.Module, layers: list[int] | None) -> list[str] | None:
    """Glob patterns of the module paths of blocks ``layers``; None for everything."""
    if layers is None:
        return None
    prefix = block_prefix(model)
    if prefix is None:
        raise InspectError("--layers: this model has no list of transformer blocks")
    n = len(model.get_submodule(prefix))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise InspectError(f"--layers {','.join(map(str, bad))}: the model has blocks 0..{n - 1}")
    return [p for i in layers for p in (f"{prefix}.{i}", f"{prefix}.{i}.*")]


def _selected(name: str, patterns: list[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatch(name, p) for p in patterns)


# -- pictures (hand-written SVG) -----------------------------------------------------------------


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "tensor"


def _fmt(v: float) -> str:
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
                         f'text-anchor="middle">{_fmt(t)}</text>')
        if self.x0 < 0 < self.x1:
            x = self.xpos(0.0)
            parts.append(f'<line x1="{x:.2f}" y1="{top}" x2="{x:.2f}" y2="{top + h}" stroke="#f38ba8" '
                         'stroke-dasharray="3,3"/>')
        n = len(self.edges) - 1
        parts += [f'<line class="axis" data-axis="x" x1="{left}" y1="{top + h}" x2="{left + w}" y2="{top + h}" '
                  f'stroke="{fg}"/>',
                  f'<line class="axis" data-axis="y" x1="{left}" y1="{top}" x2="{left}" y2="{top + h}" stroke="{fg}"/>',
                  f'<text class="xlabel" x="{left + w / 2}" y="{self.height - 8}" fill="{fg}" text-anchor="middle">'
                  f'value ({n} bins of {_fmt((self.x1 - self.x0) / max(n, 1))})</text>',
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
        parts.append(frame.bar(i, c, 'fill="#89b4fa"', f"[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {int(c)}"))
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
              f'min {_fmt(vmin)} max {_fmt(vmax)}</text>', "</svg>"]
    return "\n".join(parts)


def _as_matrix(x: torch.Tensor) -> torch.Tensor | None:
    """A 2-D view for the heatmap: matrices as they are, activations as (tokens, units),
    conv weights as (out, in x kernel)."""
    if x.dim() < 2:
        return None
    if x.dim() > 2 and x.shape[-1] < 16:  # a conv kernel: keep output channels as rows
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])


def linear_histogram(x: torch.Tensor, bins: int, vmin: float | None = None,
                     vmax: float | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """A linear histogram of the finite values of ``x`` on ``[vmin, vmax]`` (the whole
    tensor's min and max when given, so a value outside a sample still sets the range),
    counting every ``every``-th element above 1M elements: (edges, counts, every)."""
    f = x.detach().float().reshape(-1)
    every = 1
    if f.numel() > PICTURE_SAMPLE:
        every = math.ceil(f.numel() / PICTURE_SAMPLE) | 1
        f = f[::every]
    a = f.cpu().numpy()
    a = a[np.isfinite(a)]
    if not a.size:
        return np.array([0.0, 1.0]), np.zeros(1, dtype=np.int64), every
    lo = vmin if vmin is not None and math.isfinite(vmin) else float(a.min())
    hi = vmax if vmax is not None and math.isfinite(vmax) else float(a.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(a, bins=bins, range=(lo, hi))
    return edges, counts, every


def exact_quantiles(x: torch.Tensor, qs=stats.QUANTILES) -> dict[str, float]:
    """p05/p25/median/p75/p95 of the finite values of the whole tensor, exactly:
    numpy's default (linear) method, the order statistics found by partition on the
    float32 values and interpolated in float64. NaN for a tensor without finite values."""
    a = x.detach().float().reshape(-1).cpu().numpy()
    a = a[np.isfinite(a)]
    names = ("p05", "p25", "median", "p75", "p95")
    if not a.size:
        return dict.fromkeys(names, math.nan)
    pos = np.asarray(qs, dtype=np.float64) * (a.size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, a.size - 1)
    part = np.partition(a, np.unique(np.concatenate([lo, hi])))
    below, above = part[lo].astype(np.float64), part[hi].astype(np.float64)
    return dict(zip(names, (float(v) for v in below + (above - below) * (pos - lo))))


# -- the inspection ---------------------------------------------------------------------------


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), disable=not enabled, transient=True)


def check(opts: Options) -> None:
    """One-line errors for options out of range (before any model is loaded)."""
    if opts.bins < 1:
        raise InspectError(f"--bins must be >= 1, got {opts.bins}")
    if opts.heatmap_max_dim < 1:
        raise InspectError(f"--heatmap-max-dim must be >= 1, got {opts.heatmap_max_dim}")
    if opts.hist_scale not in ("linear", "log"):
        raise InspectError(f"--hist-scale must be linear or log, got {opts.hist_scale!r}")
    if opts.heatmap_pool not in POOLS:
        raise InspectError(f"--heatmap-pool must be max or mean, got {opts.heatmap_pool!r}")
    if not (math.isfinite(opts.eps) and opts.eps > 0):
        raise InspectError(f"--eps must be a finite number > 0, got {opts.eps}")


def inspect(path: str, out: str, opts: Options | None = None) -> Report:
    """Inspect the model directory ``path``; write statistics and pictures into ``out``."""
    from probes.capture.probe import attach

    opts = opts or Options()
    check(opts)
    notes: list[str] = []
    model, tokenizer = load(path, opts.device, notes)
    patterns = layer_patterns(model, opts.layers)
    outdir = Path(out)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for kind, sub in KIND_DIRS.items():
            if opts.plots and getattr(opts, {"weight": "weights", "act": "activations", "grad": "gradients"}[kind]):
                (outdir / sub).mkdir(exist_ok=True)
    except OSError as exc:
        raise InspectError(f"{out}: {exc.strerror or exc}") from None
    recording = outdir / "inspection.xray"
    if recording.exists():
        recording.unlink()  # an inspection's own output is replaced, not numbered

    cfg = model.config
    max_len = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    eos = getattr(cfg, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    ids = token_ids(opts.text, tokenizer, cfg.vocab_size, max_len, eos if isinstance(eos, int) else None,
                    notes).to(opts.device)
    for n in notes:  # said now, not only in the report: the pass below can take a while
        print(f"xray-tui: note: {n}", file=sys.stderr)
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(x, torch.Tensor) and x.is_floating_point() and name not in acts:
                acts[name] = x.detach()
        return hook

    model.train(False)  # no dropout: the statistics of the model as it is
    xr = attach(model, every=1, serve=False, log=str(recording), include=patterns,
                name=f"inspect {Path(path).name}", spectral_every=None, eps=opts.eps)
    handles = []
    try:
        if opts.activations:
            from probes.capture.selection import select_modules

            for name, module in select_modules(model, patterns):
                handles.append(module.register_forward_hook(keep(name)))
            handles += _hook_extra(model, patterns, xr, acts)
        try:
            with torch.enable_grad():
                loss = model(input_ids=ids, labels=ids).loss
                if opts.gradients:
                    loss.backward()
        except Exception as exc:  # a model this code cannot run: one line, not a traceback
            raise InspectError(f"{path}: the forward/backward pass failed: {_one_line(exc)}") from None
        params = [(n, p) for n, p in model.named_parameters() if _selected(n.rpartition(".")[0], patterns)]
        xr.step()  # one sampled step (step 0): weights, gradients and activations, reduced as live
        spec = _spectral(model, params, opts, xr) if opts.weights else {}
    finally:
        for h in handles:
            h.remove()
        xr.close()
    msgs, _ = wire.read_file(str(recording))
    step = next(m for m in msgs if isinstance(m, wire.Step))
    want = {"weight": opts.weights, "grad": opts.gradients, "act": opts.activations}
    tensors: dict[tuple[str, str], torch.Tensor] = {}
    for n, p in params:
        tensors[(n, "weight")] = p
        if p.grad is not None:
            tensors[(n, "grad")] = p.grad
    for n, x in acts.items():
        tensors[(n, "act")] = x
    entries, pictures = [], []
    samples = [s for s in step.samples if want.get(s.kind) and (s.layer, s.kind) in tensors]
    with _progress(opts.progress) as bar:
        task = bar.add_task("pictures", total=len(samples))
        for s in samples:
            entry = stats.export_dict(s, step.step, step.rank)
            x = tensors[(s.layer, s.kind)]
            entry.update(exact_quantiles(x))  # the whole tensor is here: exact, not from the histogram
            entry["quantiles"] = "exact"
            edges, counts, every = linear_histogram(x, opts.bins, entry["min"], entry["max"])
            entry["histogram"] = {"edges": edges.tolist(), "counts": counts.tolist(), "every": every}
            entry["shape"] = list(x.shape)
            if s.kind == "weight" and s.layer in spec:
                entry["spectral"] = spec[s.layer]
            entry["pictures"] = []
            entries.append(entry)  # cleaned of NaN/inf when written
            bar.advance(task)
            if not opts.plots:
                continue
            sub = outdir / KIND_DIRS[s.kind]
            stem = _safe(s.layer)
            hist_path = sub / f"{stem}.hist.svg"
            summary = {k: entry[k] for k in ("mean", "std", "min", "max")}
            hist_path.write_text(svg_histogram(edges, counts, f"{s.kind} {s.layer}", summary, opts.hist_scale,
                                               every=every))
            entry["pictures"].append(str(hist_path.relative_to(outdir)))
            pictures.append(hist_path)
            mat = _as_matrix(x) if opts.heatmaps else None
            if mat is not None:
                heat_path = sub / f"{stem}.heatmap.svg"
                heat_path.write_text(svg_heatmap(downsample(mat, opts.heatmap_max_dim, opts.heatmap_pool),
                                                 f"{s.kind} {s.layer}", tuple(x.shape), entry["min"], entry["max"],
                                                 opts.heatmap_pool,
                                                 ("token", "unit") if s.kind == "act" else ("row", "column")))
                entry["pictures"].append(str(heat_path.relative_to(outdir)))
                pictures.append(heat_path)
    doc = {
        "model": str(Path(path).resolve()),
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "text": opts.text,
        "tokens": int(ids.shape[1]),
        "token_ids": ids[0].tolist(),
        "notes": notes,
        "loss": float(loss.detach()),
        "layers": opts.layers,
        "spectral_skipped": [{"layer": n, "reason": r} for n, r in matrices.targets(model)[1]
                             if _selected(n.rpartition(".")[0], patterns)] if opts.weights else [],
        "entries": [_clean(e) for e in entries],
    }
    json_path = outdir / "layer_statistics.json"
    json_path.write_text(json.dumps(doc, indent=1))
    return Report(outdir, json_path, recording, len(entries), pictures, float(loss.detach()), notes)


#: Modules whose *input* is read as an activation of its own, ``<module path>.input``: the
#: attention context before the output projection (GPT-2 ``attn.c_proj``, LLaMA ``self_attn.o_proj``)
#: and the SwiGLU product act(gate) * up before ``mlp.down_proj``; no module outputs them.
INPUT_OF = ("attn.c_proj", "self_attn.o_proj", "mlp.down_proj")
#: Fused query/key/value projections split into ``<module path>.q`` / ``.k`` / ``.v`` (GPT-2's ``c_attn``).
FUSED_QKV = ("attn.c_attn",)


def _ends(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _hook_extra(model: nn.Module, patterns, xr, acts: dict) -> list:
    """Hooks that hand the probe module inputs and split q/k/v, under their own names."""
    def take(name: str, x) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point() and name not in acts:
            acts[name] = x.detach()
            xr._take_act(name, x)  # reduced with the step's other activations, and recorded

    def pre(name):
        return lambda module, inputs: take(f"{name}.input", inputs[0] if inputs else None)

    def qkv(name):
        def hook(module, inputs, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(x, torch.Tensor) and x.shape[-1] % 3 == 0:
                for part, t in zip("qkv", x.detach().chunk(3, dim=-1)):
                    take(f"{name}.{part}", t.contiguous())
        return hook

    handles = []
    for name, module in model.named_modules():
        if not _selected(name, patterns):
            continue
        if _ends(name, INPUT_OF):
            handles.append(module.register_forward_pre_hook(pre(name)))
        if _ends(name, FUSED_QKV):
            handles.append(module.register_forward_hook(qkv(name)))
    return handles


def _spectral(model, params, opts: Options, xr) -> dict[str, dict]:
    """Spectral metrics of the selected weight matrices, also sent to the recording."""
    chosen = {id(p) for _, p in params}
    tg = [t for t in matrices.targets(model)[0] if id(t.param) in chosen]
    out = {}
    with _progress(opts.progress) as bar:
        task = bar.add_task("spectral", total=len(tg))
        for t in tg:
            m = spectral.analyze_matrix(t.tensor(), t.name, max_dim=opts.max_dim)
            out[t.name] = m.as_dict()
            msg = m.to_wire(0, xr.rank)
            xr.publisher.submit(lambda msg=msg: msg)
            bar.advance(task)
    return out


def _clean(d):
    """JSON without NaN/inf (null instead), as the export contract writes them."""
    if isinstance(d, dict):
        return {k: _clean(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_clean(v) for v in d]
    if isinstance(d, float) and not math.isfinite(d):
        return None
    if isinstance(d, np.generic):
        return _clean(d.item())
    return d
