"""CLIP's BPE tokenizer, built offline from the vocabulary file shipped with fedprompt.

``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's BPE merge list (MIT licence, as
redistributed by open_clip; see ``assets/LICENSE-open_clip``). From it we build the
``vocab``/``merges`` pair that transformers' tokenizers-backed ``CLIPTokenizer`` takes, so
the offline presets tokenize exactly like real CLIP checkpoints (49,408 ids) with no hub.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # merge lines after the header, as in CLIP's SimpleTokenizer
VOCAB_SIZE = 49408
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407


def _read_merges() -> list[tuple[str, str]]:
    raw = resources.files("fedprompt.backbones").joinpath("assets").joinpath(BPE_ASSET).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = []
    for line in lines[1 : 1 + NUM_MERGES]:
        first, second = line.split()
        merges.append((first, second))
    return merges


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    merges = _read_merges()
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP BPE vocabulary has {len(vocab)} entries, expected {VOCAB_SIZE}")
    return vocab, tuple(merges)


def offline_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A ``CLIPTokenizer`` with real CLIP ids, built without any download."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length
    )
