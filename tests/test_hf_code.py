"""The factored export loads with plain transformers (`trust_remote_code=True`) into the small model."""


import pytest
import torch

import fasc
from fasc.layers import LowRankLinear

from helpers import VOCAB, compress_tiny

LOGITS_ATOL = 1e-6  # same factors, same two matmuls: equal up to float32 rounding (measured 0.0)


@pytest.fixture(scope="module", params=[("llama", "pivoted"), ("gpt2", "pivoted"), ("opt", "pivoted"), ("llama", "uv")],
                ids=lambda p: "-".join(p))
def exported(request, tokenizer, tmp_path_factory):
    arch, factors = request.param
    model, an, plan, small = compress_tiny(arch)
    out = fasc.save_compressed(small, tokenizer, tmp_path_factory.mktemp("exp") / "out", factors=factors)
    return model, small, out, factors


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def stored_params(small, factors):
    """Parameters of `small` (U, V in memory) as the export stores them: pivoted saves k² a factored module."""
    return n_params(small) - (sum(m.rank ** 2 for m in small.modules() if isinstance(m, LowRankLinear))
                              if factors == "pivoted" else 0)


IDS = torch.randint(5, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))


def test_from_pretrained_with_remote_code_holds_the_factors(exported):
    from transformers import AutoModelForCausalLM

    dense, small, out, factors = exported
    assert {"modeling_fasc.py", "configuration_fasc.py"} <= {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ref, _ = fasc.load_compressed(out)
    assert n_params(hf) == stored_params(small, factors) == n_params(ref) < n_params(dense)
    lowrank = [m for m in hf.modules() if type(m).__name__ in ("LowRankLinear", "PivotedLowRankLinear")]
    assert len(lowrank) == sum(isinstance(m, LowRankLinear) for m in small.modules()) > 0
    with torch.no_grad():
        a, b = hf(input_ids=IDS).logits, ref(input_ids=IDS).logits
    torch.testing.assert_close(a, b, atol=LOGITS_ATOL, rtol=0)
    gen = hf.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 14)
    with torch.no_grad():  # greedy generation continues with the reference model's argmax
        assert int(gen[0, 10]) == int(ref(input_ids=IDS[:1]).logits[0, -1].argmax())


def test_from_config_builds_the_factored_shells(exported):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, small, out, factors = exported
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert cfg.model_type == "fasc" and cfg.fasc_factored
    shells = AutoModelForCausalLM.from_config(cfg, trust_remote_code=True)
    assert n_params(shells) == stored_params(small, factors)


def test_without_remote_code_transformers_refuses_instead_of_loading_random_weights(exported):
    from transformers import AutoModelForCausalLM

    _, _, out, _ = exported
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_pipeline_generates_from_the_folder(exported):
    from transformers import pipeline

    _, _, out, _ = exported
    pipe = pipeline("text-generation", model=str(out), trust_remote_code=True)
    text = pipe("the cat sat on the", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("the cat sat on the") and len(text.split()) > 5


def test_remote_code_is_self_contained():
    """The files written into exports import only torch and transformers (no fasc on the reader's side)."""
    from fasc.hf_code import CODE_FILES, HERE

    for name in CODE_FILES:
        src = (HERE / name).read_text()
        assert "fasc." not in src.replace("configuration_fasc", "").replace("modeling_fasc", "")
        assert "import fasc" not in src
