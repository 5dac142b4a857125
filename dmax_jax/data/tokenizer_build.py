"""Build small HF tokenizers (``tokenizer.json`` + chat template) for tests and the embedded demo.

Why: the real LLaDA2 tokenizer cannot be downloaded here, but every code path must load tokenizers
exactly as it loads the real ones (``transformers.AutoTokenizer`` from a directory). The special-token
layout and the chat template mimic LLaDA2/Ling (algorithm §3): ``<role>HUMAN</role>…<|role_end|>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

# Fixed ids 0..5 so that tiny test configs can hard-wire eos=pad=1, mask=2.
SPECIAL_TOKENS = ["<unk>", "<|endoftext|>", "<|mask|>", "<role>", "</role>", "<|role_end|>"]
EOS_TOKEN, MASK_TOKEN = "<|endoftext|>", "<|mask|>"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set role = message['role'] | lower -%}"
    "{%- if role == 'user' -%}{%- set tag = 'HUMAN' -%}"
    "{%- elif role == 'assistant' -%}{%- set tag = 'ASSISTANT' -%}"
    "{%- else -%}{%- set tag = 'SYSTEM' -%}{%- endif -%}"
    "<role>{{ tag }}</role>{{ message['content'] }}<|role_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<role>ASSISTANT</role>{%- endif -%}"
)

_BASE_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,:;!?$%#'\"()+-*/=<>[]{}_\\^&@|~`"
)


def build_tokenizer(out_dir: str | os.PathLike, corpus: Iterable[str] | None = None,
                    vocab_size: int = 384, *, whole_numbers: bool = False) -> str:
    """Train a byte-level BPE tokenizer and save it as an HF directory.

    Digits are split one per token, or with ``whole_numbers`` a run of digits is kept as one
    pre-token so that the BPE can merge each frequent number into a single piece (the caller checks
    that it did). ``corpus`` defaults to a tiny built-in text so tests need no data. Returns ``out_dir``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=not whole_numbers),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    texts = list(corpus) if corpus is not None else [_BASE_ALPHABET, _DEFAULT_TEXT]
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
        mask_token=MASK_TOKEN, additional_special_tokens=["<role>", "</role>", "<|role_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return os.fspath(out_dir)


_DEFAULT_TEXT = (
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\n"
    "Let's think step by step\nAnswer: Tom has 3 + 4 = 7 apples.\n#### 7\n"
    "The quick brown fox jumps over the lazy dog. A robe takes 2 bolts of blue fiber and half that "
    "much white fiber. How many bolts in total does it take? It takes 2/2=1 bolt of white fiber.\n"
)
