"""The loader `xray-tui attach --pid` runs inside a process that never imported the probe.

This file is executed (never imported) by a one-line stub that the injector
schedules in the target with ``Py_AddPendingCall`` (through gdb or lldb) or
``sys.remote_exec`` (Python 3.14+), so it runs in the target's main thread
at a safe point between bytecodes. The stub gives it ``REQUEST``: the path
of a JSON request file in the viewer's run directory.

It uses the standard library only, because ``probes`` may not be importable
yet: it first claims the request by renaming it (the injector withdraws a
request it gave up on by deleting it, so a late loader does nothing), then
makes ``probes`` importable (the target's own install, else the viewer's
package directories when the Python versions match), hands the request to
:func:`probes.inject.loader.handle` and writes what happened to the status file the
injector waits for. Nothing here may raise: an exception escaping a pending
call would surface in the training loop as a SystemError.
"""


def _boot(request_path):
    import json
    import os
    import sys

    taken = request_path + ".taken"
    try:
        os.rename(request_path, taken)  # claim it; fails when the injector withdrew it
    except OSError:
        return
    try:
        with open(taken) as f:
            req = json.load(f)
    finally:
        try:
            os.unlink(taken)
        except OSError:
            pass

    def say(**status):
        status.setdefault("pid", os.getpid())
        tmp = req["status"] + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(status, f)
        os.replace(tmp, req["status"])  # atomic: the injector never reads half a status

    say(state="working")  # the loader runs: the injector stops counting time spent in C
    try:
        inject = _import_inject(req, sys)
    except _Refused as exc:
        say(state="error", error=str(exc))
        return
    except BaseException as exc:  # noqa: BLE001 - e.g. a broken install: told, not raised
        say(state="error", error=f"{type(exc).__name__} while importing xray-tui: {exc}")
        return
    try:
        say(state="done", **inject.handle(req))
    except inject.InjectError as exc:
        say(state="error", error=str(exc))
    except BaseException as exc:  # noqa: BLE001 - reported to the injector, never raised in the target
        say(state="error", error=f"{type(exc).__name__} while loading the probe: {exc}")


class _Refused(Exception):
    pass


def _import_inject(req, sys):
    """``probes.inject.loader``: the target's own xray-tui, else the viewer's package directories."""
    import importlib.util

    target = "%d.%d" % sys.version_info[:2]
    how = f"{sys.executable} -m pip install xray-tui (its environment, Python {target})"
    if "torch" not in sys.modules:  # looked up, not imported: loading torch into a process is no small change
        raise _Refused("the target has not imported torch: nothing for the probe to watch")
    try:
        from probes.inject import loader as inject
        return inject
    except ImportError:
        pass
    if "probes" in sys.modules:  # an older xray-tui (or another package called probes) is installed there
        where = getattr(sys.modules["probes"], "__file__", "?")
        raise _Refused(f"the target's 'probes' ({where}) has no attach support: "
                       f"upgrade it with {how.replace('install', 'install -U', 1)}")
    if req.get("python") != target:
        raise _Refused(f"the target (Python {target}) cannot import xray-tui, and this viewer's copy is for "
                       f"Python {req.get('python')}: {how}")
    added = []
    for name, folder in req.get("paths", {}).items():  # folder holds just a link to that package
        if importlib.util.find_spec(name) is None and folder not in sys.path:
            sys.path.append(folder)  # appended: the target's own packages keep winning
            added.append(folder)
    try:
        from probes.inject import loader as inject
    except ImportError as exc:
        for folder in added:
            sys.path.remove(folder)
        raise _Refused(f"the target cannot import xray-tui ({exc}): {how}") from None
    inject.note_added_paths(added)  # detach takes them off sys.path again
    return inject


_boot(REQUEST)  # noqa: F821 - given by the stub
