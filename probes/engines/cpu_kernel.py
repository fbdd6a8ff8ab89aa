"""The probe's one-pass CPU kernel: ``cpu_kernel.c``, compiled in the background and cached.

On the CPU, torch reads a tensor about eleven times to build one statistics
row (sums, norms, min/max, the near-zero and zero counts, x^3 and x^4), and
that, not the launches, is what a sampled step costs (docs/benchmarks.md).
The C kernel reads each float once, with every accumulator in registers, and
counts the histogram sample in the same pass, block by block.

It is plain C with no torch headers, built in a background thread when a
probe attaches (:func:`ready`), with the system's C compiler (``$CC`` or
``cc``) in well under a second into
``$XDG_CACHE_HOME/xray-tui`` (``~/.cache/xray-tui``), keyed by a hash of the
source, the compiler and the flags, and loaded with ctypes, which lets go of
the GIL while it runs. A cache directory that is not ours alone is not
trusted with a shared library: the build then goes to a private temporary
directory. Without a compiler, or with ``XRAY_TUI_CPU_KERNEL=0``, the probe
uses the torch path (the same statistics, slower), saying so once at info
level on the ``xray-tui`` logger.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger("xray-tui")

SOURCE = Path(__file__).with_name("cpu_kernel.c")
#: -fopenmp-simd: the loops' ``omp simd`` pragmas vectorise; no OpenMP runtime is linked.
FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared"]
NROW = 14
_ptr = ctypes.c_void_p

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_done = threading.Event()  # load() has finished, with or without a library
_builder: threading.Thread | None = None
_start = threading.Lock()


def _cache_dir() -> Path | None:
    """Our private cache directory, or None when there is none we can trust."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = Path(root) / "xray-tui"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return None
    private = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022
    return path if private else None


def _build(cc: str, out_dir: Path) -> Path:
    """Compile the kernel into ``out_dir`` (atomically: concurrent ranks may build at once)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = out_dir / f"cpu_kernel-{key}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def ready() -> ctypes.CDLL | None:
    """The kernel library if it is built; else None, starting the build in a background thread
    the first time. Never waits: a training step must not wait for a compiler (the probe uses
    torch's ops until the library is there)."""
    global _builder
    if _done.is_set():
        return _lib
    with _start:  # not _lock, which the build holds while the compiler runs
        if _builder is None:
            _builder = threading.Thread(target=load, name="xray-tui-kernel-build", daemon=True)
            _builder.start()
    return None


def load() -> ctypes.CDLL | None:
    """The kernel library, built now if need be (waits); None where it cannot be had (logged once)."""
    if _lib is not None:
        return _lib  # every kernel call asks, every step: no lock nor event once it is loaded
    try:
        return _load()
    finally:
        _done.set()


def _load() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("XRAY_TUI_CPU_KERNEL", "1") == "0":
            log.info("xray-tui: CPU kernel off (XRAY_TUI_CPU_KERNEL=0): statistics use torch")
            return None
        cc = shutil.which(os.environ.get("CC") or "cc")
        if cc is None:
            log.info("xray-tui: no C compiler found: CPU statistics use torch (slower; set CC to enable the kernel)")
            return None
        try:
            out_dir = _cache_dir() or Path(tempfile.mkdtemp(prefix="xray-tui-kernel-"))
            lib = ctypes.CDLL(str(_build(cc, out_dir)))
            lib.xray_reduce.argtypes = [ctypes.c_int64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_float,
                                        ctypes.c_int, _ptr, ctypes.c_int64, _ptr, _ptr]
            lib.xray_reduce.restype = ctypes.c_int
            lib.xray_gather.argtypes = [ctypes.c_int64, _ptr, _ptr, _ptr, _ptr]
            lib.xray_gather.restype = None
            lib.xray_runs_gather.argtypes = [ctypes.c_int64, _ptr, _ptr, _ptr, _ptr, _ptr]
            lib.xray_runs_gather.restype = None
            lib.xray_signals.argtypes = [ctypes.c_int64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_double,
                                         _ptr]
            lib.xray_signals.restype = None
            if lib.xray_nrow() != NROW:
                raise RuntimeError("row layout differs from probes/engines/layout.py")
            _lib = lib
        except Exception as e:  # any failure leaves the (correct, slower) torch path
            log.info("xray-tui: CPU kernel unavailable (%s): statistics use torch", e)
        return _lib


def _call(lib, flats, plans, units, eps: float, shift: int, code_bins: np.ndarray, rows: np.ndarray,
          hists: np.ndarray, idx: list[int], errors: list[BaseException]) -> None:
    try:
        _run(lib, flats, plans, units, eps, shift, code_bins, rows, hists, idx)
    except BaseException as e:  # re-raised by the calling thread
        errors.append(e)


def _run(lib, flats, plans, units, eps: float, shift: int, code_bins: np.ndarray, rows: np.ndarray,
         hists: np.ndarray, idx: list[int]) -> None:
    """The kernel over ``flats[i] for i in idx``, writing rows[i] and hists[i] in place."""
    if not idx:
        return
    ptrs = np.array([flats[i].data_ptr() for i in idx], dtype=np.uint64)
    numels = np.array([flats[i].numel() for i in idx], dtype=np.int64)
    off, stride, k = np.array([plans[i] for i in idx], dtype=np.int64).reshape(len(idx), 3).T.copy()
    cols = np.array([units[i] for i in idx], dtype=np.int64)
    slots = np.array(idx, dtype=np.int64)
    if lib.xray_reduce(len(idx), ptrs.ctypes.data, numels.ctypes.data, off.ctypes.data, stride.ctypes.data,
                       k.ctypes.data, cols.ctypes.data, slots.ctypes.data, eps, shift, code_bins.ctypes.data,
                       hists.shape[1], rows.ctypes.data, hists.ctypes.data):
        raise MemoryError("the CPU kernel could not allocate its scratch counters")


def reduce(flats: list[torch.Tensor], plans: list[tuple[int, int, int]], eps: float, shift: int,
           code_bins: np.ndarray, threads: int, units: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[m, NROW]`` (float64) and histograms ``[m, code_bins.max() + 1]`` (int64) of contiguous
    float32 CPU tensors.

    ``plans[i] = (offset, stride, k)`` picks the histogram sample
    ``flats[i][offset::stride][:k]`` (k < 2**32); each sampled float is
    counted in bin ``code_bins[code]`` of its code, the top ``32 - shift``
    bits. ``units[i] > 0`` asks for the share of dead units of ``flats[i]``
    seen as rows of that many units (the last column; NaN otherwise). The
    tensors are shared among ``threads`` threads (largest first, each to the
    least loaded), which run the kernel without the GIL.
    """
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernel is not available")
    if code_bins.dtype != np.int32 or code_bins.shape != (1 << (32 - shift),) or not code_bins.flags.c_contiguous:
        raise ValueError("code_bins must be a contiguous int32 array with one bin per code")
    m = len(flats)
    units = units or [0] * m
    rows = np.empty((m, NROW), dtype=np.float64)
    hists = np.empty((m, int(code_bins.max()) + 1), dtype=np.int64)
    groups: list[list[int]] = [[] for _ in range(max(1, min(threads, m)))]
    loads = [0] * len(groups)
    for i in sorted(range(m), key=lambda i: -flats[i].numel()):
        g = loads.index(min(loads))
        groups[g].append(i)
        loads[g] += flats[i].numel() + 4096  # a small tensor still costs a call's bookkeeping
    errors: list[BaseException] = []
    args = (lib, flats, plans, units, eps, shift, code_bins, rows, hists)
    workers = [threading.Thread(target=_call, args=(*args, g, errors), daemon=True) for g in groups[1:] if g]
    for w in workers:
        w.start()
    _call(*args, groups[0], errors)
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return rows, hists


def gather(flats: list[torch.Tensor], indices: list[torch.Tensor | None]) -> torch.Tensor:
    """``torch.cat([f if i is None else f[i] for f, i in zip(flats, indices)])`` in one call, for
    contiguous flat float32 CPU tensors and int64 index tensors (in range: they are not checked)."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernel is not available")
    counts = np.array([f.numel() if i is None else i.numel() for f, i in zip(flats, indices)], dtype=np.int64)
    out = torch.empty(int(counts.sum()), dtype=torch.float32)
    ptrs = np.array([f.data_ptr() for f in flats], dtype=np.uint64)
    idx = np.array([0 if i is None else i.data_ptr() for i in indices], dtype=np.uint64)
    lib.xray_gather(len(flats), ptrs.ctypes.data, idx.ctypes.data, counts.ctypes.data, out.data_ptr())
    return out


def _table(tensors: list[torch.Tensor]) -> np.ndarray:
    return np.array([t.data_ptr() for t in tensors], dtype=np.uint64)


class RunTable(NamedTuple):
    """Where the tier's kernels read each tensor (:func:`run_table`): runs of ``len`` consecutive
    elements at ``starts`` (a pointer to int64 offsets, 0 for one run from the start)."""

    starts: np.ndarray  # uint64: each tensor's pointer to its runs' offsets, or 0
    runs: np.ndarray  # int64: runs per tensor
    len: np.ndarray  # int64: elements per run
    total: int  # elements read, all tensors together
    keep: list  # the offsets' tensors, kept alive while the table is
    addresses: tuple  # the three arrays' addresses, for the calls (each .ctypes costs a microsecond)


def run_table(tensors: list[torch.Tensor], starts: list[torch.Tensor | None], run: int) -> RunTable:
    """The runs of :func:`runs_gather` and :func:`signals`, made once (a tier's subsets
    are fixed): ``starts[i]`` the int64 offsets of tensor i's runs of ``run`` elements (None: all
    of it, one run; the offsets are in range: not checked)."""
    keep = [s.contiguous() for s in starts if s is not None]
    it = iter(keep)
    ptrs = np.array([0 if s is None else next(it).data_ptr() for s in starts], dtype=np.uint64)
    runs = np.array([1 if s is None else s.numel() for s in starts], dtype=np.int64)
    lens = np.array([t.numel() if s is None else run for t, s in zip(tensors, starts)], dtype=np.int64)
    return RunTable(ptrs, runs, lens, int((runs * lens).sum()), keep,
                    (ptrs.ctypes.data, runs.ctypes.data, lens.ctypes.data))


def runs_gather(weights, table: RunTable) -> np.ndarray:
    """The every-step tier's first half (probes/capture/signals.py): the contiguous float32 CPU
    tensors ``weights`` at the runs of ``table``, one after another (float32)."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernel is not available")
    out = np.empty(table.total, dtype=np.float32)
    tw = _table(weights)
    lib.xray_runs_gather(len(weights), tw.ctypes.data, *table.addresses, out.ctypes.data)
    return out


def signals(weights, grads: np.ndarray, moments: np.ndarray, table: RunTable, w0: np.ndarray,
            eps2: float) -> np.ndarray:
    """The tier's second half, after the optimizer step: a [4, m] float64 array of per-tensor
    sum(g^2 / max(v, eps2)), sum(g^2), sum((w - w0)^2) and sum(w0^2) at the runs of ``table``
    (``w0``: :func:`runs_gather`'s). ``grads`` and ``moments`` are the data pointers (uint64)
    of contiguous float32 CPU tensors the caller keeps alive."""
    lib = load()
    if lib is None:
        raise RuntimeError("the CPU kernel is not available")
    m = len(weights)
    sums = np.empty((4, m), dtype=np.float64)
    tw = _table(weights)
    lib.xray_signals(m, tw.ctypes.data, grads.ctypes.data, moments.ctypes.data, *table.addresses, w0.ctypes.data,
                     eps2, sums.ctypes.data)
    return sums
