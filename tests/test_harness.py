"""lm-evaluation-harness: the offline `fasc_facts` task scores like `fasc eval`; standard tasks fail in one line offline."""

import json

import pytest
import torch

import fasc
from fasc.data import Example
from fasc.evaluate import fact_recall

from helpers import WORDS, tiny_model

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def probe_half_known(model, tok, n=24, seed=0) -> list[Example]:
    """Facts whose answer is the model's own top-1 word for even lines and another word for odd ones,
    so recall is neither 0 nor 1 on a random model."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (4,), generator=g).tolist())
        with torch.no_grad():
            top = model(input_ids=torch.tensor([tok(prompt)["input_ids"]])).logits[0, -1].argmax()
        best = tok.decode([int(top)]).strip()
        if best not in WORDS:  # a special token: take any word
            best = WORDS[i % len(WORDS)]
        answer = best if i % 2 == 0 else next(w for w in WORDS[i % 7:] if w != best)
        out.append(Example(prompt, answer, relation=f"r{i % 3}"))
    return out


def test_fasc_facts_recall_equals_fasc_eval_on_a_tiny_model(tokenizer, tmp_path):
    from fasc.harness import run_tasks

    model = tiny_model("llama")
    examples = probe_half_known(model, tokenizer)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("\n".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "relation": e.relation})
                               for e in examples))
    ref = fact_recall(model, tokenizer, examples)
    assert 0 < ref.first_token < 1
    out = run_tasks(model, tokenizer, ["fasc_facts"], probe=probe, batch_size=8)
    got = out["results"]["fasc_facts"]
    assert out["n_samples"]["fasc_facts"] == len(examples)
    assert got["recall"] == pytest.approx(ref.first_token, abs=1e-12)
    assert got["exact_match"] == pytest.approx(ref.exact, abs=1e-12)
    assert 0 <= got["acc"] <= 1


def test_unknown_and_uncached_tasks_fail_in_one_line(tokenizer, tmp_path, monkeypatch):
    from fasc.harness import _load_task

    with pytest.raises(fasc.FascError, match="no task 'nosuch'"):
        _load_task("nosuch", type("M", (), {"all_tasks": ["wikitext"]})(), None, tokenizer, True)

    class Manager:  # a known name whose dataset cannot be read offline
        all_tasks = ["wikitext"]

    import lm_eval.tasks

    def no_data(names, manager):
        raise ConnectionError("Couldn't reach 'EleutherAI/wikitext_document_level' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", no_data)
    with pytest.raises(fasc.FascError, match="'wikitext' needs its dataset.*wikitext_document_level"):
        _load_task("wikitext", Manager(), None, tokenizer, True)


def test_cli_eval_tasks_json(saved_llama, capsys):
    from fasc.cli import main

    rc = main(["eval", "--model", str(saved_llama / "model"), "--probe", str(saved_llama / "probe.jsonl"),
               "--tasks", "fasc_facts", "--limit", "2", "--json", "--quiet"])
    assert rc == 0
    out, err = capsys.readouterr()
    obj = json.loads(out)
    assert err == ""  # --quiet: lm-eval's own progress bars and notes are dropped too
    assert obj["n_samples"]["fasc_facts"] == 2 and set(obj["lm_eval"]["fasc_facts"]) == {"recall", "exact_match", "acc"}


@pytest.mark.slow
def test_fasc_facts_on_a_compressed_demo_model_equals_fasc_eval(tmp_path):
    """On the demo model cut to rank 32 by plain SVD (recall drops below 1): same recall as `fasc eval`,
    through the factored export loaded by plain transformers."""
    from transformers import AutoModelForCausalLM

    from fasc.harness import run_tasks
    from fasc.layers import LowRankLinear
    from fasc.modules import find_linears
    from fasc.pipeline import model_defaults
    from fasc.surgery import replace_module

    model, tok = fasc.load_model("demo")
    for f in (i.fqn for i in find_linears(model)):
        W = model.get_submodule(f).weight.detach()
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        replace_module(model, f, LowRankLinear.from_factors(U[:, :32] * S[:32], Vh[:32].T))
    out = fasc.save_compressed(model, tok, tmp_path / "svd32")
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    probe = model_defaults("demo").probe
    examples = fasc.load_probe(probe)[:300]
    ref = fact_recall(hf, tok, examples)
    assert 0.05 < ref.first_token < 0.95
    got = run_tasks(hf, tok, ["fasc_facts"], probe=probe, limit=300, batch_size=32)["results"]["fasc_facts"]
    assert got["recall"] == pytest.approx(ref.first_token, abs=1e-12)
    assert got["exact_match"] == pytest.approx(ref.exact, abs=1e-12)


def test_the_shipped_yaml_loads_through_lm_eval_task_manager(saved_llama):
    """`lm_eval --include_path TASK_DIR --tasks fasc_facts`: the YAML's task reads the probe and the
    tokenizer named in lm-eval's metadata (`pretrained`, as `--model_args` passes it)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    from fasc.lm_tasks import TASK_DIR

    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False,
                          metadata={"pretrained": str(saved_llama / "model"), "probe": str(saved_llama / "probe.jsonl")})
    task = get_task_dict(["fasc_facts"], manager)["fasc_facts"]
    docs = list(task.test_docs())
    assert [d["answer"] for d in docs] == ["mat", "land", "apple"]
    assert all(d["first_exact"] for d in docs) and docs[0]["first"] == " mat"
    assert docs[0]["distractors"] == ["apple"]  # the other answer of relation r1
