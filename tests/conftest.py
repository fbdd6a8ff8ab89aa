"""Shared fixtures: every test gets its own private run directory."""

import os

import pytest


@pytest.fixture(autouse=True)
def run_dir(tmp_path_factory, monkeypatch):
    """A fresh 0700 run directory, so tests never see each other's runs."""
    d = tmp_path_factory.mktemp("run")
    os.chmod(d, 0o700)
    monkeypatch.setenv("XRAY_TUI_RUN_DIR", str(d))
    return d
