"""`canonical_json`: a stored jsonb field's text rewritten as the codec encodes it, which
`rehash` (and so `verify`) does natively for every plain row, without Python objects.

The native rewrite must give the reference's bytes (msgspec decodes the text, `canonical`
rewrites what jsonb changed, msgspec encodes with sorted keys) for the text PostgreSQL prints:
numbers across the exponents where msgspec switches forms, integers past 64 bits, every kind of
escape, keys that sort differently once unescaped, nesting. Anything it does not take (it
returns None) goes the msgspec way, which judges it as the reference does; it must never return
other bytes.
"""

from __future__ import annotations

import importlib
import math
from decimal import Decimal
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tamma_events.codec import reference as python

native = importlib.import_module("tamma_events._native")


def jsonb_texts(conn: psycopg.Connection[Any], values: list[Any]) -> list[bytes]:
    """How PostgreSQL prints ``values`` stored as jsonb (as the codec writes them)."""
    encoded = [msgspec.json.encode(python.canonical(v)).decode() for v in values]
    rows = conn.execute(
        "SELECT v::text FROM unnest(%s::jsonb[]) WITH ORDINALITY AS t(v, n) ORDER BY n",
        [encoded],
    ).fetchall()
    return [row[0].encode() for row in rows]


@pytest.fixture(scope="module")
def conn(pg_dsn: str) -> Any:
    with psycopg.connect(pg_dsn, autocommit=True) as connection:
        yield connection


def same(text: bytes, tags: bool = False) -> bytes | None:
    """The native rewrite, which must be the reference's bytes or None."""
    got = native.canonical_json(text, tags)
    expected = python.canonical_json(text, tags)
    assert got is None or got == expected, (text, got, expected)
    return got


# Floats msgspec writes in each of its forms: 0.00001 (exponent -5), 1e-7, 123.456, 1.0; and
# the magnitudes around them. Below 1e16: larger floats are stored as integers.
floats = st.one_of(
    # (smaller magnitudes print as hundreds of digits: the msgspec path takes those)
    st.floats(min_value=-9.9e15, max_value=9.9e15).filter(lambda x: x == 0 or abs(x) > 1e-30),
    st.builds(
        lambda m, e: float(f"{m}e{e}"),
        st.floats(min_value=1.0, max_value=9.999999, allow_nan=False),
        st.integers(-30, 15),
    ),
)
texts = st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=12)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**200), 2**200) | floats | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=5),
    max_leaves=16,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(texts, values, max_size=6), min_size=1, max_size=8))
def test_server_text_of_plain_objects_is_rewritten_natively(
    conn: psycopg.Connection[Any], objects: list[dict[str, Any]]
) -> None:
    for text in jsonb_texts(conn, objects):
        # Every number the server prints here is short and plain: the native rewrite takes
        # every one of these objects.
        assert same(text) is not None, text


@settings(max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.dictionaries(
            st.text(
                st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
                min_size=1,
                max_size=128,
            ),
            texts,
            max_size=6,
        ),
        min_size=1,
        max_size=8,
    )
)
def test_server_text_of_tags_is_rewritten_natively(
    conn: psycopg.Connection[Any], tags: list[dict[str, str]]
) -> None:
    for text in jsonb_texts(conn, tags):
        assert same(text, tags=True) is not None, text


def test_every_float_form_and_escape(conn: psycopg.Connection[Any]) -> None:
    numbers = [
        0.0,
        1.0,
        -1.5,
        0.1,
        1e-5,
        1.2345e-5,
        -9.87654321e-5,
        1e-6,
        1e-7,
        2.5e-30,
        123456789012345.6,
        9.999999999999998e15,
        0.30000000000000004,
        2**63,
        -(2**64) - 1,
        10**300,
    ]
    escapes = "".join(chr(c) for c in range(1, 0x20)) + '"\\/\x7f\u2028\u2029é中🎉'
    objects = [
        {"n": numbers},
        {escapes: escapes, "a": 1, "é": 2, "B": 3, "aa": 4, "": 5, '"': 6, "\\": 7},
        {"deep": [[[{"z": {"y": [1, {"x": None}]}}]]], "empty": [{}, [], ""]},
    ]
    for text in jsonb_texts(conn, objects):
        assert same(text) is not None, text
    assert same(jsonb_texts(conn, [{escapes: escapes, "k": "v"}])[0], tags=True) is not None


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": 1e-7}',  # an exponent: jsonb never prints one
        b'{"a": 1.5E3}',
        b'{"a": 10000000000000000.0}',  # a float of 1e16 or more is stored as an integer
        b'{"a": 1, "a": 2}',  # duplicate keys
        b'{"a": "\\u0000"}',  # NUL
        b'{"a": "\\ud800"}',  # a lone surrogate
        b'{"a": "\xff"}',  # not UTF-8
        b'{"a": 01}',
        b'{"a": .5}',
        b'{"a": -}',
        b'{"a": tru}',
        b'{"a": [1, 2,]}',
        b'{"a": 1} x',
        b"[1, 2]",
        b'"text"',
        b"",
        b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}",  # deeper than the codec allows
        b'{"a": ' + b"9" * 1300 + b"}",  # an integer past the codec's 4,096 bits
        b'{"a": 0.' + b"0" * 400 + b"1}",  # a number too long to read natively
    ],
)
def test_text_the_native_rewrite_leaves_to_msgspec(text: bytes) -> None:
    assert same(text) is None


@pytest.mark.parametrize(
    "text",
    [
        b'{"k": 1}',  # a tag must be a string
        b'{"": "v"}',  # a tag key of no characters
        b'{"' + b"k" * 129 + b'": "v"}',  # or more than 128
        b'{"k": {"v": "w"}}',
    ],
)
def test_tags_the_native_rewrite_leaves_to_msgspec(text: bytes) -> None:
    assert same(text, tags=True) is None


def test_exponent_forms_match_msgspec_on_many_floats() -> None:
    """The float layout (msgspec's, from Python's shortest digits) on a sweep of magnitudes:
    written as jsonb prints them (plain decimals), read back, rewritten."""
    for exponent in range(-25, 16):
        for mantissa in (1.0, 1.5, 2.220446049250313, 9.999999999999998):
            value = mantissa * 10.0**exponent
            if not math.isfinite(value) or abs(value) >= 1e16:
                continue
            text = b'{"x": ' + format(Decimal(repr(value)), "f").encode() + b"}"
            if len(text) > 300:
                continue
            got = same(text)
            assert got is not None


def test_magnitudes_near_the_subnormals() -> None:
    """Decimals around 1e-300 and below, where doubles lose digits: the rewrite either leaves
    them to msgspec or writes exactly its bytes (never a digit msgspec would not)."""
    for zeros in range(280, 330, 3):
        for digits in (b"1", b"25", b"4940656458412", b"123456789012345"):
            same(b'{"x": 0.' + b"0" * zeros + digits + b"}")
            same(b'{"x": -0.' + b"0" * zeros + digits + b"}")
