"""The README's two commands, as written there: read from README.md, run from an empty working directory
that is not the repository root, scaled down only by the flags the README itself gives. A README edit
that breaks them fails here. Likewise the user domain of docs/domains.md and its commands, read from there.

The virtual environment and the install are the one this suite runs in (`sys.executable` is
`.venv/bin/python` under `.ci/run`); what follows `.venv/bin/python` runs word for word."""

import configparser
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOMAINS_DOC = (ROOT / "docs" / "domains.md").read_text()


def two_commands() -> list[str]:
    section = README.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(blocks) == 2, "the README's 'Two commands' section holds exactly two bash blocks"
    return blocks


def python_part(command: str) -> list[str]:
    """The arguments after `.venv/bin/python` in the command's last step."""
    steps = command.split(" && ")
    assert steps[0] == "python3 -m venv .venv"
    last = shlex.split(steps[-1])
    assert last[0] == ".venv/bin/python", steps[-1]
    return last[1:]


def test_the_commands_install_what_exists_and_ci_runs_the_test_command():
    demo, tests = two_commands()
    extras = configparser.ConfigParser()
    extras.read(ROOT / "setup.cfg")
    known = set(extras["options.extras_require"])
    for command in (demo, tests):
        install = shlex.split(command.split(" && ")[1])
        assert install[:4] == [".venv/bin/pip", "install", "-q", "-e"]
        named = re.fullmatch(r"\.\[([\w,]+)\]", install[4]).group(1).split(",")
        assert set(named) <= known, f"{install[4]} names extras setup.cfg does not define"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == tests, ".ci/run's last line is the README's test command"
    assert python_part(tests)[:2] == ["-m", "pytest"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The README's first command, scaled down as the README says, from an empty directory."""
    demo, _ = two_commands()
    scale = shlex.split(re.search(r"scale it\s+down: `([^`]+)`", README).group(1))
    assert set(a for a in scale if a.startswith("--")) <= {"--quick", "--n-train", "--n-eval", "--epochs", "--lm-steps"}
    cwd = tmp_path_factory.mktemp("new_user")
    run = subprocess.run([sys.executable, *python_part(demo), *scale], cwd=cwd, capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    return cwd, run


def test_the_readme_demo_runs_with_its_default_out(demo_run):
    cwd, run = demo_run
    out = cwd / "demo_out"  # the default --out, relative to the working directory
    for report in ("report.md", "results/report.md", "results/summary.json", "probes/mean/r2.md",
                   "lm/hf/config.json", "lm/loss_curve.png", "checkpoint/config.json", "lm_answers/baselines.md",
                   "hybrid_training/report.md"):
        assert (out / report).is_file(), report
    assert "Outputs under demo_out/" in run.stdout
    # Re-run, it finds every stage complete.
    again = subprocess.run([sys.executable, *python_part(two_commands()[0])], cwd=cwd, capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "[run ]" not in again.stdout and "[skip]" in again.stdout


def test_the_chat_baselines_run_on_the_demo_model(demo_run):
    """`eval baselines` on the demo's converted checkpoint, relative paths: both prompt formats reported."""
    cwd, _ = demo_run
    run = subprocess.run([sys.executable, "-m", "eval", "baselines", "--model", "demo_out/checkpoint", "--data",
                          "demo_out/data/eval.json", "--out", "baselines_out", "--n", "2", "--new-tokens", "6",
                          "--styles", "structured", "--prompt-format", "raw", "chat"], cwd=cwd, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = (cwd / "baselines_out" / "baselines.md").read_text()
    assert "within 10% (raw)" in report and "within 10% (chat)" in report


def your_own_domain() -> tuple[str, list[str]]:
    """The user domain of docs/domains.md (its one Python block) and its commands (its one bash block)."""
    section = DOMAINS_DOC.split("## Your own domain", 1)[1].split("\n## ", 1)[0]
    code = re.findall(r"```python\n(.*?)\n```", section, re.S)
    bash = re.findall(r"```bash\n(.*?)\n```", section, re.S)
    assert len(code) == 1 and len(bash) == 1, "'Your own domain' holds one python and one bash block"
    return code[0], [line for line in bash[0].splitlines() if line.strip()]


def test_the_readme_user_domain_runs_through_every_command(tmp_path_factory):
    """The domain exactly as docs/domains.md prints it, saved in an empty directory, through the demo and then
    every stage's command, each as written (relative paths, a .py domain named on each)."""
    code, commands = your_own_domain()
    assert len(code.splitlines()) <= 50, "docs/domains.md's user domain is at most 50 lines"
    cwd = tmp_path_factory.mktemp("own_domain")
    (cwd / "my_domain.py").write_text(code + "\n")
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == ".venv/bin/python", command
        run = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, f"{command}\n{run.stderr[-3000:]}"
    summary = json.loads((cwd / "results" / "summary.json").read_text())
    assert summary["domain"] == "mine" and summary["metrics"] == ["kinetic_energy", "monthly_payment"]
    for method in ("hybrid", "constant_median"):
        assert set(summary["scores"]["honest"][method]) == {"kinetic_energy", "monthly_payment"}
    assert "monthly_payment/monthly_rate" in (cwd / "probes" / "r2.md").read_text()
    assert "sign-log of y / 0.001" in (cwd / "probes" / "r2.md").read_text()
    for report in ("demo_mine/results/report.md", "demo_mine/hybrid_training/report.md", "hybrid/report.md"):
        assert (cwd / report).is_file(), report
    # The recorded file is not run again by itself: a later stage without --domain says what to pass.
    run = subprocess.run([sys.executable, "-m", "train", "probes", "--store", "store", "--out", "probes2",
                          "--epochs", "1"], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "pass --domain" in run.stderr and "my_domain.py" in run.stderr
