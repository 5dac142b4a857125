"""Spec §3 per-example transform, chat template and special-id resolution."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dmax_jax.config import LLADA2_MASK_ID, ModelConfig, tiny_config
from dmax_jax.data.chat import (
    SpecialIds,
    apply_chat_template,
    chat_text,
    load_tokenizer,
    mask_token_text,
    resolve_special_ids,
)
from dmax_jax.data.tokenizer_build import build_tokenizer
from dmax_jax.data.transforms import BadRow, OputTransform, example_rng, row_messages

SPECIAL = SpecialIds(mask_id=2, eos_id=1, pad_id=1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok")))


def qa(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def reference_example(tok, messages, L, seed, index, epoch, low, high, eos_keep=32):
    """Spec §3 written out independently: HF truncation/padding, explicit per-position loops."""
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    prompt_length = len(tok(prompt, add_special_tokens=False).input_ids)
    ids = tok(full, add_special_tokens=False, truncation=True, max_length=L,
              padding="max_length").input_ids
    labels = list(ids)
    for j in range(min(prompt_length, L)):
        labels[j] = -100
    rng = np.random.default_rng([seed, index, epoch])
    sigma = rng.uniform(low, high)
    u = rng.random(L)
    noisy = list(ids)
    for j in range(L):
        if j >= prompt_length and u[j] < sigma:
            noisy[j] = SPECIAL.mask_id
    run_start = 0
    for j in range(L):
        if ids[j] != tok.pad_token_id:
            run_start = j + 1
    if run_start < L:
        for j in range(max(run_start + eos_keep, prompt_length), L):
            labels[j] = -100
    return ids, noisy, labels, prompt_length


ROWS = [
    qa("Tom has 3 apples and buys 4 more. How many?", "Tom has 3 + 4 = 7 apples.\n#### 7"),
    qa("What is 12 / 2?", "12 / 2 = 6\n#### 6"),
    [{"role": "system", "content": "Be brief."}] + qa("A robe takes 2 bolts?", "2/2=1 bolt.\n#### 3"),
]


@pytest.mark.parametrize("L,eos_keep", [(128, 32), (128, 4), (40, 32)])
def test_transform_matches_hand_built_spec(tok, L, eos_keep):
    t = OputTransform(tok, max_length=L, noise_low=0.3, noise_high=0.8, seed=7, special=SPECIAL,
                      eos_keep=eos_keep)
    for index, messages in enumerate(ROWS):
        out = t.map({"messages": messages, "flag": index % 2 == 0, "example_index": index, "epoch": 3})
        ids, noisy, labels, _ = reference_example(tok, messages, L, 7, index, 3, 0.3, 0.8, eos_keep)
        np.testing.assert_array_equal(out["input_ids"], ids)
        np.testing.assert_array_equal(out["noisy_input_ids"], noisy)
        np.testing.assert_array_equal(out["labels"], labels)
        assert out["flag"] == (index % 2 == 0) and out["example_index"] == index
        assert out["input_ids"].dtype == np.int32 and out["labels"].dtype == np.int32


def test_trailing_eos_rule_and_prompt_never_masked(tok):
    L = 128
    t = OputTransform(tok, max_length=L, noise_low=1.0, noise_high=1.0, seed=0, special=SPECIAL, eos_keep=5)
    out = t.map({"messages": ROWS[1], "flag": True, "example_index": 0, "epoch": 0})
    n_real = len(apply_chat_template(tok, ROWS[1]))
    p = len(apply_chat_template(tok, ROWS[1][:-1], add_generation_prompt=True))
    assert 0 < p < n_real < L - 5
    np.testing.assert_array_equal(out["noisy_input_ids"][:p], out["input_ids"][:p])
    assert (out["noisy_input_ids"][p:] == SPECIAL.mask_id).all()  # sigma = 1 masks the PAD tail too
    assert (out["labels"][:p] == -100).all()
    np.testing.assert_array_equal(out["labels"][p:n_real], out["input_ids"][p:n_real])
    assert (out["labels"][n_real:n_real + 5] == SPECIAL.pad_id).all()  # first eos_keep PADs keep loss
    assert (out["labels"][n_real + 5:] == -100).all()


def test_truncation_keeps_all_response_labels(tok):
    long_answer = "Tom has 3 + 4 = 7 apples. " * 20
    L = 64
    t = OputTransform(tok, max_length=L, noise_low=0.0, noise_high=0.0, seed=0, special=SPECIAL)
    out = t.map({"messages": qa("How many?", long_answer), "flag": False, "example_index": 1, "epoch": 0})
    p = len(apply_chat_template(tok, qa("How many?", long_answer)[:-1], add_generation_prompt=True))
    full = apply_chat_template(tok, qa("How many?", long_answer))
    np.testing.assert_array_equal(out["input_ids"], full[:L])  # right truncation, no PAD run
    np.testing.assert_array_equal(out["labels"][p:], full[p:L])
    np.testing.assert_array_equal(out["noisy_input_ids"], out["input_ids"])  # sigma = 0


def test_prompt_longer_than_window_has_no_loss_and_no_mask(tok):
    t = OputTransform(tok, max_length=16, noise_low=1.0, noise_high=1.0, seed=0, special=SPECIAL)
    out = t.map({"messages": qa("a very long question " * 5, "x"), "flag": True, "example_index": 0,
                 "epoch": 0})
    assert (out["labels"] == -100).all()
    assert not (out["noisy_input_ids"] == SPECIAL.mask_id).any()


def test_noise_keyed_by_seed_index_epoch(tok):
    t = OputTransform(tok, max_length=96, noise_low=0.5, noise_high=0.5, seed=1, special=SPECIAL)
    el = {"messages": ROWS[0], "flag": True, "example_index": 4, "epoch": 0}
    a, b = t.map(el), t.map(dict(el))
    np.testing.assert_array_equal(a["noisy_input_ids"], b["noisy_input_ids"])
    c = t.map(dict(el, epoch=1))
    d = t.map(dict(el, example_index=5))
    np.testing.assert_array_equal(a["input_ids"], c["input_ids"])
    assert (a["noisy_input_ids"] != c["noisy_input_ids"]).any()
    assert (a["noisy_input_ids"] != d["noisy_input_ids"]).any()
    assert example_rng(1, 4, 0).random() == np.random.default_rng([1, 4, 0]).random()


def test_chat_template_ids_are_text_then_encode(tok):
    text = chat_text(tok, ROWS[0], add_generation_prompt=False)
    assert text.startswith("<role>HUMAN</role>") and text.endswith("<|role_end|>")
    assert chat_text(tok, ROWS[0][:1], add_generation_prompt=True).endswith("<role>ASSISTANT</role>")
    assert apply_chat_template(tok, ROWS[0]) == tok(text, add_special_tokens=False).input_ids


def test_row_messages_forms_and_errors():
    assert row_messages({"question": "q", "answer": "a"}) == qa("q", "a")
    msgs = qa("q", "a")
    assert row_messages({"messages": msgs, "flag": True}) == msgs
    bad = [
        ({"question": "q"}, "'answer' must be a string"),
        ({"question": "q", "answer": 3}, "'answer' must be a string"),
        ({"question": "q", "answer": "  "}, "answer is empty"),
        ({"text": "x"}, "neither"),
        ({"messages": msgs[:1]}, "at least 2"),
        ({"messages": msgs[::-1]}, "expected 'assistant'"),
        ({"messages": [{"role": "user"}, msgs[1]]}, "messages[0]"),
        ({"messages": msgs, "question": "q"}, "both"),
        ([1, 2], "expected a JSON object"),
        ({"question": "q <|mask|>", "answer": "a"}, "mask token"),
    ]
    for row, why in bad:
        with pytest.raises(BadRow, match=why.replace("[", r"\[").replace("]", r"\]")):
            row_messages(row, mask_text="<|mask|>")


def test_resolve_special_ids_sources(tok, tmp_path):
    assert resolve_special_ids(None, tok) == SpecialIds(2, 1, 1)
    assert resolve_special_ids(tiny_config(), tok) == SpecialIds(2, 1, 1)
    # config first: a config without a tokenizer
    assert resolve_special_ids(tiny_config(mask_token_id=7, eos_token_id=3, pad_token_id=4), None) \
        == SpecialIds(7, 3, 4)
    with pytest.raises(ValueError, match="mask id conflict"):
        resolve_special_ids(tiny_config(mask_token_id=7), tok)
    assert resolve_special_ids(tiny_config(mask_token_id=7), tok, strict=False).mask_id == 7
    # a config.json without the id keys: ModelConfig's LLaDA2 defaults must not win over the tokenizer
    raw = tiny_config().to_hf_dict()
    for key in ("mask_token_id", "eos_token_id", "pad_token_id"):
        raw.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_json(tmp_path)
    assert cfg.eos_token_id is None  # absent keys are unknown, not the LLaDA2 defaults ...
    assert resolve_special_ids(cfg, tok) == SpecialIds(2, 1, 1)  # ... but the tokenizer decides
    with pytest.raises(ValueError, match="no id for mask"):
        resolve_special_ids(cfg, None)
    with pytest.raises(ValueError, match="equals the eos/pad id"):
        resolve_special_ids(tiny_config(mask_token_id=1), None)
    with pytest.raises(ValueError, match="neither"):
        resolve_special_ids(None, None)


class _LLaDA2SizedTokenizer:
    """Only what resolve_special_ids reads: a LLaDA2-sized vocabulary without a declared mask token."""

    mask_token_id = None
    eos_token_id = pad_token_id = 156892

    def __len__(self) -> int:
        return 157184


def test_llada2_mask_default_only_for_llada2_sized_vocab(tok):
    assert resolve_special_ids(None, _LLaDA2SizedTokenizer()).mask_id == LLADA2_MASK_ID

    class Small(_LLaDA2SizedTokenizer):
        eos_token_id = pad_token_id = 1

        def __len__(self) -> int:
            return 384

    with pytest.raises(ValueError, match="no id for mask"):
        resolve_special_ids(None, Small())


def test_load_tokenizer_errors(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        load_tokenizer(tmp_path)
    assert mask_token_text(tok, 2) == "<|mask|>"


def test_transform_pickles_for_worker_processes(tok):
    import pickle

    t = OputTransform(tok, max_length=64, noise_low=0.5, noise_high=0.5, seed=3, special=SPECIAL)
    el = {"messages": ROWS[2], "flag": False, "example_index": 9, "epoch": 1}
    a, b = t.map(el), pickle.loads(pickle.dumps(t)).map(el)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
