"""Desktop notifications through the terminal: OSC 9, OSC 777 and the bell, wrapped for tmux.

Terminals that show notifications read one of two escape sequences:
OSC 9 (``ESC ] 9 ; TEXT BEL``: iTerm2, WezTerm, Windows Terminal, kitty,
ghostty) and OSC 777 (``ESC ] 777 ; notify ; TITLE ; BODY BEL``: the VTE
terminals, foot, WezTerm, ghostty). Both are sent, then a bell: the fallback
for a terminal that knows neither, and what tmux's ``monitor-bell`` flags.
Inside tmux (``$TMUX`` set) each OSC is wrapped in tmux's passthrough
(``ESC P tmux ; ... ESC \\`` with every ESC doubled), which tmux 3.3+ hands
to the outer terminal when ``allow-passthrough`` is on; the bell is not
wrapped, so tmux sees it.

The text comes from the training process: control characters are removed
first (an ESC or BEL in an alert's message would end the sequence early and
start one of its own), and ``;``, which separates OSC 777's fields, becomes ``,``.
"""

from __future__ import annotations

from tui.notify import printable

ESC, BEL = "\x1b", "\x07"


def clean(text: str, limit: int = 200) -> str:
    """``text`` safe inside an OSC string: printable, one line, no ``;``, capped."""
    return printable(text, limit).replace(";", ",")


def osc9(text: str) -> str:
    """OSC 9: one line of notification text."""
    return f"{ESC}]9;{clean(text, 400)}{BEL}"


def osc777(title: str, body: str) -> str:
    """OSC 777 ``notify``: a title and a body."""
    return f"{ESC}]777;notify;{clean(title)};{clean(body, 400)}{BEL}"


def tmux_passthrough(seq: str) -> str:
    """``seq`` wrapped for tmux's passthrough: ``ESC P tmux ;`` + ``seq`` with each ESC doubled + ``ESC \\``."""
    return f"{ESC}Ptmux;{seq.replace(ESC, ESC + ESC)}{ESC}\\"


def sequence(title: str, body: str, *, tmux: bool, bell: bool = True) -> str:
    """What to write for one notification: OSC 9 and OSC 777 (tmux-wrapped inside tmux), then the bell."""
    oscs = [osc9(f"{title}: {body}"), osc777(title, body)]
    if tmux:
        oscs = [tmux_passthrough(s) for s in oscs]
    return "".join(oscs) + (BEL if bell else "")


def write_to_terminal(app, data: str) -> bool:
    """Write ``data`` to the terminal the app is running in; False where there is none (headless, tests).

    Textual has no public call for raw output; its own ``App.bell()`` and
    ``copy_to_clipboard()`` (OSC 52) write through the app's driver, whose
    writer thread is the one that paints: a sequence written there lands
    between two frames, never inside one. We do as they do, and only read
    the attribute, so nothing of Textual's is patched.
    """
    driver = getattr(app, "_driver", None)
    if driver is None or app.is_headless:
        return False
    driver.write(data)
    driver.flush()
    return True
