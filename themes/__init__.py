"""xray-tui's Textual themes: colours by meaning, never hard-coded in widgets.

Widgets refer to ``$xray-ok``, ``$xray-warning``, ``$xray-critical``,
``$xray-dead``, ``$xray-info``, ``$xray-weight``, ``$xray-grad``,
``$xray-act``, ``$xray-update``, ``$xray-muted``, ``$xray-cursor`` and the
heatmap ramp ``$xray-heat-low`` / ``$xray-heat-mid`` / ``$xray-heat-high``
in their CSS. Each theme here sets them; :data:`DEFAULTS`
gives a value for every one so that Textual's built-in themes (which know
nothing of them) still parse (see :meth:`XRayApp.get_theme_variable_defaults`).
"""

from __future__ import annotations

from pathlib import Path

from textual.theme import Theme

#: The stylesheet the app loads (listed as package data in pyproject.toml).
CSS_PATH = Path(__file__).with_name("xray.tcss")

#: Fallbacks for every xray variable, used under themes that do not set them.
DEFAULTS: dict[str, str] = {
    "xray-ok": "#4ebf71",
    "xray-warning": "#ffa62b",
    "xray-critical": "#ff4d5e",
    "xray-dead": "#8a7fd1",
    "xray-info": "#5fafd7",
    "xray-weight": "#6fb3ff",
    "xray-grad": "#ffb45c",
    "xray-act": "#7ed99a",
    "xray-update": "#d28ce6",
    "xray-muted": "#7a7f87",
    "xray-cursor": "#2a3a55",
    "xray-heat-low": "#1b2233",
    "xray-heat-mid": "#2f7fb8",
    "xray-heat-high": "#ffe08a",
}

XRAY_DARK = Theme(
    name="xray-dark",
    primary="#4c8dff",
    secondary="#2d5ea8",
    accent="#ffa62b",
    warning="#ffa62b",
    error="#ff4d5e",
    success="#4ebf71",
    foreground="#d8dee9",
    background="#11151c",
    surface="#181d26",
    panel="#222a36",
    dark=True,
    variables=dict(DEFAULTS),
)

XRAY_LIGHT = Theme(
    name="xray-light",
    primary="#1f5fbf",
    secondary="#3a6ea5",
    accent="#b35900",
    warning="#b36b00",
    error="#c4122f",
    success="#1e7b3a",
    foreground="#1d232b",
    background="#f7f7f4",
    surface="#ecedea",
    panel="#dfe3e8",
    dark=False,
    variables={
        "xray-ok": "#1e7b3a",
        "xray-warning": "#b36b00",
        "xray-critical": "#c4122f",
        "xray-dead": "#5b3fa8",
        "xray-info": "#1f6d99",
        "xray-weight": "#1f5fbf",
        "xray-grad": "#b35900",
        "xray-act": "#1e7b3a",
        "xray-update": "#8a3fa8",
        "xray-muted": "#6b7079",
        "xray-cursor": "#cfdcf0",
        "xray-heat-low": "#e6e9ee",
        "xray-heat-mid": "#5c8fd6",
        "xray-heat-high": "#15306b",
    },
)

#: Pure colours on black, for low-quality terminals, projectors and low vision.
XRAY_HIGH_CONTRAST = Theme(
    name="xray-high-contrast",
    primary="#ffff00",
    secondary="#00ffff",
    accent="#ffff00",
    warning="#ffff00",
    error="#ff3030",
    success="#00ff00",
    foreground="#ffffff",
    background="#000000",
    surface="#000000",
    panel="#202020",
    dark=True,
    variables={
        "xray-ok": "#00ff00",
        "xray-warning": "#ffff00",
        "xray-critical": "#ff3030",
        "xray-dead": "#ff80ff",
        "xray-info": "#00ffff",
        "xray-weight": "#00ffff",
        "xray-grad": "#ffff00",
        "xray-act": "#00ff00",
        "xray-update": "#ff80ff",
        "xray-muted": "#c0c0c0",
        "xray-cursor": "#0000c0",
        "xray-heat-low": "#000000",
        "xray-heat-mid": "#00a0ff",
        "xray-heat-high": "#ffffff",
    },
)

#: Okabe-Ito colours (safe for deuteranopia, protanopia and tritanopia):
#: blue for ok, orange for warning, vermillion for critical, never red vs
#: green; the heat ramp runs dark blue to yellow (viridis-like). Badges carry
#: a symbol and a word as well, so no state is told by colour alone.
XRAY_COLORBLIND = Theme(
    name="xray-colorblind",
    primary="#56b4e9",
    secondary="#0072b2",
    accent="#e69f00",
    warning="#e69f00",
    error="#d55e00",
    success="#0072b2",
    foreground="#e8e8e8",
    background="#101418",
    surface="#161b21",
    panel="#232a33",
    dark=True,
    variables={
        "xray-ok": "#56b4e9",
        "xray-warning": "#e69f00",
        "xray-critical": "#d55e00",
        "xray-dead": "#cc79a7",
        "xray-info": "#56b4e9",
        "xray-weight": "#56b4e9",
        "xray-grad": "#e69f00",
        "xray-act": "#f0e442",
        "xray-update": "#cc79a7",
        "xray-muted": "#8c8c8c",
        "xray-cursor": "#263d55",
        "xray-heat-low": "#1f1446",
        "xray-heat-mid": "#21918c",
        "xray-heat-high": "#fde725",
    },
)

#: Every theme this package provides, by name.
THEMES: dict[str, Theme] = {t.name: t for t in (XRAY_DARK, XRAY_LIGHT, XRAY_HIGH_CONTRAST, XRAY_COLORBLIND)}
DEFAULT_THEME = XRAY_DARK.name


def known() -> list[str]:
    """Every theme name the app accepts, sorted: Textual's built-in themes and this package's
    (what ``--theme`` is checked against before any work starts, as the app itself checks it)."""
    from textual.theme import BUILTIN_THEMES

    return sorted({*BUILTIN_THEMES, *THEMES})


def register(app) -> None:
    """Register every xray theme with a Textual ``App``."""
    for theme in THEMES.values():
        app.register_theme(theme)


def next_theme(current: str) -> str:
    """The xray theme after ``current`` (cycling; a foreign theme goes to the first)."""
    names = list(THEMES)
    if current not in names:
        return names[0]
    return names[(names.index(current) + 1) % len(names)]
