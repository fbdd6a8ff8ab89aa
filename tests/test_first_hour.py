"""A newcomer's first hour (issue 28): the command line's paper cuts, each checked as a user meets it."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cli_in_process(*argv: str) -> tuple[int, bool, str]:
    """Run ``xray-tui ARGV`` in a fresh interpreter: (exit status, whether torch was imported, stderr)."""
    code = ("import sys\nfrom tui.cli import main\nrc = main(sys.argv[1:])\n"
            "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rc, torch_seen, hf_seen = out.stdout.split()[-3:]
    return int(rc), torch_seen == "True" or hf_seen == "True", out.stderr


@pytest.mark.parametrize("argv, said", [
    (["demo", "--theme", "nosuch"], "unknown theme 'nosuch' (known: "),
    (["demo", "--headless", "--theme", "nosuch"], "unknown theme 'nosuch'"),
    (["demo", "--headless", "--status-every", "-1"], "--status-every must be a number of seconds >= 0, got '-1'"),
    (["demo", "--status-every", "soon"], "--status-every must be a number of seconds >= 0"),
    (["demo", "--headless", "--rules", "/nonexistent/rules.toml"], "/nonexistent/rules.toml"),
    (["demo", "--log", "/nonexistent/dir/run.xray"], "--log /nonexistent/dir/run.xray: no such directory"),
])
def test_demo_checks_every_option_before_importing_torch(argv, said):
    """A typo costs what --help costs: the one-line error comes with torch never imported (and no
    trainer started); before, the theme was checked by the app after the trainer child was spawned."""
    rc, imported, err = cli_in_process(*argv)
    assert rc == 2 and said in err and err.count("\n") == 1, err
    assert not imported


def _demo_recording(path: Path) -> None:
    """A two-step recording of the demo's own model (its real layer names), kept small: one block
    fewer and narrower than the demo's, the same module paths."""
    import torch

    import probes
    from probes.demo import training

    torch.manual_seed(0)
    model = training.build_model(vocab=12, layers=2, width=16, heads=2, block=8)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with probes.attach(model, opt, every=1, serve=False, log=str(path)):
        for _ in range(2):
            x = torch.randint(12, (2, 8))
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad()


def _export(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tui.cli", "export", *argv], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_export_help_example_matches_the_demos_layers(tmp_path):
    """The --layer example of `export --help` keeps samples of the demo's recording (it used to be
    '^h\\.0\\.', which matches nothing there: the names start with `transformer.`)."""
    from tui.cli import build_parser

    rec = tmp_path / "demo.xray"
    _demo_recording(rec)
    export = build_parser()._subparsers._group_actions[0].choices["export"]
    (layer,) = [a for a in export._actions if "--layer" in a.option_strings]
    example = re.search(r"e\.g\. ('[^']+')", layer.help).group(1)
    (pattern,) = shlex.split(example)
    out = _export(str(rec), "--layer", pattern, "--what", "samples")
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert out.returncode == 0 and rows, out.stderr
    assert {r["layer"] for r in rows} and all(r["layer"].startswith("transformer.h.0.") for r in rows)
    assert out.stderr == ""  # no "matched no sample" line


def test_export_filter_that_matches_nothing_names_the_layers_there(tmp_path):
    """A --layer/--kind that keeps no sample says so, with a few of the recording's names."""
    rec = tmp_path / "demo.xray"
    _demo_recording(rec)
    out = _export(str(rec), "--layer", r"^h\.0\.", "-o", str(tmp_path / "o.jsonl"))
    assert out.returncode == 0
    wrote, said = out.stderr.splitlines()
    assert wrote.startswith("wrote 0 samples and ")
    assert said.startswith(r"xray-tui: export: --layer '^h\.0\.' matched no sample; the recording's layers: "
                           "transformer.wte, transformer.wpe, transformer.h.0.ln_1, ")
    assert re.search(r"\.\.\. \(\d+ in all\); their kinds: weight, grad, act, update$", said), said
    # the layer matched but not with that kind: the layers it matched, and the kinds they do have
    out = _export(str(rec), "--layer", r"ln_f$", "--kind", "update", "--what", "samples")
    assert out.returncode == 0 and out.stdout == ""
    assert out.stderr == ("xray-tui: export: --layer 'ln_f$' --kind update matched no sample; the layers it "
                          "matches: transformer.ln_f; their kinds: act\n")


def test_readme_says_what_ci_runs_beyond_pytest():
    """The README's test command section names each thing `.ci/run` does besides pytest."""
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("Run the tests"):readme.index("## In your training script")]
    for tool in ("lint-imports", "tmux", "gdb", "triton"):
        assert tool in ci, tool  # (what .ci/run does)
        assert tool in section, f"the README's test section does not say .ci/run uses {tool}"
    assert "this is what `.ci/run` does" not in section
