"""`fasc report --knowledge-map` and `fasc eval --generate` end to end on a tiny saved model."""

import json

import pytest

from helpers import run_cli as run


def test_report_knowledge_map(capsys, common, saved_llama, tmp_path):
    probe = str(saved_llama / "probe.jsonl")
    code, out, err = run(capsys, "report", *common, "--knowledge-map", "--probe", probe, "--share", "0.3", "--json")
    assert code == 0, err
    rep = json.loads(out)
    km = rep["knowledge_map"]
    assert km["n_facts"] == 3 and km["share"] == 0.3 and km["method"] == "asvd" and not km["from_cache"]
    assert len(rep["modules"]) == 14
    for m in rep["modules"]:
        assert {"knowledge_loss", "recall_drop", "fisher_energy", "fisher_energy_answers"} <= set(m)
        assert -1 <= m["recall_drop"] <= 1 and m["fisher_energy"] >= 0
    assert any(abs(m["knowledge_loss"]) > 1e-4 for m in rep["modules"])
    names = [c["statistic"] for c in km["correlations"]]
    assert names[0].startswith("ρ") and "Fisher energy, probe answers" in names
    assert all(c["n_modules"] == 14 for c in km["correlations"])
    # again: from the cache, same figures; text output names the correlations
    code, out, _ = run(capsys, "report", *common, "--knowledge-map", "--probe", probe, "--share", "0.3", "--json")
    again = json.loads(out)
    assert again["knowledge_map"]["from_cache"] is True
    assert [m["knowledge_loss"] for m in again["modules"]] == [m["knowledge_loss"] for m in rep["modules"]]
    code, out, _ = run(capsys, "report", *common, "--knowledge-map", "--probe", probe, "--share", "0.3")
    assert code == 0 and "Spearman" in out and "14 modules" in out

    # at a plan's ranks: only the planned modules
    code, _, err = run(capsys, "compress", *common, "--param-ratio", "0.5", "--modules", "mlp", "--out",
                       str(tmp_path / "c"), "--save-plan", str(tmp_path / "plan.json"))
    assert code == 0, err
    code, out, err = run(capsys, "report", *common, "--knowledge-map", "--probe", probe, "--ranks",
                         str(tmp_path / "plan.json"), "--json")
    assert code == 0, err
    rows = [m for m in json.loads(out)["modules"] if "knowledge_loss" in m]
    assert len(rows) == 6 and all(m["kind"] in ("gate", "up", "down") for m in rows)


@pytest.mark.parametrize("extra, msg", [
    (["--share", "1.5"], "share must be in"),
    (["--share", "0.5", "--ranks", "plan.json"], "not both"),
    (["--max-facts", "0"], "max-facts"),
    (["--ranks", "missing.json"], "does not exist"),
])
def test_knowledge_map_errors_are_one_line(capsys, common, saved_llama, extra, msg):
    code, out, err = run(capsys, "report", *common, "--knowledge-map", "--probe", str(saved_llama / "probe.jsonl"),
                         *extra)
    assert code == 2 and out == "" and msg in err and err.count("\n") == 1


def test_knowledge_map_options_without_the_flag(capsys, common):
    code, out, err = run(capsys, "report", *common, "--share", "0.5")
    assert code == 2 and "belong to --knowledge-map" in err and err.count("\n") == 1


def test_knowledge_map_bad_probe_is_one_line(capsys, common, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "the cat"}\n')
    code, _, err = run(capsys, "report", *common, "--knowledge-map", "--probe", str(bad))
    assert code == 2 and err.startswith("error:") and err.count("\n") == 1


def test_eval_generate_side_by_side(capsys, saved_llama):
    model = str(saved_llama / "model")
    base = ["eval", "--model", model, "--text", str(saved_llama / "heldout.txt"), "--probe",
            str(saved_llama / "probe.jsonl"), "--quiet"]
    code, out, err = run(capsys, *base, "--generate", "the cat sat", "a big", "--new-tokens", "4",
                         "--compare", model, "--json")
    assert code == 0, err
    ev = json.loads(out)
    gens = ev["generations"]
    assert [g["prompt"] for g in gens] == ["the cat sat", "a big"] and ev["new_tokens"] == 4
    assert all(set(g) == {"prompt", model} for g in gens)  # the same model twice: one column
    assert all(len(g[model].split()) <= 4 for g in gens) and ev["perplexity"] > 1
    code, out, _ = run(capsys, *base, "--generate", "the cat sat", "--new-tokens", "3")
    assert code == 0 and "'the cat sat'" in out


@pytest.mark.parametrize("extra, msg", [
    (["--compare", "demo"], "--compare needs --generate"),
    (["--generate", "the cat", "--new-tokens", "0"], "must be in"),
    (["--generate", "  "], "empty"),
])
def test_eval_generate_errors_are_one_line(capsys, saved_llama, extra, msg):
    code, out, err = run(capsys, "eval", "--model", str(saved_llama / "model"), "--text",
                         str(saved_llama / "heldout.txt"), "--probe", str(saved_llama / "probe.jsonl"), "--quiet",
                         *extra)
    assert code == 2 and msg in err and err.count("\n") == 1
