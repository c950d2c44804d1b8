"""cli/args.py: the argparse types every tool shares refuse numbers out of range at parse time."""
import argparse

import pytest

from megatron_spot.cli.args import (non_negative_float, non_negative_int, positive_float, positive_int,
                                    positive_int_list, step_range, unit_fraction)


@pytest.mark.parametrize("parse,good,bad", [
    (positive_int, {"1": 1, "64": 64}, ["0", "-3", "1.5", "x", ""]),
    (non_negative_int, {"0": 0, "7": 7}, ["-1", "2.0", "x"]),
    (positive_float, {"0.5": 0.5, "300": 300.0}, ["0", "-0.1", "nan", "inf", "x"]),
    (non_negative_float, {"0": 0.0, "0.7": 0.7}, ["-0.01", "nan", "-inf"]),
    (unit_fraction, {"1": 1.0, "0.8": 0.8}, ["0", "1.01", "-0.5", "nan"]),
    (positive_int_list, {"1,2,4": [1, 2, 4], "3": [3]}, ["0,1", "1,,2", "", "a"]),
    (step_range, {"0:2": (0, 2), "3:4": (3, 4)}, ["2:2", "3:1", "-1:2", "2", "a:b", "1:"]),
])
def test_types_accept_in_range_and_refuse_the_rest(parse, good, bad):
    for text, value in good.items():
        assert parse(text) == value
    for text in bad:
        with pytest.raises(argparse.ArgumentTypeError, match=repr(text).replace("'", ".")):
            parse(text)


def test_argparse_names_the_flag_and_exits_2(capsys):
    p = argparse.ArgumentParser(prog="tool")
    p.add_argument("--steps", type=positive_int, default=5)
    assert p.parse_args([]).steps == 5
    with pytest.raises(SystemExit) as exc:
        p.parse_args(["--steps", "0"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == "tool: error: argument --steps: must be an integer > 0, got '0'"
