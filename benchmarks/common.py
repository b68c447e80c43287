"""What the benchmark scripts share: memory readings and the tiny word-level models they build.

Each benchmark runs as a script (``python benchmarks/<name>.py``), so this folder is on ``sys.path``
and the scripts ``import common``.
"""

from __future__ import annotations

import resource
from typing import Any


def rss_mb() -> float:
    """This process's resident memory now (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def word_tokenizer(vocab: int) -> Any:
    """A word-level fast tokenizer: ``<pad> <eos> <unk> <bos>`` (ids 0-3), then ``w0 w1 ...``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "<bos>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<bos>"
    )


def gpt2_config(vocab: int, positions: int, heads: int, **extra: Any) -> Any:
    """A random-init GPT-2 of 2 layers x width 128 whose special ids match :func:`word_tokenizer`."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_positions=positions, n_embd=128, n_layer=2, n_head=heads,
        pad_token_id=0, eos_token_id=1, bos_token_id=3, **extra,
    )  # fmt: skip
