"""``xray-tui attach --pid``: load the probe into a running Python process.

:mod:`~probes.inject.stub` builds the one line the debugger has the target
run (torch-free: the viewer builds it); that line executes
:mod:`~probes.inject.boot` (read as a file, never imported), which imports
:mod:`~probes.inject.loader` in the target to find the model and attach.
"""
