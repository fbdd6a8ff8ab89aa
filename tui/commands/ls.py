"""``xray-tui ls``: the live runs of this user, as a table or JSON lines."""

from __future__ import annotations

import json
import time

from probes.protocol import rundir
from tui.commands.errors import EXIT_OK, CliError


def cmd_ls(args) -> int:
    """List live runs (removing stale entries of dead processes)."""
    try:
        runs = rundir.live_runs()
    except rundir.RunDirError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        for r in runs:
            print(json.dumps(r.as_json()))
        return EXIT_OK
    if not runs:
        print(f"no live runs in {rundir.run_dir()}")
        return EXIT_OK
    # RANKS: ranks serving here / the job's world size; NODES: hosts of the job (rank 0 knows them)
    print(f"{'NAME':<24} {'PID':>8} {'RANKS':>6} {'NODES':>5}  {'STARTED':<19}  COMMAND")
    for r in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.ranks[0].started))
        ranks = f"{len(r.ranks)}/{r.ranks[0].world_size}"
        nodes = max(m.nodes for m in r.ranks)
        print(f"{r.name:<24} {r.pid:>8} {ranks:>6} {nodes:>5}  {started:<19}  {' '.join(r.ranks[0].argv)[:60]}")
        logs = [m.log for m in r.ranks if m.log]
        if logs:  # where to replay it from later
            more = f" (+{len(logs) - 1} more ranks)" if len(logs) > 1 else ""
            print(f"{'':<24} recording: {logs[0]}{more}")
    return EXIT_OK
