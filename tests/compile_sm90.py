"""Compile every kernel launch of the device engine for a Hopper GPU (sm_90), on a machine without one.

Run as a script by tests/test_device_engine.py. The engine is loaded compiled (not in Triton's
interpreter, which accepts code that Triton's compiler refuses: that is how a non-constexpr global
reached a GPU once). Its host side runs for real on CPU tensors, with each launch replaced by a
compile of that launch's exact signature and constants; prints one JSON line per distinct launch:
kernel, registers, local memory (spills), and an error if it did not compile.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch

torch.cuda.is_available = lambda: True  # the compiled engine, never a launch
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from probes.engines import device as de  # noqa: E402
from probes.engines import reduce as red  # noqa: E402

TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float64: "*fp64",
         torch.int64: "*i64", torch.int32: "*i32"}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
seen: dict = {}


def signature(kernel, args) -> dict:
    sig = {}
    for name, a in zip(kernel.arg_names, args):
        if isinstance(a, torch.Tensor):
            sig[name] = TYPES[a.dtype]
        elif isinstance(a, bool):
            sig[name] = "i1"
        elif isinstance(a, int):
            sig[name] = "i64" if name in kernel.do_not_specialize or abs(a) > 2**31 - 1 else "i32"
        else:
            sig[name] = "fp32"
    return sig


def compile_launch(kernel, grid, *args, **consts) -> None:
    sig = signature(kernel, args)
    key = (kernel.__name__, json.dumps(sig, sort_keys=True), json.dumps(consts, sort_keys=True))
    if key in seen:
        return
    full = {n: ("constexpr" if n in consts else sig[n]) for n in kernel.arg_names}
    src = ASTSource(kernel, full, constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
    out = {"kernel": kernel.__name__, "x": sig.get("x_ptr"), **{k: v for k, v in consts.items() if k in
                                                              ("SINGLE", "CONTIG")}}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                                   text=True).stdout
        out["registers"] = int(re.search(r"REG:(\d+)", usage).group(1))
        out["local"] = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    except Exception as exc:  # noqa: BLE001  (reported, and the test fails on it)
        out["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    seen[key] = out
    print(json.dumps(out), flush=True)


de._launch = compile_launch
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
    x = torch.randn(64, 48, generator=g).to(dtype)
    for units in (0, 48):
        for xs in ([x], [x.t()], [x, x[:, ::2], torch.randn(5, generator=g).to(dtype)], [x, x * 2]):
            rows = de.Rows(torch.device("cpu"), 1e-3)
            plans = [red.sample_plan(t, 1000, torch.Generator().manual_seed(1)) for t in xs]
            rows.add([de.Item(t, p, units=units if t.dim() == 2 else 0) for t, p in zip(xs, plans)])
            rows.finalize()
de.gather([torch.randn(100, generator=g), torch.randn(10, generator=g)],
          [torch.arange(0, 100, 3), None])
