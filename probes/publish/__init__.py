"""Getting samples out of the training process without slowing it.

:mod:`~probes.publish.server` queues, records and serves them to viewers;
:mod:`~probes.publish.lifecycle` says how a run ended. Torch-free: the
viewer uses the recorder and the handshake too.
"""
