"""Timing of side-by-side generation (`python -m bench.copies_timing`; issue 29 item 2): SmolLM2 at 80 %, three prompts × 32 tokens, dense + plan + asvd baseline.

before      = the old dashboard path: allocate the baseline, build both copies (deep copy + compress_, one
              module after the other), then each prompt alone, model after model (key/value cache).
after first = the new path with an empty copy cache: allocate the baseline (asvd decompositions), build the
              two copies through CopyCache (layers shared out over the threads), stream the tokens (each
              model decodes the three prompts together; models take turns).
after again = the same request again (copies from the cache).
Each scenario starts from a fresh Analysis holding the pca/fasc summaries the dashboard has computed
("analysis already computed"); wall and process CPU seconds, with the load average.
"""
import copy, json, os, time
import torch
import fasc
from fasc.allocate import Plan, allocate
from fasc.comparison import baseline_plan
from fasc.config import CalibConfig, CompressConfig
from fasc.copies import CopyCache, copy_key
from fasc.data import load_probe, load_source, make_batches
from fasc.generate import greedy_continuation, seconds_per_new_token, stream_continuations
from fasc.modules import model_fingerprint
from fasc.pipeline import analysis_cached, calibrate_cached, compressed_copy, model_defaults
from fasc.surgery import compress_, compute_factors

def load():
    return os.getloadavg()[0]

def clock():
    return time.perf_counter(), time.process_time()

def since(t):
    return round(time.perf_counter() - t[0], 1), round(time.process_time() - t[1], 1)

spec = "smollm2"
T = clock()
model, tok = fasc.load_model(spec)
d = model_defaults(spec)
cfg = CalibConfig(n_tokens=2048, seq_len=d.seq_len, batch_size=8, fisher="empirical", temperature=d.temperature,
                  targets="all", seed=0)
files = d.calib_files
src = [load_source(p) for p in files] if len(files) > 1 else load_source(files[0])
name = " + ".join(p.name for p in files)
batches = make_batches(tok, src, cfg, name=name)
fp = model_fingerprint(model)
stats, hit = calibrate_cached(model, batches, cfg, model_fp=fp)
gamma = d.gamma
an, ahit = analysis_cached(model, stats, CompressConfig(gamma=gamma))
print(f"setup (not timed): {since(T)} s wall/cpu, calibration cached {hit}, analysis cached {ahit}, "
      f"{len(stats.fqns)} modules, torch threads {torch.get_num_threads()}", flush=True)
plan = allocate(an, "fasc", param_ratio=0.8, model_fp=fp)
prompts = [e.prompt for e in load_probe(d.probe)[:3]]
N = 32
res = {"prompts": prompts, "tokens": N, "plan_ratio": plan.totals(an).ratio}

def fresh():
    a, _ = analysis_cached(model, stats, CompressConfig(gamma=gamma))
    return a

# ---- before: the old path
an = fresh()
L0, T = load(), clock()
base = baseline_plan(an, plan, "asvd")       # the old knowledge.baseline_plan: same ranks (greedy)
t_alloc = since(T)
def old_copy(p):   # the old build: one module after the other
    an.default_workers = lambda: 1
    try:
        w = copy.deepcopy(model); compress_(w, an, p); return w
    finally:
        del an.default_workers
m1 = old_copy(plan); m2 = old_copy(base)
t_build = since(T)
# the old decoding: one prompt at a time, model after model
rows = [{n: greedy_continuation(m, tok, p, N) for n, m in {"uncompressed": model, "plan": m1, "asvd": m2}.items()}
        for p in prompts]
res["before"] = {"wall_cpu": since(T), "alloc": t_alloc, "alloc+build": t_build, "load": [L0, load()]}
print("before", res["before"], flush=True)
old_text = {n: [r[n] for r in rows] for n in ("uncompressed", "plan", "asvd")}
del m1, m2

# ---- the estimate the page shows before the first run (sample one layer per method; decode speed)
an = fresh()
def sample(method):
    fq = [f for f in plan.ranks if ".layers.0." in f]
    t = time.perf_counter()
    compute_factors(an, Plan(ranks={f: plan.ranks[f] for f in fq}, methods={f: method for f in fq}))
    return (time.perf_counter() - t) / len(fq)
s_f, s_a = sample("fasc"), sample("asvd")
step = seconds_per_new_token(model, tok, batch=len(prompts))
n = len(plan.ranks)
workers = max(1, an.default_workers())      # a build shares the layers out over the threads
est_build = (n * s_f + n * s_a * (1 if an.decomposed(("asvd",)) else 2)) / workers
est_gen = 3 / min(3, torch.get_num_threads()) * (N + 1) * step   # the three models decode side by side
res["estimate"] = {"build": round(est_build, 1), "generate": round(est_gen, 1), "per_module_fasc": s_f,
                   "per_module_asvd": s_a, "step": step}
print("estimate", res["estimate"], flush=True)

# ---- after: the new path
an = fresh()
cache = CopyCache()
key = lambda p: copy_key("smollm2 · cpu · float32", stats.key, gamma, p.key())
def run():
    T = clock()
    an.precompute(("asvd",))   # what copies.baseline_plan does first (with a progress bar)
    b = baseline_plan(an, plan, "asvd")
    ta = since(T)
    cp = cache.get(key(plan), lambda: compressed_copy(model, an, plan))[0]
    cb = cache.get(key(b), lambda: compressed_copy(model, an, b))[0]
    tb = since(T)
    texts = {k: [""] * len(prompts) for k in ("uncompressed", "plan", "asvd")}
    for i, nm, text, done in stream_continuations({"uncompressed": model, "plan": cp, "asvd": cb}, tok, prompts, N):
        texts[nm][i] = text
    return {"wall_cpu": since(T), "alloc": ta, "alloc+build": tb}, texts
L0 = load(); r, texts = run(); r["load"] = [L0, load()]; res["after_first"] = r
print("after first", r, flush=True)
L0 = load(); r, texts2 = run(); r["load"] = [L0, load()]; res["after_again"] = r
print("after again", r, flush=True)
res["builds"] = cache.builds_
res["same_text"] = texts == old_text == texts2
print(json.dumps(res, indent=1))
for i, p in enumerate(prompts):
    print(p, "|", " | ".join(texts[k][i].replace("\n", " ")[:60] for k in texts))
