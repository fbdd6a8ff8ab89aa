"""The `S` screenshot: where it is written, fonts every machine has, and a toast that names it.

Textual's SVG (Rich's template) asks for Fira Code from a CDN and falls back to
``monospace`` alone: offline, or in a viewer that fetches nothing, the picture
a user sends a colleague came out in a proportional font or with empty boxes
for the braille sparklines. :func:`local_fonts` drops the network fonts and
names monospace fonts that machines have, led by DejaVu Sans Mono (it carries
braille), so the SVG looks like the terminal wherever it is opened.
"""

from __future__ import annotations

import os
import re
import time

#: The environment variable naming the directory screenshots go to (default: the working directory).
ENV = "XRAY_TUI_SCREENSHOTS"

#: Monospace fonts. DejaVu Sans Mono first: Linux machines have it, it carries braille, and some
#: renderers (cairosvg) take the first family alone, so a list led by Fira Code came out in a
#: proportional sans wherever Fira Code was missing. Browsers go on down the list, glyph by glyph.
FONTS = ('"DejaVu Sans Mono", "Fira Code", Menlo, Consolas, "Liberation Mono", "Noto Sans Mono", '
         '"Noto Sans Symbols 2", "Apple Braille", "Segoe UI Symbol", monospace')

_FONT_FACE = re.compile(r"\s*@font-face\s*\{[^}]*\}", re.S)
_MATRIX_FONT = re.compile(r"font-family:\s*Fira Code,\s*monospace;")


def directory(given: str | None = None) -> str:
    """Where a screenshot goes: ``given`` (the app's own setting), else ``$XRAY_TUI_SCREENSHOTS``,
    else the working directory."""
    return given or os.environ.get(ENV) or os.getcwd()


def local_fonts(svg: str) -> str:
    """``svg`` without its network @font-face rules, its text in fonts machines have."""
    return _MATRIX_FONT.sub(f"font-family: {FONTS};", _FONT_FACE.sub("", svg))


def save(app, where: str | None = None) -> str:
    """Write the app's screen as an SVG into :func:`directory` (created if needed); its absolute path.

    The name is short (``xray-tui_20261207-131234.svg``, ``-2``... when taken) so that the toast
    holds it on one line at 80 columns; Textual's own (title, time to the microsecond) did not."""
    folder = os.path.abspath(os.path.expanduser(directory(where)))
    os.makedirs(folder, exist_ok=True)
    stem = f"xray-tui_{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = os.path.join(folder, stem + ".svg"), 1
    while os.path.exists(path):
        n += 1
        path = os.path.join(folder, f"{stem}-{n}.svg")
    with open(path, "w", encoding="utf-8") as f:
        f.write(local_fonts(app.export_screenshot()))
    return path


def fold_path(path: str, width: int) -> str:
    """``path`` on lines of at most ``width`` characters, broken after a ``/`` (a toast wraps
    words, and a path is one long word: it was split mid-name)."""
    width = max(width, 8)
    lines, line = [], ""
    for part in re.findall(r"[^/]*/|[^/]+$", path):
        while len(part) > width:  # a single name longer than the line: cut it, nothing better
            if line:
                lines.append(line)
                line = ""
            lines.append(part[:width])
            part = part[width:]
        if len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    if line:
        lines.append(line)
    return "\n".join(lines)


def toast_width(screen_width: int) -> int:
    """Characters a Textual toast's line holds on a screen this wide (60 cells or half the
    screen, less its padding and border)."""
    return min(60, screen_width // 2) - 3
