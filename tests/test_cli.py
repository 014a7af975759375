"""The command line's own pages: `raywatch --help` and every subcommand's, and the job entry points'
(what `ray job submit ... -- python -m <module> --help` prints), each as a user types it."""

from __future__ import annotations

import argparse

import pytest

from cli.main import build_parser, main

SUBCOMMANDS = sorted(
    next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices  # noqa: SLF001
)
JOB_ENTRY_POINTS = ["train.pipeline", "train.retrain", "train.compress", "train.fleet", "tune.search"]


@pytest.mark.parametrize("argv", [["--help"]] + [[name, "--help"] for name in SUBCOMMANDS], ids=" ".join)
def test_every_help_page_prints(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert "usage: raywatch" in capsys.readouterr().out


def test_every_option_and_argument_says_what_it_is_for():
    """Each subcommand's `--help` explains every option and positional argument it lists (`compress` hands
    its options to train.compress, whose own parser is tested below)."""
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    bare = [
        f"raywatch {name} {action.option_strings[0] if action.option_strings else action.dest}"
        for name, sub in subparsers.choices.items()
        for action in sub._actions  # noqa: SLF001
        if not isinstance(action, argparse._HelpAction) and not action.help  # noqa: SLF001
    ]
    assert not bare, f"options without help: {bare}"


@pytest.mark.parametrize("module", JOB_ENTRY_POINTS)
def test_every_job_entry_point_prints_its_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exited:
        importlib.import_module(module).main(["--help"])
    assert exited.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_the_train_job_takes_set_overrides_and_names_an_unknown_key(data_dir):
    """`python -m train.pipeline --set key=value` as `raywatch train --set`: parsed as JSON where it can be,
    and a key the kind's config does not know fails by name before Ray starts."""
    from train.pipeline import main as train_job
    from train.pipeline import parse_sets

    assert parse_sets(["hidden=16", "lr=1e-3", "name=x", "sizes=[1, 2]"]) == {
        "hidden": 16,
        "lr": 1e-3,
        "name": "x",
        "sizes": [1, 2],
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_sets(["hidden"])
    with pytest.raises(ValueError, match="hiden"):
        train_job(["--model", "lstm", "--data", str(data_dir), "--entities", "asd/omi-2", "--set", "hiden=16"])
