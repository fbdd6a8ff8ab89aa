"""xray-tui's Textual themes: colours by meaning, never hard-coded in widgets.

Widgets refer to ``$xray-ok``, ``$xray-warning``, ``$xray-critical``,
``$xray-dead``, ``$xray-weight``, ``$xray-grad``, ``$xray-act`` and
``$xray-muted`` in their CSS. Each theme here sets them; :data:`DEFAULTS`
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
    "xray-muted": "#7a7f87",
    "xray-cursor": "#2a3a55",
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
        "xray-muted": "#6b7079",
        "xray-cursor": "#cfdcf0",
    },
)

#: Every theme this package provides, by name.
THEMES: dict[str, Theme] = {t.name: t for t in (XRAY_DARK, XRAY_LIGHT)}
DEFAULT_THEME = XRAY_DARK.name


def register(app) -> None:
    """Register every xray theme with a Textual ``App``."""
    for theme in THEMES.values():
        app.register_theme(theme)
