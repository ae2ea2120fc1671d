"""Word-level tokenizer of the demo world.

Every word and punctuation mark of the world is exactly one token, so every
answer is a single token. The tokenizer prepends ``<bos>`` when called with
``add_special_tokens=True`` (the default) and never appends ``<eos>``; with
``add_special_tokens=False`` it adds nothing. Leading spaces are ignored, so
``tok(" " + answer, add_special_tokens=False)`` is the answer token alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "save_tokenizer", "words_of"]

#: Special tokens, in id order: ``<pad>`` = 0, ``<unk>`` = 1, ``<bos>`` = 2, ``<eos>`` = 3.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>"]

_PRE_TOKENIZER = pre_tokenizers.Whitespace()


def words_of(texts: Iterable[str]) -> set[str]:
    """Return the set of word-level tokens occurring in ``texts``.

    Args:
        texts: Strings to split with the tokenizer's pre-tokenizer.

    Returns:
        The set of pieces.
    """
    words: set[str] = set()
    for text in texts:
        words.update(piece for piece, _ in _PRE_TOKENIZER.pre_tokenize_str(text))
    return words


def build_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Build the word-level tokenizer for a vocabulary.

    Args:
        words: All words (tokens) of the vocabulary; special tokens are added
            first. Order does not matter: words are sorted for determinism.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<pad>``, ``<unk>``, ``<bos>`` and
        ``<eos>`` set, adding ``<bos>`` in front of every sequence.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in sorted(set(words) - set(SPECIAL_TOKENS)):
        vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = _PRE_TOKENIZER
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B",
        special_tokens=[("<bos>", vocab["<bos>"])],
    )
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        padding_side="right",
        model_max_length=64,
    )
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """Save a tokenizer so that ``AutoTokenizer.from_pretrained(folder)`` loads it.

    Args:
        tok: The tokenizer.
        folder: Target folder (created if missing).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(folder))
    # Name the generic fast-tokenizer class so that the folder does not depend
    # on the tokenizer backend class name of one transformers version.
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
