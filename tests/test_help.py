"""Every command's --help ends with a one-line example of the command itself."""

import importlib

import pytest

COMMANDS = {
    "python -m convert": "convert.__main__:main",
    "python -m train data": "train.data_cli:main",
    "python -m train precompute": "train.precompute_cli:main",
    "python -m train probes": "train.probes_cli:main",
    "python -m train router": "train.router_cli:main",
    "python -m train hybrid": "train.hybrid_cli:main",
    "python -m train lm": "train.lm_cli:main",
    "python -m eval hybrid": "eval.hybrid_cli:main",
    "python -m eval baselines": "eval.baselines_cli:main",
    "python -m eval latency": "eval.latency_cli:main",
    "python -m eval parity": "eval.parity_cli:main",
    "python -m eval demo": "eval.demo_cli:main",
    "python -m eval doctor": "eval.doctor_cli:main",
}


@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_an_example(command, capsys):
    module, name = COMMANDS[command].split(":")
    main = getattr(importlib.import_module(module), name)
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    lines = [line for line in capsys.readouterr().out.strip().splitlines() if line.strip()]
    assert lines[-1].startswith(f"example: {command} ") or lines[-2].startswith(f"example: {command} "), lines[-2:]


def test_the_stage_dispatchers_list_every_stage(capsys):
    from eval.__main__ import STAGES as EVAL_STAGES
    from eval.__main__ import main as eval_main
    from train.__main__ import STAGES as TRAIN_STAGES

    assert {f"python -m eval {s}" for s in EVAL_STAGES} | {f"python -m train {s}" for s in TRAIN_STAGES} \
        == {c for c in COMMANDS if c != "python -m convert"}
    assert eval_main(["--help"]) == 0
    listing = capsys.readouterr().err
    assert all(f"    {stage} " in listing for stage in EVAL_STAGES)
