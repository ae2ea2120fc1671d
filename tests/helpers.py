"""Helpers shared by the tests (import them with `from helpers import ...`; fixtures live in
conftest.py): tiny real models built from configs (no hub), a tiny tokenizer, tiny data."""

from __future__ import annotations

import random
from contextlib import contextmanager

import torch

from fasc.data import Batch

VOCAB = 96


def tiny_model(arch: str):
    """A 2-layer model of `arch`, float32, eval mode, fixed seed."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
        m = tf.LlamaForCausalLM(cfg)
    elif arch == "mistral":
        m = tf.MistralForCausalLM(tf.MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, **common))
    elif arch == "qwen2":
        m = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, **common))
    elif arch == "gpt2":
        m = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=128, **common))
    elif arch == "gpt_neox":
        m = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, max_position_embeddings=128, **common))
    elif arch == "opt":
        m = tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                           word_embed_proj_dim=32, max_position_embeddings=128, **common))
    else:
        raise ValueError(arch)
    return m.eval()


ARCHS = ["llama", "mistral", "qwen2", "gpt2", "gpt_neox", "opt"]

WORDS = ("the a cat dog sat ran on under mat house red blue big small and is was of capital city river "
         "north south east west king queen book pen apple tree sun moon star sky sea land").split()


def make_text(n_words: int = 3000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sents = []
    while sum(len(s.split()) for s in sents) < n_words:
        sents.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " .")
    return " ".join(sents)


def make_tokenizer():
    """A word-level PreTrainedTokenizerFast over WORDS (+ specials), vocab < VOCAB."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "."] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")



def random_batches(n_batches: int = 2, bsz: int = 4, L: int = 24, seed: int = 0, pad_rows: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(5, VOCAB, (bsz, L), generator=g)
        attn = torch.ones_like(ids)
        tm = torch.ones_like(ids, dtype=torch.bool)
        tm[:, -1] = False
        out.append(Batch(ids, attn, tm))
    return out


def run_cli(capsys, *argv):
    """`fasc` in-process: (exit code, stdout, stderr)."""
    from fasc.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def compress_tiny(arch: str, rank_ratio: float = 0.25):
    """A tiny model of `arch`, calibrated on random batches and compressed with fasc at `rank_ratio`:
    (dense model, analysis, plan, compressed copy)."""
    import copy

    import fasc

    model = tiny_model(arch)
    st = fasc.calibrate(model, random_batches(2), fasc.CalibConfig(n_tokens=10_000, seq_len=24))
    an = fasc.Analysis(model, st)
    plan = fasc.allocate(an, "fasc", rank_ratio=rank_ratio)
    small = copy.deepcopy(model)
    fasc.compress_(small, an, plan)
    return model, an, plan, small


@contextmanager
def forward_positions(model):
    """Collects the token positions (batch × width, padding included) of every forward of `model` in the
    `with` block: `with forward_positions(m) as seen: …; sum(seen)`."""
    seen: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((kwargs.get("input_ids") if args == () else args[0]).numel()),
        with_kwargs=True)
    try:
        yield seen
    finally:
        hook.remove()
