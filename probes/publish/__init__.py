"""Getting samples out of the training process without slowing it.

:mod:`~probes.publish.publisher` queues, records and serves them to viewers
through :mod:`~probes.publish.viewers` (connections, requests),
:mod:`~probes.publish.endpoints` (sockets, token, manifest),
:mod:`~probes.publish.handshake` and :mod:`~probes.publish.recorder`;
:mod:`~probes.publish.lifecycle` says how a run ended. Torch-free: the
viewer uses the recorder and the handshake too.
"""
