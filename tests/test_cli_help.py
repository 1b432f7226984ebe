"""Every example in every ``caopd COMMAND --help`` parses with the real parser, and the config of a command built
from one validates from the parsed flags: an example a user copies from the help works as far as the flags go."""

import argparse
import re
import shlex

import pytest

from caopd.cli import _commands, build_parser
from caopd.cli.options import config_from_args
from caopd.config.gates import GateConfig
from caopd.tasks.datasets import DATA_ROOT_ENV

# An environment assignment before the command (`KFP_TOKEN=... caopd submit ...`): the shell's, not argparse's.
ENV_PREFIX = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)+")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def examples(epilog: str) -> list[str]:
    """The command lines of an epilog: backslash continuations joined, environment prefixes stripped."""
    joined = re.sub(r"\s*\\\n\s*", " ", epilog)
    lines = (ENV_PREFIX.sub("", line.strip()) for line in joined.splitlines())
    return [line for line in lines if line.startswith("caopd ")]


# The config each command builds from its flags (what `config_from_args` is called with in cmd_*), and the values
# it sets itself: register reads its metrics from the --metrics file, which the examples only name.
CONFIGS = {name: config for name, _, _, config, _ in _commands()} | {"promote": GateConfig}
FIXED = {"register": {"metrics": {}}}
COMMANDS = _subcommands()
EXAMPLES = [(name, line) for name, parser in COMMANDS.items() for line in examples(parser.epilog or "")]


def test_the_extraction_joins_continuations_and_strips_environment_prefixes():
    epilog = "example:\n  KFP_TOKEN=... A=1 caopd submit --host h \\\n      --param a=1\nnot a command: caopd\n"
    assert examples(epilog) == ["caopd submit --host h --param a=1"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_an_example_of_itself(name):
    lines = examples(COMMANDS[name].epilog or "")
    assert lines, f"`caopd {name} --help` shows no example"
    assert all(shlex.split(line)[1] == name for line in lines), lines


@pytest.mark.parametrize("name, line", EXAMPLES, ids=[f"{name}-{i}" for i, (name, _) in enumerate(EXAMPLES)])
def test_every_help_example_parses_and_its_config_validates(name, line, monkeypatch, capsys):
    monkeypatch.delenv(DATA_ROOT_ENV, raising=False)  # a platform's data root would confine the examples' paths
    argv = shlex.split(line)[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_info:  # argparse prints the reason and exits 2
        pytest.fail(f"`{line}` does not parse: {capsys.readouterr().err.strip()} (exit {exit_info.code})")
    assert args.command == name
    if name in CONFIGS:
        config_from_args(CONFIGS[name], args, **FIXED.get(name, {}))
