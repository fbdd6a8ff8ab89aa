"""Shared fixtures: every test gets its own private run directory."""

import os

import pytest

# The device engine's Triton kernels run on CPU tensors in Triton's interpreter, which must be chosen
# before anything (torch.compile's inductor does) imports triton: here, before any test module.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(autouse=True)
def run_dir(tmp_path_factory, monkeypatch):
    """A fresh 0700 run directory, so tests never see each other's runs."""
    d = tmp_path_factory.mktemp("run")
    os.chmod(d, 0o700)
    monkeypatch.setenv("XRAY_TUI_RUN_DIR", str(d))
    return d


@pytest.fixture
def cpu_kernel_lib():
    """The probe's C kernel, built: a test of it skips only where there is no C compiler at all."""
    import shutil

    from probes.engines import cpu_kernel

    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler: the probe uses its torch path here")
    lib = cpu_kernel.load()
    assert lib is not None, "a C compiler is here but the kernel did not build (see the xray-tui log)"
    return lib
