"""The captured-set comparison (cutover.capture) and the producer's Relation check."""

from __future__ import annotations

import pytest

from cutover.capture import compare
from cutover.errors import SchemaIncompatible
from cutover.mapping import load_mapping
from devtools.harness import MAPPING
from producers.coverage import check_relation

SPEC = load_mapping(MAPPING)


def _published() -> dict[str, list[str]]:
    return {f"shop.{name}": sorted(tm.source_columns_used()) for name, tm in SPEC.tables.items()}


def test_a_covering_publication_has_no_block() -> None:
    assert compare(SPEC, _published()) == []


def test_a_table_out_of_the_publication_blocks_its_domain_only() -> None:
    pub = _published()
    del pub["shop.merchants"]
    (block,) = compare(SPEC, pub)
    assert block[0] == "shop.merchants" and "left the publication" in block[1]
    assert compare(SPEC, pub, "merchant") == [block]
    assert compare(SPEC, pub, "payment") == []


def test_a_renamed_column_blocks_and_an_added_one_does_not() -> None:
    pub = _published()
    pub["shop.merchants"] = [("name" if c == "shop_name" else c) for c in pub["shop.merchants"]]
    pub["shop.users"].append("nickname")
    assert compare(SPEC, pub) == [
        (
            "shop.merchants",
            "mapped column(s) shop_name no longer published (dropped, renamed or removed from "
            "the publication's column list)",
        )
    ]


def test_a_relation_without_a_mapped_column_stops_the_producer() -> None:
    cols = [c for c in _published()["shop.users"] if c != "phone"]
    with pytest.raises(SchemaIncompatible) as err:
        check_relation(SPEC, "shop.users", cols)
    assert err.value.table == "shop.users"
    assert "phone" in str(err.value) and "cutover snapshot --table users`" in str(err.value)
    check_relation(SPEC, "shop.users", [*cols, "phone", "extra"])  # a wider shape passes
