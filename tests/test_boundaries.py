"""The import boundaries the design depends on, checked instead of trusted.

The viewer (``tui``) runs where torch is not installed, so neither it nor the
wire-side modules of ``probes`` it reads may import torch (or transformers or
triton); the probe runs inside training jobs, so nothing in ``probes`` may
import textual. Each check imports every module of the side in a fresh
interpreter whose path puts a package first that refuses to be imported.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: the probes packages the viewer imports: numpy, msgspec and the standard library only
VIEWER_SIDE_PACKAGES = ["probes.protocol", "probes.rules", "probes.publish"]
#: executed inside a training process by `attach --pid`, never imported
NOT_IMPORTED = {"probes.inject.boot"}


def modules(package: str) -> list[str]:
    """Every module of ``package`` (found on disk, so a new one is checked without being listed)."""
    found = [package]
    for info in pkgutil.walk_packages([str(REPO / package.replace(".", os.sep))], prefix=package + "."):
        if info.name not in NOT_IMPORTED and not info.name.endswith(".__main__"):  # __main__ runs, never imported
            found.append(info.name)
    return sorted(found)


def import_all_without(blocked: list[str], names: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    for name in blocked:
        pkg = tmp_path / "blocked" / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text(f"raise ImportError('{name} is blocked here')\n")
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            f"leaked = sorted(m for m in {blocked!r} if m in sys.modules)\n"
            "print('leaked', leaked)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "blocked"), str(REPO)]))
    env["TRITON_INTERPRET"] = "1"  # as in the suite: the device engine loads in the interpreter on a machine without CUDA
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_the_viewer_never_imports_torch(tmp_path):
    names = modules("tui") + [m for pkg in VIEWER_SIDE_PACKAGES for m in modules(pkg)]
    assert "tui.app" in names and "tui.widgets.layer_table" in names and "probes.protocol.wire" in names
    done = import_all_without(["torch", "transformers", "triton"], names, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "leaked []" in done.stdout


def test_the_probe_never_imports_textual(tmp_path):
    pytest.importorskip("torch")
    names = modules("probes")
    assert "probes.capture.probe" in names and "probes.distributed.job" in names
    done = import_all_without(["textual"], names, tmp_path)  # rich is lightning's own dependency too
    assert done.returncode == 0, done.stderr[-2000:]
    assert "leaked []" in done.stdout


# -- the import contracts (pyproject.toml, [tool.importlinter]) ---------------------------------


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the packages under ``root``, with the contracts of ``root/pyproject.toml``."""
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c;"
                           " sys.exit(c())"], cwd=root, capture_output=True, text=True, env=env, timeout=120)


def test_the_import_contracts_hold():
    """The rooms in layers, no cycles between siblings, no torch in the viewer, no viewer in the probe."""
    pytest.importorskip("importlinter")
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
    assert "Contracts: 4 kept, 0 broken." in done.stdout


def test_the_import_contracts_catch_a_stray_import(tmp_path):
    """A copy of the packages with three stray imports breaks every contract (the contracts have teeth)."""
    pytest.importorskip("importlinter")
    import shutil

    for name in ("probes", "tui", "themes"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    strays = {"probes/protocol/histogram.py": "import torch  # stray\n",  # the viewer's side imports torch
              "probes/rules/engine.py": "from probes.capture import probe  # stray\n",  # a room imports one above it
              "probes/capture/probe.py": "import textual  # stray\n"}  # the probe imports the viewer's toolkit
    for path, line in strays.items():
        f = tmp_path / path
        f.write_text(f.read_text() + line)
    done = lint_imports(tmp_path)
    assert done.returncode != 0
    assert "Contracts: 0 kept, 4 broken." in done.stdout, done.stdout[-3000:]  # rules -> capture is also a cycle
    assert "probes.protocol.histogram -> torch" in done.stdout
    assert "probes.rules.engine -> probes.capture.probe" in done.stdout
    assert "probes.capture.probe -> textual" in done.stdout
