"""Parameter overrides: parsing and coercion to the default's type."""

from __future__ import annotations

import pytest

from nbflow.notebook import Parameter
from nbflow.params import CliValue, EnvRef, ValueRef, coerce, is_secret_name, parse_assignments


def p(default, source=None):
    return Parameter("x", default, type(default).__name__, 1, source or repr(default))


@pytest.mark.parametrize("default, text, expected", [
    (2012, "2014", 2014), (0.5, "1e-3", 0.001), (True, "no", False), (False, "TRUE", True),
    ("a", "2014", "2014"), (None, "None", None), (None, "3", 3), (None, "hello", "hello"),
    ([1], "[1, 2]", [1, 2]), ({"a": 1}, "{'b': 2}", {"b": 2}),
])
def test_coerce_to_default_type(default, text, expected):
    assert coerce(CliValue(text), p(default)) == expected


@pytest.mark.parametrize("default, text", [(2012, "abc"), (0.5, "x"), (True, "maybe"), ([1], "{'a': 1}")])
def test_bad_value_names_expected_type(default, text):
    with pytest.raises(ValueError, match=f"expected {type(default).__name__} like the default"):
        coerce(CliValue(text), p(default))


def test_python_values_are_not_coerced():
    assert coerce("2014", p(2012)) == "2014"


def test_parse_assignments():
    assert parse_assignments(["a=1", "clean.b=x=y"]) == {"a": "1", "clean.b": "x=y"}
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_assignments(["novalue"])


def test_special_values_render_as_code():
    assert repr(EnvRef("NBFLOW_SECRET_TOKEN")) == '__import__("os").environ[\'NBFLOW_SECRET_TOKEN\']'
    assert repr(ValueRef("../_nbflow/values/x")) == '__import__("nbflow").load_value(\'../_nbflow/values/x\')'
    assert is_secret_name("api_token") and is_secret_name("db_password") and not is_secret_name("min_year")
