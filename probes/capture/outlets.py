"""Where a probe's messages go: the publisher (its socket and recording) and the whole-job view.

Set up once, at attach: :func:`start_job` (with torch.distributed, rank 0
merges every rank's statistics, :mod:`probes.distributed.job`) and
:func:`open_publisher`, which fills in ``log=``'s placeholders and says on
stderr where the run can be found.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from probes.capture.selection import Watched
from probes.distributed.job import Job, table_keys
from probes.protocol import rundir, wire
from probes.publish.publisher import Publisher

log = logging.getLogger("xray-tui")


def start_job(watched: Watched, lora_bases: dict[str, str], run: str, every: int, timeout: float,
              publish) -> Job | None:
    """The whole job's view (its own gloo group and thread), or None when it cannot be set up
    (each rank then serves its own). ``publish`` hands a builder to the publisher."""
    try:
        return Job(table_keys(watched.params, watched.trainable, [n for n, _ in watched.modules]),
                   publish, run, timeout=timeout,
                   replicated={n for n, p in watched.params if id(p) not in watched.sharded},
                   lora_bases=lora_bases, every=every)
    except Exception:
        log.exception("xray-tui: the whole-job view could not be set up; each rank serves its own")
        return None


def open_publisher(hello: wire.Hello, *, serve: bool, log: str | None, rules, tcp) -> Publisher:
    """The run's publisher (socket when ``serve``, recording at ``log=``, rules, TCP), announced on stderr."""
    run, rank, world = hello.run, hello.rank, hello.world_size
    path = log_path(log, run, rank, world)
    publisher = Publisher(hello, serve=serve, log_path=path, rules=rules, tcp=tcp if serve else None)
    say_where(run, rank, publisher, path, world)
    return publisher


def log_path(log: str | None, run: str, rank: int, world: int) -> str | None:
    """``log=`` with ``{name}``, ``{rank}`` and ``{time}`` filled in. With several ranks and
    no ``{rank}``, the ranks after the first to open the file get ``STEM-N.EXT`` (a file is
    never shared or overwritten), and each says so: :func:`say_where` asks for ``{rank}``."""
    if not log:
        return log
    values = {"name": rundir.safe_name(run), "rank": rank, "time": time.strftime("%Y%m%d-%H%M%S")}
    try:
        path = str(log).format(**values)
    except KeyError as exc:
        raise ValueError(f"log={log!r}: {{{exc.args[0]}}} is not a placeholder; "
                         "use {name}, {rank} or {time}") from None
    except (IndexError, ValueError):
        raise ValueError(f"log={log!r}: braces must hold {{name}}, {{rank}} or {{time}} "
                         "(write {{ and }} for literal ones)") from None
    return path


def say_where(run: str, rank: int, publisher, asked: str | None = None, world: int = 1) -> None:
    """One line at attach: the run's name, its socket and its recording (stderr, so that a
    person finds the recording later; ``XRAY_TUI_QUIET=1`` silences it)."""
    if os.environ.get("XRAY_TUI_QUIET"):
        return
    parts = [f"run {run!r}" + (f" rank {rank}" if rank else "")]
    if publisher.socket_path is not None:
        parts.append(f"socket {publisher.socket_path}")
    if publisher.recorder is not None:
        parts.append(f"recording {os.path.abspath(publisher.recorder.path)}")
        if asked is not None and os.path.abspath(asked) != os.path.abspath(publisher.recorder.path):
            parts.append(f"as {asked} was taken" + (" (put {rank} in log= to name each rank's file)"
                                                    if world > 1 else ""))
    print("xray-tui: " + ", ".join(parts), file=sys.stderr, flush=True)
