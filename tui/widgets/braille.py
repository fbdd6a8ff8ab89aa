"""Line charts drawn in braille: 2 x 4 dots per terminal cell.

A pure function from series to Rich ``Text`` (no plotting library, no global
figure state): the y axis has 1-2-5 ticks in SI or exponent notation
(``2.5e-03``, ``12k``, never ``-0.000``), a log axis when asked (decades as
ticks), and the x range can be fixed so every chart on a screen covers the
same steps. Where two series share a cell, the later one's colour wins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text

#: Bit of each dot in a braille cell, by (column, row) within the cell.
_DOTS = {(0, 0): 0x01, (0, 1): 0x02, (0, 2): 0x04, (1, 0): 0x08,
         (1, 1): 0x10, (1, 2): 0x20, (0, 3): 0x40, (1, 3): 0x80}


@dataclass(frozen=True)
class Line:
    """One series to draw: its points and a Rich style."""

    x: tuple
    y: tuple
    style: Style | None = None


def fmt_tick(value: float, step: float = 0.0) -> str:
    """A tick label of at most 8 cells: ``0``, ``0.25``, ``12.5``, ``3.2k``, ``2.5e-03``.

    Values within a thousandth of a tick spacing of zero read ``0`` (no
    ``-0.000``); magnitudes from 0.01 to 9999 in plain digits (as few as
    the spacing needs), others in exponent notation.
    """
    if not math.isfinite(value):
        return str(value)
    if value == 0 or (step and abs(value) < abs(step) * 1e-3):
        return "0"
    mag = abs(value)
    if 1e-2 <= mag < 1e4:
        decimals = 0 if not step else max(0, min(4, -math.floor(math.log10(abs(step)) + 1e-9)))
        text = f"{value:.{decimals}f}"
        if "." in text:
            text = text.rstrip("0").rstrip(".")
        return text
    if 1e4 <= mag < 1e6:
        return f"{value / 1e3:.3g}k"
    return f"{value:.1e}".replace("e+0", "e+").replace(".0e", "e")


def step_ticks(xs: list, width: int) -> list[int]:
    """Whole-number ticks over ``xs`` at a 1-2-5 spacing, about one per 10 cells.

    Steps are counts: an axis of steps reads 0, 50, 100, never 53.3.
    """
    lo, hi = int(math.floor(min(xs))), int(math.ceil(max(xs)))
    if hi <= lo:
        return [lo]
    want = max(2, min(8, width // 10))
    raw = (hi - lo) / (want - 1)
    mag = 10 ** math.floor(math.log10(raw))
    # The finest 1-2-5 spacing that gives at most one tick more than wanted.
    gap = next((k * mag for k in (1, 2, 5, 10) if (hi - lo) / (k * mag) <= want), 10 * mag)
    gap = max(1, int(gap))
    first = -(-lo // gap) * gap
    return list(range(first, hi + 1, gap)) or [lo]


def nice_ticks(lo: float, hi: float, want: int) -> tuple[list[float], float]:
    """Ticks at a 1-2-5 spacing covering [lo, hi], about ``want`` of them; and the spacing."""
    if hi <= lo:
        return [lo], 0.0
    raw = (hi - lo) / max(want - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next((k * mag for k in (1, 2, 2.5, 5, 10) if k * mag >= raw), 10 * mag)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks, step


def chart(lines: list[Line], width: int, height: int, *, log_y: bool = False,
          xlim: tuple[float, float] | None = None, whole_x: bool = False,
          axis_style: Style | None = None) -> Text:
    """``lines`` drawn in ``width`` x ``height`` cells: y labels on the left, x labels below.

    Points that are not finite (or <= 0 with ``log_y``) are left out and
    break the line there. ``xlim`` fixes the x range (shared by the charts
    of one screen); ``whole_x`` makes the x ticks whole numbers (steps).
    """
    pts = [[(x, y) for x, y in zip(ln.x, ln.y)
            if y is not None and math.isfinite(y) and (not log_y or y > 0) and x is not None]
           for ln in lines]
    ys = [y for p in pts for _, y in p]
    xs = [x for p in pts for x, _ in p]
    if not ys:
        return Text(" nothing to draw", style="dim")
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    y_lo, y_hi = ty(min(ys)), ty(max(ys))
    if y_hi - y_lo < 1e-12 * max(abs(y_hi), 1.0):
        pad = abs(y_hi) * 0.1 if y_hi else 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    x_lo, x_hi = xlim if xlim is not None else (min(xs), max(xs))
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    plot_h = max(height - 1, 2)  # the last line: x tick labels
    if log_y:
        d_lo, d_hi = math.floor(y_lo), math.ceil(y_hi)
        every = max(1, math.ceil((d_hi - d_lo + 1) / max(plot_h // 2, 2)))
        yticks = [float(d) for d in range(d_lo, d_hi + 1, every) if y_lo - 1e-9 <= d <= y_hi + 1e-9]
        labels = [fmt_tick(10.0 ** d) for d in yticks]
        if len(yticks) < 2:  # less than a decade: the ends, in plain figures
            yticks, labels = [y_lo, y_hi], [fmt_tick(10 ** y_lo, 10 ** y_lo / 10), fmt_tick(10 ** y_hi, 10 ** y_hi / 10)]
    else:
        yticks, step = nice_ticks(y_lo, y_hi, max(2, min(6, plot_h // 2 + 1)))
        labels = [fmt_tick(v, step) for v in yticks]
    gutter = max(len(lb) for lb in labels) + 1
    plot_w = max(width - gutter, 4)
    W, H = plot_w * 2, plot_h * 4
    cells: dict[tuple[int, int], int] = {}
    owner: dict[tuple[int, int], int] = {}

    def px(x: float) -> float:
        return (x - x_lo) / (x_hi - x_lo) * (W - 1)

    def py(y: float) -> float:
        return (H - 1) - (ty(y) - y_lo) / (y_hi - y_lo) * (H - 1)

    for n in range(len(lines)):
        prev = None
        for x, y in zip(lines[n].x, lines[n].y):
            ok = y is not None and math.isfinite(y) and (not log_y or y > 0) and x is not None
            if not ok or x < x_lo or x > x_hi:
                prev = None  # a gap (NaN, or off the shared range) breaks the line
                continue
            cur = (px(x), py(y))
            seg = [cur] if prev is None else _segment(prev, cur)
            for fx, fy in seg:
                ix, iy = int(round(fx)), int(round(fy))
                if 0 <= ix < W and 0 <= iy < H:
                    key = (iy // 4, ix // 2)
                    cells[key] = cells.get(key, 0) | _DOTS[(ix % 2, iy % 4)]
                    owner[key] = n
            prev = cur
    # y tick rows: the text line each tick falls on
    tick_row = {}
    for v, lb in zip(yticks, labels):
        r = int(round((y_hi - v) / (y_hi - y_lo) * (plot_h - 1))) if y_hi > y_lo else 0
        tick_row.setdefault(min(max(r, 0), plot_h - 1), lb)
    out = Text(no_wrap=True, overflow="crop")
    for r in range(plot_h):
        lb = tick_row.get(r)
        out.append((lb or "").rjust(gutter - 1) + ("┤" if lb else "│"), style=axis_style)
        run_style, run = None, []
        for c in range(plot_w):
            bits = cells.get((r, c), 0)
            ch = chr(0x2800 + bits) if bits else " "
            st = lines[owner[(r, c)]].style if bits else None
            if st != run_style and run:
                out.append("".join(run), style=run_style)
                run = []
            run_style = st
            run.append(ch)
        if run:
            out.append("".join(run), style=run_style)
        out.append("\n")
    out.append_text(_x_axis(x_lo, x_hi, gutter, plot_w, whole_x, axis_style))
    return out


def _segment(a: tuple[float, float], b: tuple[float, float]) -> list[tuple[float, float]]:
    """Points every half dot from ``a`` to ``b`` (a line with no holes)."""
    n = int(max(abs(b[0] - a[0]), abs(b[1] - a[1])) * 2) + 1
    return [(a[0] + (b[0] - a[0]) * i / n, a[1] + (b[1] - a[1]) * i / n) for i in range(1, n + 1)]


def _x_axis(lo: float, hi: float, gutter: int, plot_w: int, whole: bool, style: Style | None) -> Text:
    """The x tick labels under the plot, each centred on its column where it fits."""
    want = max(2, min(8, plot_w // 10))
    if whole:

        ticks = step_ticks([lo, hi], plot_w)
        labels = [str(int(t)) for t in ticks]
    else:
        ticks, step = nice_ticks(lo, hi, want)
        labels = [fmt_tick(t, step) for t in ticks]
    line = [" "] * (gutter + plot_w)
    end = -1
    for t, lb in zip(ticks, labels):
        col = gutter + int(round((t - lo) / (hi - lo) * (plot_w * 2 - 1) / 2)) if hi > lo else gutter
        start = min(max(col - len(lb) // 2, gutter, end + 2), gutter + plot_w - len(lb))
        if start <= end + 1 or start < 0:
            continue
        line[start:start + len(lb)] = list(lb)
        end = start + len(lb) - 1
    return Text("".join(line), style=style, no_wrap=True, overflow="crop")
