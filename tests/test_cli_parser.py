"""The project's one argparse parser: one-line errors, and a lone ``--`` is never a flag's value."""

from __future__ import annotations

import pytest

from dmax_jax.cli import OneLineParser


def _parser() -> OneLineParser:
    p = OneLineParser(prog="tool")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--name", default="x")
    return p


@pytest.mark.parametrize("argv", [["--seq-len=--"], ["--seq-len", "--"], ["--name=--"]])
def test_lone_double_dash_is_refused_in_one_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("tool: error: ") and "(see --help)" in err


def test_good_values_still_parse():
    args = _parser().parse_args(["--seq-len=8", "--name", "a-b"])
    assert (args.seq_len, args.name) == (8, "a-b")
