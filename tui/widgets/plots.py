"""Line charts drawn by plotext, shown as Rich text in a Textual widget.

plotext's figure is module-global state, so charts are built only on the
app's thread (:meth:`Chart.render`), one at a time. Series colours come
from the theme's meaning variables (``$xray-weight``, ``$xray-muted``, ...)
passed by name, never hard-coded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import plotext
from rich.text import Text
from textual.color import Color
from textual.widget import Widget


@dataclass(frozen=True)
class Series:
    """One line of a chart: x and y values, a legend label, a theme colour name."""

    x: tuple
    y: tuple
    label: str
    color: str = "xray-weight"


def build_chart(series: list[Series], width: int, height: int, *, title: str = "", log_y: bool = False,
                colors: dict[str, str] | None = None) -> str:
    """The plotext rendering of ``series`` as an ANSI string of ``height`` lines.

    Non-finite points are left out (and, with ``log_y``, values <= 0);
    ``colors`` maps theme variable names to colours (the app's CSS variables).
    """
    fig = plotext.figure
    fig.clear()
    plotext.terminal.limit(False, False)
    fig.plot_size(max(width, 10), max(height, 4))
    fig.theme("simple")
    if title:
        fig.title(title)
    drawn = 0
    for s in series:
        pts = [(x, y) for x, y in zip(s.x, s.y) if y is not None and math.isfinite(y) and (not log_y or y > 0)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        # An unknown variable falls back to the theme's foreground, never a fixed colour.
        colour = (colors or {}).get(s.color) or (colors or {}).get("foreground")
        marker = plotext.marker(pixel=plotext.pixel(foreground=Color.parse(colour).rgb)) if colour else None
        sig = fig.signal(list(xs), list(ys), marker=marker).lines()
        if s.label:
            sig.label(s.label)
        fig.draw(sig)
        drawn += 1
    if drawn and log_y:
        fig.ruler("y").scale("log")
    return fig.build().string()


class Chart(Widget):
    """A plotext chart that redraws itself at its widget's size."""

    DEFAULT_CSS = """
    Chart { height: 10; min-height: 6; background: $surface; color: $foreground; }
    """

    def __init__(self, *, title: str = "", log_y: bool = False, empty_text: str = "no data yet",
                 id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        self.log_y = log_y
        self.empty_text = empty_text
        self.series: list[Series] = []
        self._cache: tuple | None = None

    def show(self, series: list[Series], *, title: str | None = None, empty_text: str | None = None) -> None:
        """Replace the chart's lines (redraws on the next paint)."""
        self.series = series
        if title is not None:
            self.title = title
        if empty_text is not None:
            self.empty_text = empty_text
        self.refresh()

    def render(self) -> Text:
        """The chart, rebuilt only when its data, size or theme changed."""
        width, height = self.size.width, self.size.height
        if not any(len(s.y) for s in self.series):
            return Text(f" {self.title}\n {self.empty_text}", style="dim", no_wrap=True)
        key = (tuple(self.series), width, height, self.app.theme, self.title, self.log_y)
        if self._cache is None or self._cache[0] != key:
            ansi = build_chart(self.series, width, height, title=self.title, log_y=self.log_y,
                               colors=self.app.get_css_variables())
            text = Text.from_ansi(ansi, no_wrap=True)
            text.overflow = "crop"
            self._cache = (key, text)
        return self._cache[1]
