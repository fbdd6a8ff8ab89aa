"""``xray-tui attach --pid``: load the probe into a running Python process.

:mod:`~probes.inject.boot` is the code the debugger's stub runs in the
target (read as a file, never imported); :mod:`~probes.inject.loader` is what
it imports there to find the model and attach.
"""
