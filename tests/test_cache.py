"""The content-addressed calibration cache: hits, corruption, atomicity."""

import numpy as np
import pytest
import torch

import fasc
from fasc import cache

from helpers import random_batches


def test_second_run_hits_the_cache(llama, tmp_path):
    batches = random_batches(2)
    cfg = fasc.CalibConfig(n_tokens=1000, seq_len=24)
    st1, hit1 = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path)
    st2, hit2 = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path)
    assert (hit1, hit2) == (False, True)
    assert st1.key == st2.key and len(st1.key) == 32
    for f in st1.ch:
        assert torch.equal(st1.ch[f], st2.ch[f])
    assert st2.group == st1.group and st2.config == cfg
    # another config → another key
    st3, hit3 = fasc.calibrate_cached(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24, temperature=2.0),
                                      root=tmp_path)
    assert not hit3 and st3.key != st1.key
    # batch size and device do not change the key
    assert cache.cache_key("m", "d", cfg) == cache.cache_key("m", "d", fasc.CalibConfig(n_tokens=1000, seq_len=24,
                                                                                       batch_size=3))
    assert not list(tmp_path.glob(".*.incomplete"))


def test_corrupted_entry_is_detected_and_recomputed(llama, tmp_path):
    batches = random_batches(1)
    cfg = fasc.CalibConfig(n_tokens=1000, seq_len=24)
    st, _ = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path)
    f = tmp_path / st.key / "stats.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # truncated
    assert cache.load(st.key, tmp_path) is None
    assert not (tmp_path / st.key).exists()
    st2, hit = fasc.calibrate_cached(llama, batches, cfg, root=tmp_path)
    assert not hit and (tmp_path / st.key / "stats.safetensors").stat().st_size == len(data)


def test_interrupted_store_leaves_no_valid_entry(llama, tmp_path, monkeypatch):
    batches = random_batches(1)
    cfg = fasc.CalibConfig(n_tokens=1000, seq_len=24)

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(fasc.CalibStats, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        fasc.calibrate_cached(llama, batches, cfg, root=tmp_path)
    assert [p for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_spectra_summaries_are_cached_beside_the_statistics(llama, tmp_path):
    batches = random_batches(1)
    st, _ = fasc.calibrate_cached(llama, batches, fasc.CalibConfig(n_tokens=1000, seq_len=24), root=tmp_path)
    cfg = fasc.CompressConfig(gamma=0.5)
    an1, hit1 = fasc.analysis_cached(llama, st, cfg, root=tmp_path)
    an2, hit2 = fasc.analysis_cached(llama, st, cfg, root=tmp_path)
    assert (hit1, hit2) == (False, True)
    assert not an2._bases  # nothing was decomposed the second time
    f = st.fqns[-1]
    assert (an1.curve(f, "fasc") == an2.curve(f, "fasc")).all()
    assert (an1.misalignment(f) == an2.misalignment(f)).all()
    assert torch.equal(an1.fisher_spectrum(f), an2.fisher_spectrum(f))
    assert [r.dl_fasc for r in an1.report()] == [r.dl_fasc for r in an2.report()]
    assert not an2._bases
    _, hit3 = fasc.analysis_cached(llama, st, fasc.CompressConfig(gamma=0.0), root=tmp_path)
    assert not hit3  # another γ, another summary


def test_compression_only_analysis_skips_the_eigh_of_C_x_and_a_later_run_adds_the_diagnostics(llama, tmp_path,
                                                                                             monkeypatch):
    """`fasc compress` (diagnostics=False): fasc summaries whitened by Cholesky, no eigen-decomposition of
    any C_x and no misalignment; a later analysis that wants the diagnostics computes only those, stores
    them, and a third run is a full cache hit with the same numbers as a run that had them from the start."""
    import fasc.spectra

    st, _ = fasc.calibrate_cached(llama, random_batches(1), fasc.CalibConfig(n_tokens=1000, seq_len=24), root=tmp_path)
    cfg = fasc.CompressConfig(gamma=0.0)
    eighs = []
    real = fasc.spectra.Whitening._eig
    monkeypatch.setattr(fasc.spectra.Whitening, "_eig", lambda self: (eighs.append(self.Cx_d.shape[0]), real(self)))
    an1, hit1 = fasc.analysis_cached(llama, st, cfg, ("fasc",), root=tmp_path, diagnostics=False)
    assert not hit1 and eighs == [] and not an1.misalignments
    assert not an1.decomposed(("fasc",))
    an2, hit2 = fasc.analysis_cached(llama, st, cfg, ("fasc",), root=tmp_path)
    assert not hit2 and eighs and set(an2.misalignments) == set(st.fqns)
    eighs.clear()
    an3, hit3 = fasc.analysis_cached(llama, st, cfg, ("fasc",), root=tmp_path)
    assert hit3 and eighs == [] and an3.decomposed(("fasc",))
    ref = fasc.Analysis(llama, st, cfg)
    for f in st.fqns:
        assert np.array_equal(an3.curve(f, "fasc"), an1.curve(f, "fasc"))
        assert np.allclose(an3.misalignment(f), ref.misalignment(f), rtol=0, atol=1e-12)


def test_gguf_plain_copy_is_written_once_when_two_loads_race(tokenizer, tmp_path, monkeypatch):
    """Two loads of the same GGUF model at once (say the CLI beside the dashboard): one dequantizes and
    keeps the plain copy, the other waits for the copy's lock and reads it — no second dequantization,
    no copy swapped under a reader."""
    import threading
    import time

    import fasc.loading as loading

    from helpers import tiny_model

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in: only its digest names the copy")
    real, calls = loading._load_pair, []

    def fake(src, dtype, kw):
        if src.kind != "gguf":
            return real(src, dtype, kw)
        calls.append(src.path)
        time.sleep(1.0)   # dequantizing takes a while: long enough for the other load to arrive
        return tiny_model("llama"), tokenizer

    monkeypatch.setattr(loading, "_load_pair", fake)
    out, errors = [], []

    def load():
        try:
            out.append(fasc.load_model(str(gguf), cache_dir=tmp_path / "cache")[0])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(out) == 2 and len(calls) == 1, (errors, calls)
    a, b = (m.state_dict() for m in out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    copies = [p for p in (tmp_path / "cache" / "models").iterdir() if not p.name.endswith(".lock")]
    assert len(copies) == 1 and (copies[0] / "config.json").is_file()


def test_write_atomic_leaves_the_old_file_or_the_new_one_never_a_half(tmp_path):
    path = tmp_path / "entry.json"
    cache.write_text_atomic(path, "old")
    assert path.read_text() == "old"

    def half(tmp):
        tmp.write_text("ha")
        raise OSError("disk full")

    with pytest.raises(fasc.FascError, match=r"entry.json failed \(disk full\); nothing was kept — free disk space"):
        cache.write_atomic(path, half)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.json"]
    cache.write_text_atomic(path, "new ✓")
    assert path.read_text(encoding="utf-8") == "new ✓"


def test_a_full_disk_is_one_line_and_leaves_nothing_in_the_cache(llama_stats, tmp_path, monkeypatch):
    """safetensors' error on a full disk (not an OSError) becomes one line naming the fix; no entry, no
    half-written folder is left."""
    from safetensors import SafetensorError

    from fasc.stats import CalibStats

    def disk_full(self, folder):
        (folder / "stats.safetensors").write_bytes(b"half")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(CalibStats, "save", disk_full)
    with pytest.raises(fasc.FascError, match=r"cache in .* failed \(No space left on device \(os error 28\)\); "
                                             r"nothing was kept — free disk space, or set FASC_CACHE"):
        cache.store(llama_stats, "k" * 32, tmp_path)
    assert list(tmp_path.iterdir()) == []
