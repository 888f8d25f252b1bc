"""Identifier canonicalisation, rejection and duplicates (docs/protocol.md §3.2, test P3)."""

from __future__ import annotations

import pytest

from protocols.errors import DataError
from psi.canon import DuplicatePolicy, IdType, RejectReason, canonicalize, prepare_ids


@pytest.mark.parametrize(
    "raw, id_type, expected",
    [
        (" Alice@EXAMPLE.com ", IdType.EMAIL, "alice@example.com"),
        ("alice@example.com", IdType.EMAIL, "alice@example.com"),
        (
            "ＡＬＩＣＥ@ｅｘａｍｐｌｅ.com",
            IdType.EMAIL,
            "alice@example.com",
        ),  # full-width look-alikes (NFKC)
        ("STRASSE@example.com", IdType.EMAIL, "strasse@example.com"),
        ("+41 (44) 123-45-67", IdType.PHONE, "+41441234567"),
        ("+41.44.123.45.67", IdType.PHONE, "+41441234567"),
        (" 756.1234.5678.97 ", IdType.NATIONAL_ID, "756.1234.5678.97"),
        ("ab-12 34 c", IdType.NATIONAL_ID, "AB1234C"),
        ("  Customer 17\t", IdType.GENERIC, "Customer 17"),
        (b"bytes-id", IdType.GENERIC, "bytes-id"),
    ],
)
def test_canonical_forms(raw: object, id_type: IdType, expected: str) -> None:
    assert canonicalize(raw, id_type) == expected


def test_cyrillic_look_alike_stays_a_different_id() -> None:
    latin = canonicalize("alice@example.com", IdType.EMAIL)
    cyrillic = canonicalize("аlice@example.com", IdType.EMAIL)  # U+0430, not NFKC-equivalent
    assert latin != cyrillic and isinstance(cyrillic, str)


@pytest.mark.parametrize(
    "raw, id_type, reason",
    [
        ("", IdType.GENERIC, RejectReason.EMPTY),
        ("   ", IdType.GENERIC, RejectReason.EMPTY),
        (None, IdType.GENERIC, RejectReason.MISSING),
        (float("nan"), IdType.GENERIC, RejectReason.MISSING),
        ("x" * 257, IdType.GENERIC, RejectReason.TOO_LONG),
        ("é" * 129, IdType.GENERIC, RejectReason.TOO_LONG),  # 258 bytes in UTF-8
        ("ab\x00cd", IdType.GENERIC, RejectReason.CONTROL_CHARACTER),
        ("ab\x85cd", IdType.GENERIC, RejectReason.CONTROL_CHARACTER),
        (b"\xff\xfe", IdType.GENERIC, RejectReason.INVALID_UTF8),
        ("not-an-email", IdType.EMAIL, RejectReason.PATTERN),
        ("a@b@c", IdType.EMAIL, RejectReason.PATTERN),
        ("0041441234567", IdType.PHONE, RejectReason.PATTERN),
        ("+12", IdType.PHONE, RejectReason.PATTERN),
    ],
)
def test_rejections(raw: object, id_type: IdType, reason: RejectReason) -> None:
    assert canonicalize(raw, id_type) is reason


def test_prepare_counts_and_encodes() -> None:
    prepared = prepare_ids(
        ["a@x.org", "", "bad", " A@X.org"], id_type=IdType.EMAIL, duplicates=DuplicatePolicy.FIRST
    )
    assert prepared.canonical == [b"email:a@x.org"]
    assert prepared.rows.tolist() == [0]
    assert prepared.rejected == {"empty": 1, "pattern": 1}
    assert prepared.duplicates == 1
    assert prepared.summary()["usable_ids"] == 1


def test_duplicates_are_an_error_naming_column_and_rows() -> None:
    with pytest.raises(DataError) as info:
        prepare_ids(
            ["zq9", "b", " zq9 "], id_type=IdType.GENERIC, column="customer_id", source="bank.csv"
        )
    message = str(info.value)
    assert (
        "bank.csv" in message
        and "'customer_id'" in message
        and "row 2" in message
        and "row 0" in message
    )
    assert "zq9" not in message  # names rows, never the id itself


def test_latest_keeps_the_newest_row() -> None:
    prepared = prepare_ids(
        ["a", "b", "a", "a"],
        id_type=IdType.GENERIC,
        duplicates=DuplicatePolicy.LATEST,
        timestamps=[3, 1, 9, 5],
    )
    assert dict(zip(prepared.canonical, prepared.rows.tolist(), strict=True)) == {
        b"generic:a": 2,
        b"generic:b": 1,
    }
