"""Calibration (spec §1): statistics equal a brute-force reference, model left as it was, masking."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fasc
from fasc.calibrate import sketch_directions
from fasc.data import Batch
from fasc.modules import weight_matrix

from helpers import ARCHS, random_batches, tiny_model


def reference_stats(model, batches, T=1.0):
    """C_x, C_h, r by storing every token's x and g explicitly (the slow, obvious way)."""
    infos = fasc.find_linears(model)
    mods = dict(model.named_modules())
    xs, gs = {i.fqn: [] for i in infos}, {i.fqn: [] for i in infos}
    outs = {}
    hooks = []
    for i in infos:
        def fwd(mod, inp, out, f=i.fqn):
            xs[f].append(inp[0].detach())
            out.retain_grad()
            outs[f] = out
        hooks.append(mods[i.fqn].register_forward_hook(fwd))
    model = model.eval()
    try:
        for b in batches:
            outs.clear()
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            tm = b.target_mask
            nxt = torch.cat([b.input_ids[:, 1:], b.input_ids[:, :1]], 1)
            loss = F.cross_entropy(logits[tm] / T, nxt[tm], reduction="sum")
            model.zero_grad()
            loss.backward()
            for f, o in outs.items():
                gs[f].append(o.grad.detach())
    finally:
        for h in hooks:
            h.remove()
    ref = {}
    for i in infos:
        sm = torch.cat([b.stat_mask.reshape(-1) for b in batches])
        X = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs[i.fqn]]).double()[sm]
        G = torch.cat([g.reshape(-1, g.shape[-1]) for g in gs[i.fqn]]).double()[sm]
        H = G @ weight_matrix(mods[i.fqn]).double()
        N = X.shape[0]
        ref[i.fqn] = dict(cx=X.T @ X / N, ch=H.T @ H / N, fw=(G.square() * X.square().sum(1, keepdim=True)).mean(0),
                          X=X, H=H)
    return ref


@pytest.mark.parametrize("arch", ARCHS)
def test_statistics_match_bruteforce_reference(arch):
    model = tiny_model(arch)
    batches = random_batches(2)
    cfg = fasc.CalibConfig(n_tokens=10_000, seq_len=24, temperature=2.0, stats_dtype="float64")
    st = fasc.calibrate(model, batches, cfg)
    ref = reference_stats(copy.deepcopy(model), batches, T=2.0)
    assert st.n_tokens == sum(int(b.stat_mask.sum()) for b in batches)
    for f, r in ref.items():
        scale = float(r["ch"].detach().abs().max()) + 1e-30
        assert torch.allclose(st.C_x(f), r["cx"], atol=1e-6 * float(r["cx"].abs().max()))
        assert torch.allclose(st.ch[f], r["ch"], atol=1e-5 * scale), f
        assert torch.allclose(st.fw[f], r["fw"], atol=1e-5 * float(r["fw"].abs().max()) + 1e-30)
        om = sketch_directions(r["X"].shape[1], cfg.sketch_size, cfg.seed)
        xp, hp = (r["X"] @ om).square(), (r["H"] @ om).square()
        assert torch.allclose(st.sketch[f][2], (xp * hp).mean(0), rtol=1e-4, atol=1e-12 * scale)


def test_shared_inputs_share_one_covariance(llama_stats):
    g = llama_stats.group
    assert g["model.layers.0.self_attn.k_proj"] == g["model.layers.0.self_attn.q_proj"]
    assert g["model.layers.0.mlp.up_proj"] == g["model.layers.0.mlp.gate_proj"]
    assert g["model.layers.0.mlp.down_proj"] != g["model.layers.0.mlp.gate_proj"]
    assert len(llama_stats.cx) == 2 * 4  # per layer: q/k/v, o, gate/up, down


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: m.training for n, m in model.named_modules()}, model.config.use_cache)


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


def test_calibration_leaves_model_unchanged():
    model = tiny_model("llama")
    model.train()  # a non-default state that must come back
    model.model.layers[1].mlp.up_proj.weight.requires_grad_(False)
    sd, rg, tr, uc = _snapshot(model)
    fasc.calibrate(model, random_batches(1), fasc.CalibConfig(n_tokens=1000, seq_len=24))
    sd2, rg2, tr2, uc2 = _snapshot(model)
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert rg == rg2 and tr == tr2 and uc == uc2
    assert _hook_count(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_hooks_removed_when_a_step_fails():
    model = tiny_model("llama")
    bad = Batch(torch.full((1, 4), 10_000), torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(Exception):
        fasc.calibrate(model, [bad], fasc.CalibConfig(n_tokens=100, seq_len=4))
    assert _hook_count(model) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_padding_is_masked():
    """Appending padded rows / padding positions does not change the statistics."""
    model = tiny_model("llama")
    b = random_batches(1, bsz=2, L=16)[0]
    cfg = fasc.CalibConfig(n_tokens=1000, seq_len=32)
    st1 = fasc.calibrate(model, [b], cfg)
    ids = torch.cat([b.input_ids, torch.zeros(2, 8, dtype=torch.long)], 1)
    attn = torch.cat([b.attention_mask, torch.zeros(2, 8, dtype=torch.long)], 1)
    tm = torch.cat([b.target_mask, torch.zeros(2, 8, dtype=torch.bool)], 1)
    st2 = fasc.calibrate(model, [Batch(ids, attn, tm)], cfg)
    assert st1.n_tokens == st2.n_tokens == 2 * 15
    for f in st1.ch:
        assert torch.allclose(st1.ch[f], st2.ch[f], rtol=1e-4, atol=1e-10)
        assert torch.allclose(st1.C_x(f), st2.C_x(f), rtol=1e-4, atol=1e-10)


def test_temperature_changes_fisher_and_sampled_fisher_is_reproducible(llama):
    batches = random_batches(1)
    a = fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24))
    b = fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24, temperature=4.0))
    f = "model.layers.1.mlp.down_proj"
    assert not torch.allclose(a.ch[f], b.ch[f])
    s1 = fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24, fisher="sampled"))
    s2 = fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24, fisher="sampled"))
    assert torch.equal(s1.ch[f], s2.ch[f]) and not torch.allclose(s1.ch[f], a.ch[f])


def test_answer_targets_use_only_answer_tokens(tokenizer):
    from fasc.data import Example, make_batches
    exs = [Example("the cat sat on the", "mat"), Example("a big red", "apple")]
    cfg = fasc.CalibConfig(n_tokens=1000, seq_len=32, targets="answers")
    (b,) = make_batches(tokenizer, exs, cfg)
    # one target per row: the position before the answer token
    assert b.target_mask.sum(1).tolist() == [1, 1]
    assert sorted(b.stat_mask.sum(1).tolist()) == [3, 5]  # real tokens up to the one predicting the answer


def test_progress_and_cancel(llama):
    seen = []
    fasc.calibrate(llama, random_batches(2), fasc.CalibConfig(n_tokens=1000, seq_len=24),
                   progress=lambda i, n: seen.append((i, n)))
    assert seen[0][0] == 0 and seen[-1][0] == seen[-1][1] > 0
    with pytest.raises(fasc.FascError, match="cancelled"):
        fasc.calibrate(llama, random_batches(2), fasc.CalibConfig(n_tokens=1000, seq_len=24),
                       progress=lambda i, n: i == 0)
    assert _hook_count(llama) == 0


def test_layers_option_and_merge(llama):
    batches = random_batches(2)
    full = fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24))
    parts = [fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24, layers=(i,)))
             for i in (0, 1)]
    merged = fasc.CalibStats.merge(parts)
    assert merged.fqns == full.fqns
    for f in full.fqns:
        assert torch.allclose(merged.ch[f], full.ch[f], rtol=1e-9, atol=1e-15)


def test_auto_precision_matches_float64(llama):
    """'auto' on CPU (float32 products, float64 sums) agrees with float64 throughout to ~1e-6."""
    batches = random_batches(2)
    a = fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24))
    b = fasc.calibrate(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24, stats_dtype="float64"))
    assert all(t.dtype == torch.float64 for t in a.ch.values())
    for f in a.ch:
        assert float((a.ch[f] - b.ch[f]).norm() / b.ch[f].norm()) < 1e-5
        assert float((a.C_x(f) - b.C_x(f)).norm() / b.C_x(f).norm()) < 1e-5


def test_layers_per_pass_equals_one_pass(llama, tmp_path):
    from fasc.pipeline import calibrate_in_passes
    batches = random_batches(2)
    cfg = fasc.CalibConfig(n_tokens=1000, seq_len=24)
    full = fasc.calibrate(llama, batches, cfg)
    seen = []
    passes = calibrate_in_passes(llama, batches, cfg, 1, progress=lambda i, n: seen.append((i, n)))
    assert passes.fqns == full.fqns and passes.config == cfg and passes.n_tokens == full.n_tokens
    assert seen[-1][0] == seen[-1][1] == 2 * full.n_tokens
    for f in full.fqns:
        assert torch.allclose(passes.ch[f], full.ch[f], rtol=1e-9, atol=1e-15)
        assert torch.allclose(passes.C_x(f), full.C_x(f), rtol=1e-9, atol=1e-15)
    a, _ = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path, layers_per_pass=1)
    b, hit = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path)
    assert hit and a.key == b.key


def test_device_map_auto_and_bfloat16_weights(saved_llama, monkeypatch):
    """`--device auto` (accelerate's device_map) and bf16 weights load and calibrate; on a CPU-only
    machine auto places everything on the CPU and gives the same statistics as a plain load."""
    from transformers import AutoModelForCausalLM

    batches = random_batches(2)
    cfg = fasc.CalibConfig(n_tokens=1000, seq_len=24)
    plain, _ = fasc.load_model(str(saved_llama / "model"))
    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *a, **kw):
        seen.append(kw.get("device_map"))
        return original(cls, *a, **kw)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    auto, _ = fasc.load_model(str(saved_llama / "model"), device="auto")
    monkeypatch.undo()
    assert seen == ["auto"] and auto.model.layers[0].mlp.down_proj.weight.device.type == "cpu"
    a, b = fasc.calibrate(plain, batches, cfg), fasc.calibrate(auto, batches, cfg)
    for f in a.fqns:
        assert torch.allclose(a.ch[f], b.ch[f], rtol=1e-9, atol=1e-15)
    half, _ = fasc.load_model(str(saved_llama / "model"), dtype=torch.bfloat16)
    assert half.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    c = fasc.calibrate(half, batches, cfg)
    for f in a.fqns:  # statistics stay float64 sums; bf16 forward+backward perturbs them by ~1e-2
        assert c.ch[f].dtype == torch.float64 and torch.isfinite(c.ch[f]).all()
        assert float((c.ch[f] - a.ch[f]).norm() / a.ch[f].norm()) < 0.1
        assert float((c.C_x(f) - a.C_x(f)).norm() / a.C_x(f).norm()) < 0.05



def test_model_fingerprint_does_not_depend_on_thread_count():
    """The cache key must not change with torch's thread count: a multi-threaded float64 sum over a
    5 M-element weight rounds differently with 1 and 2 threads (it did, for this seed, before)."""
    from fasc.modules import model_fingerprint

    torch.manual_seed(0)
    w = torch.randn(5_000_000) * 3
    model = torch.nn.Linear(1000, 5000, bias=False)
    with torch.no_grad():
        model.weight.copy_(w.view(5000, 1000))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = model_fingerprint(model)
        torch.set_num_threads(2)
        two = model_fingerprint(model)
    finally:
        torch.set_num_threads(before)
    assert one == two
