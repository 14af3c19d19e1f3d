"""ilias_ray.plan checked against an independent reading of the spec.

Block 3. escape_id (spec 9): folder IDs escaped to ASCII exactly as the spec's Python
expression does, checked on its documented examples, on printable ASCII (identity) and against
a character-by-character reading of the expression.
"""

from __future__ import annotations

import pytest

from ilias_ray import plan_types as plan


def ref_escape(p):
    """Independent reading of the spec expression for printable ASCII and non-ASCII chars:
    unicode-escape gives \\xNN (< 0x100), \\uNNNN (BMP), \\UNNNNNNNN (above); str(bytes)
    doubles the backslash; then "\\\\u" -> "#U" and "\\\\x" -> "#U00". The capital-U
    form matches neither replacement, so it stays as two backslashes + U + 8 hex digits."""
    out = []
    for ch in p:
        o = ord(ch)
        assert o >= 0x20 and ch not in "\\'\"" and o != 0x7F  # cases covered here
        if o < 0x7F:
            out.append(ch)
        elif o < 0x100:
            out.append("#U00%02x" % o)
        elif o < 0x10000:
            out.append("#U%04x" % o)
        else:
            out.append("\\\\U%08x" % o)
    return "".join(out)


def test_escape_id_documented_examples():
    assert plan.escape_id("café_000/pos/P000_00.jpg") == "caf#U00e9_000/pos/P000_00.jpg"
    assert plan.escape_id("abc_000/query/Q000_01.jpg") == "abc_000/query/Q000_01.jpg"
    assert plan.escape_id("ж") == "#U0436"
    # non-BMP: the expression leaves "\\U0001f600" (two backslashes, capital U) in place
    assert plan.escape_id("a😀b.jpg") == "a" + "\\" + "\\" + "U0001f600b.jpg"
    assert plan.escape_id("😀") == r"\\U0001f600"


def test_escape_id_ascii_identity():
    import string

    s = "".join(c for c in string.printable if c not in "\\'\"\t\n\r\x0b\x0c")
    assert plan.escape_id(s) == s
    assert plan.escape_id("00042.tar/1000123") == "00042.tar/1000123"


@pytest.mark.parametrize(
    "p",
    ["café_000/pos/P000_00.jpg", "Ünïcödé/ж/中文/P1.jpg", "naïve ßtraße ÿ€.png", "x😀y/🎉.jpg", "ɐ_ā_Ω_ﬁ"],
)
def test_escape_id_matches_independent(p):
    got = plan.escape_id(p)
    assert got == ref_escape(p)
    assert got.isascii()


def test_keyset_is_exact_membership_over_utf8_keys():
    """plan.KeySet against Python's own set on the same IDs: no prefix, truncation or case matches."""
    ids = ["1000", "00001.tar/1001000", "café_7", "9" * 40, "12", "b", "10"]
    keys = plan.KeySet(ids + ["1000"])  # a repeated ID counts once
    assert len(keys) == len(set(ids))
    probes = ids + [
        "100",
        "10000",
        "1",
        "",
        "cafe_7",
        "café",
        "9" * 39,
        "9" * 41,
        "9" * 40 + "x",
        "B",
        "00001.tar/1001",
    ]
    for p in probes:
        assert (p in keys) == (p in set(ids)), p
