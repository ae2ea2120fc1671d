"""Statistics offloaded to disk (fasc.offload): streaming safetensors writes, lazy reads, passes."""

import numpy as np
import torch
from safetensors.torch import load_file

import fasc
from fasc.offload import LazyTensors, tensor_meta, write_safetensors
from fasc.pipeline import calibrate_in_passes
from fasc.stats import CalibStats

from helpers import random_batches


def test_streaming_write_is_a_normal_safetensors_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"cx/a": torch.randn(5, 5, generator=g, dtype=torch.float64),
               "ch/b": torch.randn(3, 7, generator=g).to(torch.bfloat16),
               "fw/c": torch.randn(4, generator=g), "x/empty": torch.zeros(0, 3)}
    items = [(k, *tensor_meta(v), lambda v=v: v) for k, v in tensors.items()]
    write_safetensors(tmp_path / "t.safetensors", items, {"format": "pt"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype
                                             for k, v in tensors.items())
    lazy = LazyTensors.from_file(tmp_path / "t.safetensors", "cx")
    assert list(lazy) == ["a"] and torch.equal(lazy["a"], tensors["cx/a"]) and lazy.nbytes() == 200


def test_passes_offloaded_to_disk_equal_one_pass(llama, tmp_path):
    """--layers-per-pass: each pass goes to disk, the cache entry is written from there tensor by
    tensor, the result reads C_x / C_h lazily, equals a single pass, and nothing is left behind."""
    batches = random_batches(2)
    cfg = fasc.CalibConfig(n_tokens=10_000, seq_len=24)
    one = fasc.calibrate(llama, batches, cfg)
    stats, hit = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path, layers_per_pass=1)
    assert not hit and isinstance(stats.cx, LazyTensors) and isinstance(stats.ch, LazyTensors)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [stats.key]
    for k in one.cx:
        assert torch.allclose(stats.cx[k], one.cx[k], rtol=1e-12, atol=1e-15)
    for k in one.ch:
        assert torch.allclose(stats.ch[k], one.ch[k], rtol=1e-12, atol=1e-15)
    assert stats.nbytes() == one.nbytes()
    again, hit = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path, layers_per_pass=1)
    assert hit and torch.equal(again.cx[next(iter(one.cx))], stats.cx[next(iter(one.cx))])
    a_lazy, a_eager = fasc.Analysis(llama, stats), fasc.Analysis(llama, one)
    for info in one.modules:
        assert np.allclose(a_lazy.curve(info.fqn, "fasc"), a_eager.curve(info.fqn, "fasc"), rtol=1e-8,
                           atol=1e-12 * a_eager.curve(info.fqn, "fasc")[0])


def test_lazy_statistics_save_and_load_round_trip(llama, tmp_path):
    batches = random_batches(1)
    cfg = fasc.CalibConfig(n_tokens=10_000, seq_len=24)
    lazy = calibrate_in_passes(llama, batches, cfg, 1, offload=tmp_path / "off")
    assert isinstance(lazy.cx, LazyTensors) and len(list((tmp_path / "off").iterdir())) == 2
    (tmp_path / "entry").mkdir()
    lazy.save(tmp_path / "entry")  # streamed from the part files
    eager = CalibStats.load(tmp_path / "entry", lazy=False)
    assert not isinstance(eager.cx, LazyTensors)
    assert all(torch.equal(eager.ch[k], lazy.ch[k]) for k in lazy.ch)
    assert eager.fqns == lazy.fqns and eager.group == lazy.group
