"""The work `xray-tui attach --pid` / `xray-tui detach` does inside the target process.

:mod:`probes.inject.boot` calls :func:`handle` in the target's main thread,
between bytecodes, with the injector's request. Attaching finds what to
watch (or evaluates ``--model`` / ``--optimizer`` in the target's
``__main__``), calls :func:`probes.attach` and keeps the probe here, so that
a second injection finds it instead of attaching twice and a detach can
close it: its hooks removed, its publisher thread joined, the paths the
loader put on ``sys.path`` taken off again.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys

#: the probe this module attached (one per process), and the sys.path entries the loader added
_probe = None
_added_paths: list[str] = []


class InjectError(Exception):
    """A one-line reason the request could not be done; the injector prints it."""


def note_added_paths(paths: list[str]) -> None:
    """Remember sys.path entries the loader added, to remove them on detach."""
    _added_paths.extend(p for p in paths if p not in _added_paths)


def handle(req: dict) -> dict:
    """Do ``req["action"]`` (``attach`` or ``detach``); returns the status fields for the injector."""
    if req.get("action") == "detach":
        return detach()
    return attach(req)


def attach(req: dict) -> dict:
    """Attach a probe as asked, or report the one already here."""
    from probes.publish import lifecycle

    global _probe
    if _probe is not None and not _probe.closed:
        return {"run": _probe.run, "already": "injected"}
    with lifecycle._lock:
        mine = [p for p in lifecycle._open if not getattr(p, "_closed", True)]
    if mine:  # the script attached one itself: watch that one rather than hook the model twice
        return {"run": mine[0].run, "already": "attached by the script"}
    model, optimizer = _choose(req.get("model"), req.get("optimizer"))
    kwargs = {k: req[k] for k in ("every", "name", "log") if req.get(k) is not None}
    import probes

    with _run_dir(req.get("run_dir")):
        try:
            _probe = probes.attach(model, optimizer, **kwargs)
        except ValueError as exc:
            raise InjectError(str(exc)) from None
        except ImportError as exc:  # numpy, which torch itself can do without
            raise InjectError(f"the target cannot import {exc.name or exc}: {sys.executable} -m pip install "
                              f"{exc.name or 'xray-tui'} (its environment)") from None
    return {"run": _probe.run, "model": _describe(model), "optimizer": _describe(optimizer)}


def detach() -> dict:
    """Close the injected probe: hooks removed, threads joined, the loader's paths taken off sys.path."""
    global _probe
    probe, _probe = _probe, None
    if probe is None or probe.closed:
        from probes.publish import lifecycle

        if lifecycle._open:  # the script's own: its code holds it, so it is not ours to take away
            raise InjectError(f"the probe here (run {lifecycle._open[0].run}) was attached by the script "
                              "itself; detach removes only a probe that attach --pid loaded")
        raise InjectError("no probe injected by xray-tui is attached in this process")
    probe.note("detached", by="xray-tui detach")
    probe.close("stopped")
    from probes.engines import cpu_kernel

    builder = cpu_kernel._builder
    if builder is not None and builder.is_alive():  # the one-off build of the C kernel (a compiler run)
        builder.join(10.0)  # seconds at most, and only on a detach right after the first attach
    for p in _added_paths:
        with contextlib.suppress(ValueError):
            sys.path.remove(p)
    _added_paths.clear()
    return {"run": probe.run, "detached": True}


@contextlib.contextmanager
def _run_dir(viewer_dir: str | None):
    """The viewer's run directory while the probe opens its socket, so `xray-tui ls` finds it even
    when the target's environment points elsewhere (another XDG_RUNTIME_DIR); restored after."""
    from probes.protocol import rundir

    if not viewer_dir or str(rundir.run_dir()) == viewer_dir:
        yield
        return
    before = os.environ.get("XRAY_TUI_RUN_DIR")
    os.environ["XRAY_TUI_RUN_DIR"] = viewer_dir
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("XRAY_TUI_RUN_DIR", None)
        else:
            os.environ["XRAY_TUI_RUN_DIR"] = before


def _main_names() -> dict[int, str]:
    """id -> name of the target's ``__main__`` globals, to describe objects as the user knows them."""
    main = sys.modules.get("__main__")
    return {id(v): k for k, v in vars(main).items() if not k.startswith("__")} if main else {}


def _describe(obj, names: dict[int, str] | None = None) -> str:
    if obj is None:
        return "none"
    names = _main_names() if names is None else names
    kind = type(obj).__name__
    name = names.get(id(obj))
    try:
        size = f", {sum(p.numel() for p in obj.parameters()):,} parameters" if hasattr(obj, "parameters") else ""
    except Exception:  # noqa: BLE001 - only a description
        size = ""
    return f"{name} ({kind}{size})" if name else f"a {kind}{size}"


def _evaluate(expr: str, flag: str, want: type):
    main = sys.modules.get("__main__")
    try:
        value = eval(expr, vars(main) if main else {})  # noqa: S307 - the user's own expression, in their own process
    except Exception as exc:  # noqa: BLE001 - told to the user
        raise InjectError(f"{flag} {expr!r}: {type(exc).__name__}: {exc} (evaluated in the target's __main__)") \
            from None
    if not isinstance(value, want):
        raise InjectError(f"{flag} {expr!r} is a {type(value).__name__}, not a {want.__module__}.{want.__qualname__}")
    return value


def _live(kind: type) -> list:
    # type() rather than isinstance: an object's __class__ property could run code or raise
    return [o for o in gc.get_objects() if issubclass(type(o), kind)]


def _roots(modules: list) -> list:
    """The modules no other live module holds as a child."""
    children = {id(c) for m in modules for c in m._modules.values() if c is not None}
    return [m for m in modules if id(m) not in children]


def _root_of(optimizer, roots: list):
    """The root module holding the optimizer's parameters (the largest when several hold some)."""
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    best, best_key = None, (0, 0)
    for m in roots:
        params = list(m.parameters())
        key = (sum(id(p) in held for p in params), sum(p.numel() for p in params))
        if key[0] and key > best_key:
            best, best_key = m, key
    return best


def _choose(model_expr: str | None, optimizer_expr: str | None):
    """(model, optimizer): the ones named, else the live optimizer and the root module it trains."""
    import torch
    from torch import nn

    model = _evaluate(model_expr, "--model", nn.Module) if model_expr else None
    optimizer = _evaluate(optimizer_expr, "--optimizer", torch.optim.Optimizer) if optimizer_expr else None
    names = _main_names()
    modules = _live(nn.Module)
    roots = [model] if model is not None else _roots(modules)
    if optimizer is None:
        optimizers = _live(torch.optim.Optimizer)
        pairs = [(o, _root_of(o, roots)) for o in optimizers]
        pairs = [(o, m) for o, m in pairs if m is not None]
        if not pairs:
            found = ", ".join(_describe(m, names) for m in _roots(modules)[:5]) or "no nn.Module"
            what = f"no optimizer {'training --model' if model is not None else 'holding a model'}'s parameters"
            raise InjectError(f"{what} (found: {len(optimizers)} optimizer(s); {found}); "
                              "name them with --model EXPR --optimizer EXPR")
        if len(pairs) > 1:
            listed = "; ".join(f"{_describe(o, names)} training {_describe(m, names)}" for o, m in pairs[:5])
            raise InjectError(f"{len(pairs)} optimizers found ({listed}); choose one with --optimizer EXPR")
        optimizer, found_model = pairs[0]
        model = model or found_model
    elif model is None:
        model = _root_of(optimizer, roots)
        if model is None:
            raise InjectError(f"no nn.Module holds the parameters of --optimizer {optimizer_expr!r}; "
                              "name it with --model EXPR")
    return model, optimizer
