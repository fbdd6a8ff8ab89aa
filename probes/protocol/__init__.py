"""What crosses the socket and sits on disk: numpy and msgspec only, never torch.

:mod:`~probes.protocol.wire` (messages and frames), :mod:`~probes.protocol.histogram`
(the fixed log-spaced bins), :mod:`~probes.protocol.stats` (statistics derived
from a sample), :mod:`~probes.protocol.rundir` (where live runs announce
themselves). The viewer imports this package and nothing of the probe's.
"""
