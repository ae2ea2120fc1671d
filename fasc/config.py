"""Configuration dataclasses (frozen, self-validating; their `help` metadata doubles as CLI help).

Two configs: `CalibConfig` (what statistics to collect, spec §1) and `CompressConfig` (how to turn
statistics into bases, spec §3). Ranks live in `fasc.allocate.Plan`, not in a config.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from .errors import FascError

METHODS = ("svd", "asvd", "pca", "fwsvd", "fasc", "hybrid")
BASE_METHODS = ("svd", "asvd", "pca", "fwsvd", "fasc")  # hybrid resolves to one of these per module
FISHER_TYPES = ("empirical", "sampled")
TARGETS = ("all", "answers")
STATS_DTYPES = ("auto", "float64", "float32")
FACTORS = ("uv", "pivoted")  # how a factored module is stored (fasc.layers): k(m+n) or k(m+n-k) parameters
DEFAULT_FACTORS = "pivoted"  # the same maps in fewer parameters, so higher ranks at a budget (BENCHMARKS.md)
ALLOCATIONS = ("greedy", "anchored", "uniform")  # how a parameter budget is spread (spec §6, fasc.allocate)
ANCHOR_SHARE = 0.5  # anchored allocation: the reference rank keeps this share of a module's parameters
HEAL_CHECK_TOKENS = 2048  # healing's held-out check: tokens from the end of the calibration sources
HEAL_TOKENS_GPU = 65536  # `--heal-tokens auto` on a GPU: the SmolLM2 recipe measured at 80 % (BENCHMARKS.md)
HEAL_COPY_WEIGHT = 1.0  # global healing's KL weight at copy positions (`fasc.heal.copy_positions`); 1 = plain KL
# healing's Adam steps: each sums consecutive calibration batches' gradients until they hold this many real tokens
# (`fasc.heal.step_groups`); 1 = one step a batch, the default: steps of ≥ 2,048 tokens fit the held-out text
# better (SmolLM2 at 80 %: KL 0.2619 against 0.2744) but lose more of LAMBADA (docs/healing-results.md)
HEAL_STEP_TOKENS = 1


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise FascError(msg)


@dataclass(frozen=True)
class CalibConfig:
    """What to collect during calibration (spec §1). Hashes into the cache key (except `device`)."""

    n_tokens: int = field(default=16384, metadata={"help": "number of real calibration tokens (N)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward/backward pass"})
    fisher: str = field(default="empirical", metadata={
        "help": "'empirical' (true next-token targets) or 'sampled' (targets drawn from the model)"})
    temperature: float = field(default=1.0, metadata={
        "help": "softmax temperature T of the calibration loss CE(logits/T) (counters gradient saturation)"})
    targets: str = field(default="all", metadata={
        "help": "'all' tokens carry the loss, or only the 'answers' of prompt/answer lines"})
    sketch_size: int = field(default=64, metadata={"help": "random directions s of the ρ sketch (spec §4)"})
    seed: int = field(default=0, metadata={"help": "seed of the ρ sketch and of sampled targets"})
    stats_dtype: str = field(default="auto", metadata={
        "help": "statistics precision: 'auto' = float32 products summed in float64 on CPU, float32 on GPU; "
                "'float64' everywhere; 'float32' everywhere"})
    layers: tuple[int, ...] | None = field(default=None, metadata={
        "help": "calibrate only these layer indices (bounds memory; merge passes with CalibStats.merge)"})
    device: str = field(default="auto", metadata={
        "help": "where statistics accumulate: 'auto' (beside the module), 'cpu' or a torch device"})

    def __post_init__(self):
        _check(isinstance(self.n_tokens, int) and self.n_tokens > 0,
               f"`n_tokens` must be a positive integer, got {self.n_tokens!r}; pass e.g. --tokens 16384.")
        check_seq_len(self.seq_len)
        _check(isinstance(self.batch_size, int) and self.batch_size >= 1,
               f"`batch_size` must be a positive integer, got {self.batch_size!r}.")
        _check(self.fisher in FISHER_TYPES, f"`fisher` must be one of {FISHER_TYPES}, got {self.fisher!r}.")
        _check(self.targets in TARGETS, f"`targets` must be one of {TARGETS}, got {self.targets!r}.")
        _check(isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 1000,
               f"`temperature` must be in (0, 1000], got {self.temperature!r}; 1 is the plain loss.")
        _check(isinstance(self.sketch_size, int) and 1 <= self.sketch_size <= 4096,
               f"`sketch_size` must be in [1, 4096], got {self.sketch_size!r}.")
        _check(self.stats_dtype in STATS_DTYPES,
               f"`stats_dtype` must be one of {STATS_DTYPES}, got {self.stats_dtype!r}.")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))
            _check(len(self.layers) > 0 and min(self.layers) >= 0,
                   f"`layers` must be non-negative layer indices, got {self.layers!r}.")

    def key_dict(self) -> dict:
        """The fields that change the statistics (the cache key); `device` and `batch_size` do not."""
        d = asdict(self)
        d.pop("device")
        d.pop("batch_size")
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


@dataclass(frozen=True)
class CompressConfig:
    """What an `Analysis` is keyed by: how statistics become bases (spec §3). The method, hybrid τ
    and fallback are arguments of allocation (`fasc.allocate.allocate`), not of the bases."""

    damping: float = field(default=1e-4, metadata={"help": "δ in C + δ·tr(C)/n·I before inverses (spec §3)"})
    gamma: float = field(default=1.0, metadata={
        "help": "Fisher shrinkage γ: 0 = pure Fisher (FASC optimum), ∞ → asvd (spec §3)"})

    def __post_init__(self):
        _check(isinstance(self.damping, (int, float)) and 0 <= self.damping < 1,
               f"`damping` must be in [0, 1), got {self.damping!r}; the default is 1e-4.")
        _check(isinstance(self.gamma, (int, float)) and self.gamma >= 0 and self.gamma == self.gamma,
               f"`gamma` must be >= 0, got {self.gamma!r}; 0 is pure Fisher, large values approach asvd.")


HYBRID_TAU = 0.3                 # hybrid: fasc where ρ ≥ τ ...
HYBRID_FALLBACK = "asvd"         # ... and this variance method elsewhere
FALLBACK_METHODS = ("svd", "asvd", "pca", "fwsvd")
TAU_HELP = "hybrid: use fasc where ρ ≥ τ, else the fallback"
FALLBACK_HELP = "hybrid: variance method used where ρ < τ"


def check_seq_len(seq_len) -> None:
    """A window of at least 2 tokens (one prediction): calibration's rows and perplexity's windows."""
    _check(isinstance(seq_len, int) and 2 <= seq_len <= 1_000_000,
           f"`seq_len` must be an integer >= 2, got {seq_len!r}; pass e.g. --seq-len 256.")


def check_hybrid(tau: float, fallback: str) -> None:
    """Validate the hybrid threshold and fallback (arguments of allocation)."""
    _check(isinstance(tau, (int, float)) and tau == tau, f"`tau` must be a number, got {tau!r}.")
    _check(fallback in FALLBACK_METHODS,
           f"`fallback` must be one of {', '.join(FALLBACK_METHODS)}, got {fallback!r}.")


def field_help(cls, name: str) -> str:
    """The `help` metadata of a config field, for argparse."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(name)
