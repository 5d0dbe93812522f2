"""Layer lists such as ``0-11``, ``0,3,5-7`` or ``all``: parsing and rejection of bad specs."""

import click
import pytest

from lensio.errors import BadInputError
from lensio.layers import parse_layers

N_LAYERS = 12

VALID_CASES = [
    ("0-11", tuple(range(12))),
    ("0,3,5-7", (0, 3, 5, 6, 7)),
    ("all", tuple(range(12))),
    ("ALL", tuple(range(12))),
    (" all ", tuple(range(12))),
    ("7", (7,)),
    ("11", (11,)),
    ("3-3", (3,)),
    (" 0 , 3 ,5-7 ", (0, 3, 5, 6, 7)),
    ("1 - 3", (1, 2, 3)),
    ("1,1,2", (1, 2)),
    ("5-7,6,0-1", (0, 1, 5, 6, 7)),
    ("9,2", (2, 9)),
]

# (spec, text the message must contain): the message names the offending value.
BAD_CASES = [
    ("5-2", "5-2"),
    ("a", "'a'"),
    ("1,,2", "1,,2"),
    ("", "''"),
    ("   ", "'   '"),
    (",", "','"),
    ("12", "12"),
    ("0-12", "12"),
    ("3,40", "40"),
    ("1-2-3", "1-2-3"),
    ("-1", "-1"),
    ("0-", "0-"),
    ("1.5", "1.5"),
    ("0x1", "0x1"),
    ("all,1", "all"),
    ("\u00b2", "\u00b2"),  # superscript two: str.isdigit accepts it but int() does not
]


@pytest.mark.parametrize(("spec", "expected"), VALID_CASES)
def test_parse_layers_valid(spec, expected):
    assert parse_layers(spec, N_LAYERS) == expected


@pytest.mark.parametrize(("spec", "named_value"), BAD_CASES)
def test_parse_layers_rejects_bad_spec(spec, named_value):
    with pytest.raises(BadInputError) as caught:
        parse_layers(spec, N_LAYERS)

    assert named_value in caught.value.message


@pytest.mark.parametrize(("spec", "_named_value"), BAD_CASES)
def test_parse_layers_error_is_click_and_value_error(spec, _named_value):
    with pytest.raises(BadInputError) as caught:
        parse_layers(spec, N_LAYERS)

    assert isinstance(caught.value, click.ClickException)
    assert isinstance(caught.value, ValueError)
    assert caught.value.exit_code != 0


def test_parse_layers_out_of_range_names_layer_count():
    with pytest.raises(BadInputError) as caught:
        parse_layers("0-2", 2)

    assert "2 layers" in caught.value.message


def test_parse_layers_all_follows_model_size():
    assert parse_layers("all", 2) == (0, 1)


OUT_OF_RANGE = {"12", "0-12", "3,40"}


@pytest.mark.parametrize(("spec", "named_value"), [case for case in BAD_CASES if case[0] not in OUT_OF_RANGE])
def test_parse_layers_syntax_only_rejects_bad_spec(spec, named_value):
    with pytest.raises(BadInputError) as caught:
        parse_layers(spec, None)

    assert named_value in caught.value.message


def test_parse_layers_syntax_only_skips_range():
    assert parse_layers("0,40-41", None) == (0, 40, 41)
    assert parse_layers("all", None) == ()
