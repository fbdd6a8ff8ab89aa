"""The one line the injector has the target run: torch-free, so the viewer can build it.

It executes :mod:`probes.inject.boot` (read as a file, never imported) in the
target, which then imports :mod:`probes.inject.loader` there.
"""

from __future__ import annotations

from pathlib import Path

#: the loader the stub executes in the target (see :mod:`probes.inject.boot`)
BOOT = Path(__file__).resolve().parent / "boot.py"


def stub(request: Path) -> str:
    """The Python line the injector has the target run: execute the loader with the request, never raise.

    It runs in the target's ``__main__`` (where ``PyRun_SimpleString`` runs), so it
    reads no name a script may have taken there (nanoGPT's ``train.py`` has a
    ``compile = True``): builtins come from ``__import__('builtins')``, and its
    one bound name is ours. The loader runs with a fresh globals dict, so
    nothing else lands in ``__main__``. An exception is written next to the
    request (``.failed``) for the injector, never raised: one escaping a
    pending call would surface in the training loop."""
    globs = {"__name__": "__xray_tui_boot__", "REQUEST": str(request)}
    boot, failed = str(BOOT), f"{request}.failed"
    return ("try:(lambda b:b.exec(b.compile(b.open(%r).read(),%r,'exec'),%r))(__import__('builtins'))\n"
            "except BaseException as __xray_tui_error__:\n"
            " try:(lambda b,e:b.open(%r,'w').write(b.type(e).__name__+': '+b.str(e)))"
            "(__import__('builtins'),__xray_tui_error__)\n"
            " except BaseException:pass\n" % (boot, boot, globs, failed))
