"""How a run ended: End.reason from real training processes that finish, raise, are killed or interrupted.

Each case is a real ``python tests/train_script.py`` process with a
recording; the recording's End must say what happened, and the process's
own exit status and traceback must be what they would be without the probe.
"""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import probes
from probes.publish import lifecycle
from probes.protocol import rundir, wire

HERE = Path(__file__).parent
SCRIPT = str(HERE / "train_script.py")
MODES = [pytest.param([], id="with-block"), pytest.param(["--plain"], id="atexit")]


def run_script(tmp_path, *args, timeout=120):
    log = tmp_path / "run.xray"
    out = subprocess.run([sys.executable, SCRIPT, "life", *args, "--log", str(log)],
                         capture_output=True, text=True, timeout=timeout)
    return out, log


def end_of(log):
    msgs, torn = wire.read_file(str(log))
    assert torn == 0
    ends = [m for m in msgs if isinstance(m, wire.End)]
    assert len(ends) == 1 and msgs[-1] is ends[0], "exactly one End, the last frame"
    return ends[0]


@pytest.mark.parametrize("mode", MODES)
def test_a_run_that_finishes_says_finished(tmp_path, mode):
    out, log = run_script(tmp_path, "5", *mode)
    assert out.returncode == 0, out.stderr
    end = end_of(log)
    assert (end.reason, end.error, end.step) == ("finished", "", 5)


@pytest.mark.parametrize("mode", MODES)
def test_an_exception_says_crashed_and_still_propagates(tmp_path, mode):
    out, log = run_script(tmp_path, "50", "--raise-at", "7", *mode)
    assert out.returncode == 1  # Python's own status for an uncaught exception
    assert "Traceback" in out.stderr and out.stderr.rstrip().endswith("ValueError: boom at step 7")
    assert "done" not in out.stdout
    end = end_of(log)
    assert (end.reason, end.error, end.step) == ("crashed", "ValueError: boom at step 7", 7)


def _default_signals():
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def _signalled(tmp_path, sig, mode):
    log = tmp_path / "run.xray"
    # A runner that started us in the background hands on SIGINT (and maybe SIGTERM) ignored, and
    # Python keeps that: give the child the default dispositions a terminal gives.
    proc = subprocess.Popen([sys.executable, SCRIPT, "life", "100000", "--sleep", "0.01", "--log", str(log), *mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err, log


@pytest.mark.parametrize("mode", MODES)
def test_sigterm_says_killed_and_the_process_still_dies_of_it(tmp_path, run_dir, mode):
    code, err, log = _signalled(tmp_path, signal.SIGTERM, mode)
    assert code == -signal.SIGTERM, err
    end = end_of(log)
    assert (end.reason, end.error) == ("killed", "SIGTERM") and end.step >= 1
    assert rundir.live_runs() == [] and not list(run_dir.glob("*.sock"))  # socket and manifest removed


@pytest.mark.parametrize("mode", MODES)
def test_ctrl_c_says_interrupted_and_the_process_still_dies_of_it(tmp_path, mode):
    code, err, log = _signalled(tmp_path, signal.SIGINT, mode)
    assert code == -signal.SIGINT and "KeyboardInterrupt" in err  # Python's own ending, traceback and all
    end = end_of(log)
    assert (end.reason, end.error) == ("interrupted", "") and end.step >= 1


def test_on_alert_stop_says_stopped(tmp_path):
    out, log = run_script(tmp_path, "200", "--nan-at", "5", "--stop", "--plain")
    assert out.returncode == 0 and "done" in out.stdout, out.stderr
    end = end_of(log)
    assert end.reason == "stopped" and end.step < 200


HF_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from probes.hf import XRayCallback

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            if i >= 12:
                raise RuntimeError("bad shard")
            ids = torch.arange(16) % 7
            return {"input_ids": ids, "labels": ids}

    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(output_dir=sys.argv[2], max_steps=10, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=Tokens(),
            callbacks=[XRayCallback(every=1, serve=False, log=sys.argv[1])]).train()
""")


def test_hf_trainer_that_raises_says_crashed(tmp_path):
    pytest.importorskip("accelerate")
    log = tmp_path / "hf.xray"
    out = subprocess.run([sys.executable, "-c", HF_SCRIPT, str(log), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "RuntimeError: bad shard" in out.stderr
    end = end_of(log)
    assert (end.reason, end.error) == ("crashed", "RuntimeError: bad shard")


# -- in-process: the hooks are installed only where they should be, and removed ---------------


def _tiny():
    model = nn.Linear(4, 2)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_hooks_are_installed_while_open_and_restored_at_close():
    before_hook = sys.excepthook
    # a probe closed off the main thread (a Timer) cannot restore the handler; the next close in it does
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, lifecycle._on_signal)
    model, opt = _tiny()
    a = probes.attach(model, opt, serve=False, spectral_every=None)
    b = probes.attach(model, opt, serve=False, spectral_every=None)
    assert sys.excepthook is lifecycle._excepthook
    assert signal.getsignal(signal.SIGTERM) is lifecycle._on_signal
    a.close()
    assert signal.getsignal(signal.SIGTERM) is lifecycle._on_signal  # b is still open
    b.close()
    assert sys.excepthook is before_hook and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


def test_a_handler_of_the_users_own_is_left_alone():
    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGTERM, mine)
    try:
        model, opt = _tiny()
        xr = probes.attach(model, opt, serve=False, spectral_every=None)
        assert signal.getsignal(signal.SIGTERM) is mine
        xr.close()
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)


def test_the_chained_excepthook_records_and_passes_on(tmp_path, capsys):
    model, opt = _tiny()
    xr = probes.attach(model, opt, serve=False, spectral_every=None, log=str(tmp_path / "x.xray"))
    try:
        raise KeyError("gone")
    except KeyError as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)  # what Python does for an uncaught one
    assert "KeyError: 'gone'" in capsys.readouterr().err  # the previous hook still printed it
    xr.close()  # what atexit does next
    assert (end_of(tmp_path / "x.xray").reason, end_of(tmp_path / "x.xray").error) == ("crashed", "KeyError: 'gone'")


@pytest.mark.parametrize("exc,want", [
    (None, ("finished", "")),
    (KeyboardInterrupt(), ("interrupted", "")),
    (SystemExit(0), ("finished", "")),
    (SystemExit(2), ("crashed", "SystemExit: 2")),
    (ValueError(""), ("crashed", "ValueError")),
    (RuntimeError("x" * 2000), ("crashed", "RuntimeError: " + "x" * (lifecycle.MAX_ERROR - 15) + "…")),
])
def test_reason_of(exc, want):
    assert lifecycle.reason_of(exc) == want


def test_a_forked_child_that_gets_sigterm_just_dies_of_it(tmp_path):
    import os

    model, opt = _tiny()
    xr = probes.attach(model, opt, serve=False, spectral_every=None, log=str(tmp_path / "x.xray"))
    try:
        pid = os.fork()
        if pid == 0:  # the child: the inherited handler must not close the parent's probe copy
            try:
                signal.raise_signal(signal.SIGTERM)
            finally:
                os._exit(7)  # not reached when the signal kills it
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert not xr.closed
    finally:
        xr.close()
    assert end_of(tmp_path / "x.xray").reason == "finished"
