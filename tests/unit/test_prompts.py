"""PromptTemplate: atoms, formatting, attribute drop, validation, serialisation."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_item_embed.prompts import PromptTemplate, format_value

BEAUTY = PromptTemplate("This beauty product has the following attributes:",
                        {"title": "name", "brand": "brand", "categories": "category", "price": "price"})


def test_render_matches_paper_format(items_df):
    row = items_df.iloc[0].to_dict()
    assert BEAUTY.render(row) == ("This beauty product has the following attributes: name is Red lipstick; "
                                  "brand is OPI; category is Beauty, Makeup; price is 9.99.")


def test_missing_values_are_omitted(items_df):
    rows = items_df.to_dict("records")
    assert BEAUTY.atoms(rows[1]) == ["name is Blue shampoo", "category is Beauty, Hair", "price is 4.5"]  # None
    assert BEAUTY.atoms(rows[3]) == ["name is Hair serum", "category is Hair"]  # whitespace brand, NaN price
    assert BEAUTY.atoms(rows[5]) == ["name is Eye liner", "category is Makeup", "price is 7.25"]  # NaN brand
    for row in rows:
        assert "nan" not in BEAUTY.render(row).lower().replace("name is", "")


@pytest.mark.parametrize("value, text", [
    (9.99, "9.99"), (12.0, "12"), (np.float64(3.0), "3"), (np.float32(9.99), "9.99"), (0.1 + 0.2, "0.3"),
    (np.int64(7), "7"), (True, "true"), ("  spaced   out ", "spaced out"), (["a", None, "b"], "a, b"),
    (("x", 2.0), "x, 2"), (np.array([1.5, 2.0]), "1.5, 2"), (b"bytes", "bytes"),
    (None, None), (np.nan, None), (float("inf"), None), ("", None), ("   ", None), ([], None),
    ([None, np.nan, " "], None), (pd.NA, None),
])
def test_format_value(value, text):
    assert format_value(value) == text


def test_non_string_values_are_converted():
    t = PromptTemplate("", {"a": "a", "b": "b", "c": "c"})
    assert t.render({"a": 3, "b": {"k": 1}, "c": pd.Timestamp("2020-01-02")}) == \
        "a is 3; b is {'k': 1}; c is 2020-01-02 00:00:00."


def test_empty_instruction_and_custom_separator():
    t = PromptTemplate("", {"a": "A", "b": "B"}, separator=" | ", end="")
    assert t.render({"a": 1, "b": "x"}) == "A is 1 | B is x"


def test_fields_none_uses_every_non_id_column(items_df):
    t = PromptTemplate()
    t.validate(items_df, "item_id")
    assert [c for c, _ in t.columns()] == ["title", "brand", "categories", "price"]
    text = t.render(items_df.iloc[0].to_dict())
    assert "item_id" not in text and "a1" not in text
    assert text.startswith("This item has the following attributes: title is Red lipstick; brand is OPI")


def test_fields_none_without_table_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a table"):
        PromptTemplate().columns()


def test_drop_is_reproducible_and_drops_something(items_df):
    row = items_df.iloc[0].to_dict()
    a = [BEAUTY.render(row, 0.5, np.random.default_rng(3)) for _ in range(3)]
    b = [BEAUTY.render(row, 0.5, np.random.default_rng(3)) for _ in range(3)]
    assert a == b
    views = {BEAUTY.render(row, 0.5, np.random.default_rng(s)) for s in range(40)}
    assert len(views) > 4  # really random
    full = BEAUTY.atoms(row)
    prefix = BEAUTY.instruction + " "
    for v in views:
        kept = v[len(prefix):-1].split("; ")
        assert kept and set(kept) <= set(full)


def test_drop_rate_is_about_right():
    t = PromptTemplate("", {f"c{i}": f"c{i}" for i in range(10)})
    row = {f"c{i}": i for i in range(10)}
    rng = np.random.default_rng(0)
    kept = [len(t.drop(t.atoms(row), 0.2, rng)) for _ in range(2000)]
    assert abs(np.mean(kept) / 10 - 0.8) < 0.02


def test_bad_drop_prob():
    with pytest.raises(ValueError, match="drop_prob"):
        BEAUTY.render({"title": "x"}, drop_prob=1.0)


def test_render_views_shape_and_positives_differ(items_df):
    rows = items_df.to_dict("records")
    views = BEAUTY.render_views(rows, n_views=3, drop_prob=0.5, rng=np.random.default_rng(0))
    assert len(views) == 3 and all(len(v) == len(rows) for v in views)
    assert any(views[0][i] != views[1][i] for i in range(len(rows)))
    again = BEAUTY.render_views(rows, n_views=3, drop_prob=0.5, rng=np.random.default_rng(0))
    assert views == again


atom_values = st.one_of(st.none(), st.just(float("nan")), st.text(max_size=8), st.integers(-5, 5),
                        st.floats(allow_nan=True, allow_infinity=False, width=32))


@settings(max_examples=150, deadline=None)
@given(values=st.lists(atom_values, min_size=1, max_size=8), p=st.floats(0.0, 0.99), seed=st.integers(0, 2**32 - 1))
def test_property_never_all_dropped_and_reproducible(values, p, seed):
    t = PromptTemplate("I:", {f"c{i}": f"n{i}" for i in range(len(values))})
    row = {f"c{i}": v for i, v in enumerate(values)}
    atoms = t.atoms(row)
    kept = t.drop(atoms, p, np.random.default_rng(seed))
    if atoms:
        assert 1 <= len(kept) <= len(atoms)
        assert all(k in atoms for k in kept)
        # order is preserved
        assert [a for a in atoms if a in kept] == kept or len(set(atoms)) < len(atoms)
    else:
        assert kept == []
    assert t.render(row, p, np.random.default_rng(seed)) == t.render(row, p, np.random.default_rng(seed))
    for a in atoms:
        assert " is " in a and "nan" != a.split(" is ", 1)[1]


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_property_high_drop_keeps_exactly_one_atom_sometimes(n, seed):
    t = PromptTemplate("", {f"c{i}": f"c{i}" for i in range(n)})
    kept = t.drop(t.atoms({f"c{i}": i for i in range(n)}), 0.99, np.random.default_rng(seed))
    assert len(kept) >= 1


def test_validate_errors(items_df):
    with pytest.raises(KeyError, match="'sku'"):
        BEAUTY.validate(items_df, "sku")
    with pytest.raises(ValueError, match="empty"):
        BEAUTY.validate(items_df.iloc[:0], "item_id")
    dup = pd.concat([items_df, items_df.iloc[[2, 4]]])
    with pytest.raises(ValueError, match=r"2 item id\(s\).*'c3'.*'e5'"):
        BEAUTY.validate(dup, "item_id")
    bad = PromptTemplate("x", {"title": "name", "colour": "colour"})
    with pytest.raises(KeyError, match="'colour'"):
        bad.validate(items_df, "item_id")
    empty_item = items_df.copy()
    empty_item.loc[6, ["title", "brand", "categories"]] = [None, "  ", None]
    empty_item.loc[6, "price"] = np.nan
    with pytest.raises(ValueError, match="'g7'"):
        BEAUTY.validate(empty_item, "item_id")
    with pytest.raises(ValueError, match="no attribute column"):
        PromptTemplate().validate(items_df[["item_id"]], "item_id")
    BEAUTY.validate(items_df, "item_id")  # the good table passes


def test_integer_ids_are_checked_as_strings():
    df = pd.DataFrame({"item_id": [1, 2, 1], "title": ["a", "b", "c"]})
    with pytest.raises(ValueError, match="'1'"):
        PromptTemplate().validate(df, "item_id")


def test_to_dict_from_dict_round_trip_keeps_field_order(items_df):
    t = PromptTemplate("Z:", {"title": "name", "brand": "brand", "categories": "category"}, separator=" ; ")
    d = json.loads(json.dumps(t.to_dict(), sort_keys=True))  # writers may sort keys
    t2 = PromptTemplate.from_dict(d)
    assert t2 == t
    assert t2.render(items_df.iloc[0].to_dict()) == t.render(items_df.iloc[0].to_dict())
    auto = PromptTemplate()
    auto.validate(items_df, "item_id")
    auto2 = PromptTemplate.from_dict(json.loads(json.dumps(auto.to_dict(), sort_keys=True)))
    assert list(auto2.fields) == ["title", "brand", "categories", "price"]
    with pytest.raises(ValueError, match="unknown"):
        PromptTemplate.from_dict({"instruction": "x", "colour": 1})
