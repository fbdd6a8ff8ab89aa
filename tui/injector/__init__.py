"""The injector of `xray-tui attach --pid PID` and `xray-tui detach PID`.

It loads the probe into a Python process that never imported it, the way
memray's ``attach`` and py-spy reach a running process:

1. check the target: it exists, is ours, runs Python, and can be traced
   (:mod:`tui.injector.checks`);
2. write a request (what to do, the attach options) into our run directory
   (:mod:`tui.injector.exchange`);
3. schedule a one-line stub in the target: with ``sys.remote_exec`` when this
   Python is 3.14+ and the target's version, else with the system debugger
   (gdb, or lldb) calling ``Py_AddPendingCall(PyRun_SimpleString, stub)``
   (:mod:`tui.injector.debugger`).
   The debugger only queues the call, it runs no Python itself: CPython runs
   pending calls in the main thread between bytecodes, where running Python
   code is safe (never in the middle of C code holding locks);
4. wait for the loader (:mod:`probes.inject.boot`) to write its status. A
   target busy in C code runs the call when it returns to Python; after
   ``--timeout`` the request is withdrawn, so the call does nothing when it
   finally runs (:mod:`tui.injector.exchange`).

Linux only (it reads ``/proc``). The command line around it is
:mod:`tui.commands.inject`.
"""


class InjectFailed(Exception):
    """A one-line reason the probe could not be loaded or removed (the CLI exits 2)."""
