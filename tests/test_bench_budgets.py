"""bench.budgets' row selection and its cache of the dense model's results (tiny model)."""

from __future__ import annotations

import pytest

import fasc
from bench.budgets import ROW_GROUPS, dense_cached, row_specs, select_rows


def test_row_groups_expand_in_the_tables_order_and_unknown_names_fail():
    specs = row_specs(2048)
    assert [r.name for r in select_rows(specs, ())] == [r.name for r in specs]
    field = select_rows(specs, ("field",))
    assert {(r.method, r.allocation, r.data, tuple(r.flags)) for r in field} == {
        ("asvd", "uniform", "knowledge", ()), ("asvd", "greedy", "knowledge", ()),
        ("fasc", "greedy", "knowledge", ()), ("fasc", "greedy", "knowledge", ("stages",))}
    assert [r for r in specs if r in field] == field
    healed = select_rows(specs, ("field+healing",))
    assert [r for r in healed if r in field] == field
    assert [r.flags for r in healed if r not in field] == [{"heal_tokens": 2048}]
    assert [r.name for r in select_rows(specs, ("dense", "fasc-greedy"))] == ["dense", "fasc-greedy"]
    with pytest.raises(fasc.FascError, match="unknown row 'fasc-greed'.*group.*field"):
        select_rows(specs, ("fasc-greed",))
    assert set(ROW_GROUPS) == {"field", "field+healing"}


def test_rows_without_stages_compress_in_one_stage():
    """`fasc compress` stages budgets below 90 % by default: a subprocess row says --stages 1 unless it asks for
    stages, so that it stays comparable with the one-stage rows computed in-process."""
    from bench.budgets import cli_args

    assert cli_args({"heal_tokens": 64})[-4:] == ["--stages", "1", "--heal-tokens", "64"]
    assert cli_args({"stages": "auto"}) == ["--heal-tokens", "0", "--stages", "auto"]


def test_dense_results_are_computed_once_and_keyed_by_what_they_depend_on(llama, tokenizer, saved_llama, tmp_path):
    facts = fasc.load_probe(saved_llama / "probe.jsonl")
    held = (saved_llama / "heldout.txt").read_text()
    suite = {"tasks": (), "limit": None, "probe": None}
    first, hit1 = dense_cached(llama, tokenizer, facts, held, 128, None, suite, root=tmp_path)
    again, hit2 = dense_cached(llama, tokenizer, facts, held, 128, None, suite, root=tmp_path)
    assert (hit1, hit2) == (False, True)
    assert again == first and len(first["correct"]) == len(facts) and first["perplexity"] > 1
    _, hit3 = dense_cached(llama, tokenizer, facts[:2], held, 128, None, suite, root=tmp_path)
    _, hit4 = dense_cached(llama, tokenizer, facts, held, 128, None, {**suite, "limit": 5}, root=tmp_path)
    assert (hit3, hit4) == (False, False)
    assert len(list(tmp_path.glob("dense-*.json"))) == 3 and not list(tmp_path.glob(".*"))
