"""Line charts in braille (:mod:`tui.widgets.braille`), shown as Rich text in a Textual widget.

Series colours come
from the theme's meaning variables (``$xray-weight``, ``$xray-muted``, ...)
passed by name, never hard-coded.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

from rich.style import Style
from rich.text import Text
from textual.color import Color
from textual.widget import Widget

from tui.widgets import braille


@dataclass(frozen=True)
class Series:
    """One line of a chart: x and y values, a legend label, a theme colour name."""

    x: tuple
    y: tuple
    label: str
    color: str = "xray-weight"


def build_chart(series: list[Series], width: int, height: int, *, log_y: bool = False,
                colors: dict[str, str] | None = None, xlim: tuple[float, float] | None = None) -> str:
    """The braille rendering of ``series`` as plain text of ``height`` lines (see :func:`chart_text`)."""
    return chart_text(series, width, height, log_y=log_y, colors=colors, xlim=xlim).plain


def chart_text(series: list[Series], width: int, height: int, *, log_y: bool = False,
               colors: dict[str, str] | None = None, xlim: tuple[float, float] | None = None) -> Text:
    """``series`` drawn in braille (:mod:`tui.widgets.braille`), ``height`` lines of ``width`` cells.

    Non-finite points are left out (and, with ``log_y``, values <= 0; see
    :func:`left_out`); ``colors`` maps theme variable names to colours (the
    app's CSS variables). No title and no legend: :class:`Chart` says both
    on a line of its own. When every x is a whole number (steps) the x ticks
    are whole numbers; ``xlim`` fixes the x range (one step range per screen).
    """
    lines = [braille.Line(s.x, s.y, _style(s.color, colors)) for s in series]
    whole = all(isinstance(x, int) for s in series for x in s.x)
    return braille.chart(lines, width, height, log_y=log_y, xlim=xlim, whole_x=whole,
                         axis_style=_style("xray-muted", colors))


def spans_decades(series: list[Series]) -> bool:
    """Whether the positive values of ``series`` span 100x or more (then a log axis reads better)."""
    vals = [y for s in series for y in s.y if y is not None and math.isfinite(y) and y > 0]
    neg = any(y is not None and math.isfinite(y) and y <= 0 for s in series for y in s.y)
    return bool(vals) and not neg and max(vals) / min(vals) >= 100


def _drawable(y, log_y: bool) -> bool:
    return y is not None and math.isfinite(y) and (not log_y or y > 0)


def _colour(name: str, colors: dict[str, str] | None) -> str | None:
    # An unknown variable falls back to the theme's foreground, never a fixed colour.
    return (colors or {}).get(name) or (colors or {}).get("foreground")


def _style(name: str, colors: dict[str, str] | None) -> Style:
    """A Rich style in the colour of theme variable ``name``."""
    colour = _colour(name, colors)
    return Style(color=Color.parse(colour).rich_color) if colour else Style()


def left_out(s: Series, log_y: bool = False, *, named: bool = True) -> str:
    """Why some of a series' points are not drawn ("" when all are).

    A chart that silently stops where the values went NaN reads as "the run
    stopped"; this says what happened, and from which step. ``named`` puts
    the series' label first (for a chart of several).
    """
    bad = [x for x, y in zip(s.x, s.y) if y is None or not math.isfinite(y)]
    low = [x for x, y in zip(s.x, s.y) if log_y and y is not None and math.isfinite(y) and y <= 0]
    whole = all(isinstance(x, int) for x in s.x)
    parts = []
    for xs, what in ((bad, "NaN/inf"), (low, "≤ 0 (log scale)")):
        if xs:
            where = f" from step {xs[0]}" if whole else ""
            parts.append(f"{s.label + ' ' if named else ''}{what}{where} ({len(xs)} of {len(s.x)}) not drawn")
    return "; ".join(parts)


class Chart(Widget):
    """A braille line chart that redraws itself at its widget's size.

    The first line holds the title and, for two or more series, a legend in
    the series' colours (``━ label``); a line under it says which points
    could not be drawn (NaN, inf, or <= 0 on a log scale), if any.
    """

    DEFAULT_CSS = """
    Chart { height: 10; min-height: 6; background: $surface; color: $foreground; }
    """

    def __init__(self, *, title: str = "", log_y: bool | None = False, empty_text: str = "no data yet",
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        #: True, False, or None: a log axis when the values span two decades or more.
        self.log_y_setting = log_y
        self.log_y = bool(log_y)
        #: The x range every chart of the screen shares (None: the series' own).
        self.xlim: tuple[float, float] | None = None
        self.empty_text = empty_text
        self.series: list[Series] = []
        self._cache: tuple | None = None

    def show(self, series: list[Series], *, title: str | None = None, empty_text: str | None = None,
             xlim: tuple[float, float] | None = None) -> None:
        """Replace the chart's lines (redraws on the next paint); ``xlim`` the screen's shared x range."""
        self.series = series
        self.xlim = xlim
        self.log_y = spans_decades(series) if self.log_y_setting is None else bool(self.log_y_setting)
        if title is not None:
            self.title = title
        if empty_text is not None:
            self.empty_text = empty_text
        self.refresh()

    def _heading(self, width: int, colors: dict[str, str]) -> list[Text]:
        """The title line (with the legend when it fits, else on a line of its own) and the notes."""
        title = Text(" " + self.title + (" · log scale" if self.log_y and "log" not in self.title else ""),
                     style="bold")
        legend = Text()
        if len(self.series) > 1:
            for s in self.series:
                legend.append("  ━ ", style=_style(s.color, colors))
                legend.append(s.label)
        lines = [title + legend] if title.cell_len + legend.cell_len <= width else [title, Text(" ") + legend]
        named = len(self.series) > 1
        notes = "; ".join(n for n in (left_out(s, self.log_y, named=named) for s in self.series) if n)
        if notes:
            lines.append(Text(" ✖ " + notes, style=_style("xray-critical", colors)))
        for line in lines:
            line.truncate(width, overflow="ellipsis")
            line.no_wrap = True
        return [line for line in lines if line.plain.strip()]

    def render(self) -> Text:
        """The chart, rebuilt only when its data, size or theme changed."""
        width, height = self.size.width, self.size.height
        if not any(len(s.y) for s in self.series):
            return Text(f" {self.title}\n" + _indented(self.empty_text, width), style="dim", no_wrap=True)
        key = (tuple(self.series), width, height, self.app.theme, self.title, self.log_y, self.xlim)
        if self._cache is None or self._cache[0] != key:
            colors = self.app.get_css_variables()
            heading = self._heading(width, colors)
            text = Text("\n").join(heading)
            if any(_drawable(y, self.log_y) for s in self.series for y in s.y):
                text.append("\n")
                text.append_text(chart_text(self.series, width, max(height - len(heading), 4), log_y=self.log_y,
                                            colors=colors, xlim=self.xlim))
            else:
                text.append("\n" + _indented(self.empty_text if not self.series else "nothing to draw", width),
                            style="dim")
            text.no_wrap = True
            text.overflow = "crop"
            self._cache = (key, text)
        return self._cache[1]


def _indented(message: str, width: int) -> str:
    """``message`` wrapped to the chart's width, every line one column in, as the title is
    (left to the terminal, a wrapped line started at column 0: "no spread" / "to draw")."""
    return "\n".join(" " + line for line in textwrap.wrap(message, max(width - 2, 8)) or [""])
