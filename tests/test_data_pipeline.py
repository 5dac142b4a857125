"""Training data pipeline: determinism across processes/batch layouts, epochs, resume, bad rows,
parquet, OPUT duplication, and a hand-built spec §3 comparison on GSM8K rows."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dmax_jax.data.chat import load_tokenizer
from dmax_jax.data.pipeline import DataConfig, DataError, make_dataset
from dmax_jax.data.tokenizer_build import build_tokenizer

GSM8K = Path(__file__).parent / "data" / "gsm8k" / "train.jsonl"  # 6 rows, MIT (README there)
KEYS = ("input_ids", "noisy_input_ids", "labels", "flag", "example_index")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(build_tokenizer(tmp_path_factory.mktemp("tok")))


def qa_rows(n: int) -> list[dict]:
    return [{"question": f"Tom has {i} apples and buys {i + 1} more. How many?",
             "answer": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}"} for i in range(n)]


def write_jsonl(path, rows, raw_lines=()) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return os.fspath(path)


def cfg(path, **kw) -> DataConfig:
    base = dict(paths=(path,), max_length=64, noise_low=0.3, noise_high=0.9, seed=5, batch_size=4,
                num_epochs=2, read_threads=1, prefetch_buffer=2)
    base.update(kw)
    return DataConfig(**base)


def by_index(batches) -> dict[int, dict[str, np.ndarray]]:
    out = {}
    for b in batches:
        for r in range(b["example_index"].shape[0]):
            k = int(b["example_index"][r])
            assert k not in out, f"example {k} seen twice"
            out[k] = {key: b[key][r] for key in KEYS}
    return out


def epoch_batches(data, epoch: int) -> list[dict]:
    it = iter(data)
    batches = list(itertools.islice(it, (epoch + 1) * data.steps_per_epoch))
    return batches[epoch * data.steps_per_epoch:]


def hand_built(tok, question, answer, flag, index, epoch, L, seed, low, high, mask_id=2, pad_id=1):
    """Spec §3 from scratch (independent of dmax_jax): template text → HF tokenize/pad → loops."""
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    full = tok.apply_chat_template(msgs, tokenize=False)
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    p = len(tok(prompt, add_special_tokens=False).input_ids)
    ids = tok(full, add_special_tokens=False, truncation=True, max_length=L, padding="max_length").input_ids
    rng = np.random.default_rng([seed, index, epoch])
    sigma = rng.uniform(low, high)
    u = rng.random(L)
    noisy = [mask_id if (j >= p and u[j] < sigma) else ids[j] for j in range(L)]
    labels = [-100 if j < p else ids[j] for j in range(L)]
    last = max([j for j in range(L) if ids[j] != pad_id], default=-1)
    if last + 1 < L:
        for j in range(max(last + 1 + 32, p), L):
            labels[j] = -100
    return {"input_ids": ids, "noisy_input_ids": noisy, "labels": labels, "flag": flag,
            "example_index": index}


def test_gsm8k_rows_equal_hand_built_spec(tok, tmp_path):
    with open(GSM8K) as f:
        rows = [json.loads(line) for line in itertools.islice(f, 6)]
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    L = 448  # most rows fit (PAD tail + trailing-EOS rule), the longest ones are truncated
    data = make_dataset(cfg(path, max_length=L, batch_size=4, num_epochs=2), tok)
    assert data.num_examples == 12 and data.steps_per_epoch == 3 and data.examples_per_epoch == 12
    seen = 0
    for step, batch in enumerate(itertools.islice(iter(data), 6)):
        for r in range(4):
            k = int(batch["example_index"][r])
            row = rows[k % 6]
            want = hand_built(tok, row["question"], row["answer"], k < 6, k, step // 3, L, 5, 0.3, 0.9)
            for key in KEYS:
                np.testing.assert_array_equal(batch[key][r], want[key], err_msg=f"{key} of example {k}")
            seen += 1
    assert seen == 24
    # the response text is what the loss sees: decode labels of one untruncated row
    b = by_index(epoch_batches(data, 0))[1]
    kept = [t for t in b["labels"] if t != -100 and t != 1]
    assert tok.decode(kept) == rows[1]["answer"] + "<|role_end|>"


def test_process_count_and_batch_layout_do_not_change_examples(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))  # 16 examples: a multiple of every batch
    one = make_dataset(cfg(path, batch_size=4), tok)
    two = [make_dataset(cfg(path, batch_size=2), tok, process_index=p, process_count=2) for p in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 4
    s1 = list(iter(one))
    s2 = [list(iter(d)) for d in two]
    assert len(s1) == len(s2[0]) == len(s2[1]) == 8
    for step in range(8):  # global batches are identical, step by step
        joined = by_index([s2[0][step], s2[1][step]])
        single = by_index([s1[step]])
        assert joined.keys() == single.keys()
        for k in single:
            for key in KEYS:
                np.testing.assert_array_equal(joined[k][key], single[k][key])
    # a different global batch reorders nothing inside an example
    small = make_dataset(cfg(path, batch_size=2), tok)
    for epoch in (0, 1):
        a, b = by_index(epoch_batches(one, epoch)), by_index(epoch_batches(small, epoch))
        assert a.keys() == b.keys() == set(range(16))
        for k in a:
            for key in KEYS:
                np.testing.assert_array_equal(a[k][key], b[k][key])


def test_epochs_reshuffle_and_renoise(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(8))
    data = make_dataset(cfg(path, noise_low=0.5, noise_high=0.5), tok)
    e0, e1 = epoch_batches(data, 0), epoch_batches(data, 1)
    order0 = [int(k) for b in e0 for k in b["example_index"]]
    order1 = [int(k) for b in e1 for k in b["example_index"]]
    assert sorted(order0) == sorted(order1) == list(range(16)) and order0 != order1
    a, b = by_index(e0), by_index(e1)
    differ = 0
    for k in a:
        np.testing.assert_array_equal(a[k]["input_ids"], b[k]["input_ids"])
        np.testing.assert_array_equal(a[k]["labels"], b[k]["labels"])
        differ += bool((a[k]["noisy_input_ids"] != b[k]["noisy_input_ids"]).any())
    assert differ == 16
    assert len(list(iter(data))) == 2 * data.steps_per_epoch  # num_epochs=2 then stops


def test_resume_from_iterator_state_equals_uninterrupted(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(5))  # 10 examples, batch 4: 2 steps/epoch, 2 dropped
    c = cfg(path, num_epochs=3)
    full = list(iter(make_dataset(c, tok)))
    assert len(full) == 6
    for cut in (1, 3):  # mid-epoch and right after an epoch boundary
        it = iter(make_dataset(c, tok))
        head = list(itertools.islice(it, cut))
        state = json.loads(json.dumps(it.get_state()))  # must survive a JSON checkpoint
        resumed = iter(make_dataset(c, tok))
        resumed.set_state(state)
        for got, want in zip(head + list(resumed), full, strict=True):
            for key in KEYS:
                np.testing.assert_array_equal(got[key], want[key])


def test_bad_rows_name_file_and_line_or_are_counted(tok, tmp_path):
    good = [json.dumps(r) for r in qa_rows(4)]
    bad_lines = [
        '{"question": "q", "answer": ',  # invalid JSON
        '{"question": "q"}',  # missing field
        '{"question": "q", "answer": 3}',  # wrong type
        '{"question": "q", "answer": ""}',  # empty answer
        '{"question": "what is <|mask|>?", "answer": "a"}',  # mask token string
        '{"question": "q", "answer": "a", "flag": true}',  # already duplicated
    ]
    for j, line in enumerate(bad_lines):
        lines = good[:2] + [line] + good[2:]
        path = tmp_path / f"bad{j}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=f"{path}:3: "):
            make_dataset(cfg(os.fspath(path)), tok)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(good[:1] + bad_lines + good[1:]) + "\n\n")
    data = make_dataset(cfg(os.fspath(path), skip_bad_rows=True), tok)
    assert data.bad_rows == len(bad_lines) and len(data.store) == 4
    assert data.store.bad_row_messages[0].startswith(f"{path}:2: invalid JSON")
    assert by_index(epoch_batches(data, 0)).keys() == set(range(8))


def test_parquet_input_equals_jsonl(tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = qa_rows(4)
    jl = write_jsonl(tmp_path / "d.jsonl", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    a = list(iter(make_dataset(cfg(jl), tok)))
    b = list(iter(make_dataset(cfg(os.fspath(tmp_path / "d.parquet")), tok)))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    bad = rows[:1] + [{"question": "q", "answer": None}]
    pq.write_table(pa.Table.from_pylist(bad), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match=r"bad\.parquet:row 1: 'answer' must be a string"):
        make_dataset(cfg(os.fspath(tmp_path / "bad.parquet"), batch_size=1), tok)


def test_oput_duplication_flags_and_pairs(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(6))
    data = make_dataset(cfg(path, batch_size=4, num_epochs=1), tok)  # 12 examples, 3 steps
    ex = by_index(iter(data))
    assert ex.keys() == set(range(12))
    for k in range(6):
        assert ex[k]["flag"] and not ex[k + 6]["flag"]
        np.testing.assert_array_equal(ex[k]["input_ids"], ex[k + 6]["input_ids"])
        np.testing.assert_array_equal(ex[k]["labels"], ex[k + 6]["labels"])
    pairs = make_dataset(cfg(path, batch_size=4, num_epochs=2, oput_pair_in_batch=True), tok)
    seen = []
    for b in iter(pairs):
        ks = b["example_index"].tolist()
        assert ks[1] == ks[0] + 6 and ks[3] == ks[2] + 6  # (True, False) copies side by side
        assert b["flag"].tolist() == [True, False, True, False]
        np.testing.assert_array_equal(b["input_ids"][0], b["input_ids"][1])
        seen += ks
    assert len(seen) == 2 * 12 and sorted(seen[:12]) == list(range(12))  # 6 rows = 3 pair-batches/epoch


def test_row_flags_without_duplication(tok, tmp_path):
    rows = [dict(r, flag=bool(i % 2)) for i, r in enumerate(qa_rows(4))]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ex = by_index(iter(make_dataset(cfg(path, oput_duplicate=False, num_epochs=1), tok)))
    assert {k: bool(v["flag"]) for k, v in ex.items()} == {0: False, 1: True, 2: False, 3: True}
    plain = write_jsonl(tmp_path / "plain.jsonl", qa_rows(4))
    with pytest.raises(DataError, match="plain.jsonl:1: row has no 'flag'"):
        make_dataset(cfg(plain, oput_duplicate=False), tok)
    ex = by_index(iter(make_dataset(cfg(plain, oput_duplicate=False, default_flag=False, num_epochs=1), tok)))
    assert not any(v["flag"] for v in ex.values())


def test_config_and_input_errors(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(1))
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_dataset(cfg(path, batch_size=2), tok, process_index=0, process_count=2)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        make_dataset(cfg(os.fspath(tmp_path / "missing.jsonl")), tok)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        make_dataset(cfg(os.fspath(tmp_path / "*.parquet")), tok)
    with pytest.raises(ValueError, match="batch_size"):
        cfg(path, oput_pair_in_batch=True, batch_size=3)
    with pytest.raises(ValueError, match="noise_low"):
        cfg(path, noise_low=0.9, noise_high=0.1)
    with pytest.raises(ValueError, match="process_index"):
        make_dataset(cfg(path, batch_size=1), tok, process_index=2, process_count=2)


def test_grain_checkpoint_handler_round_trip(tok, tmp_path):
    import grain.checkpoint
    from etils import epath

    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(6))
    c = cfg(path, batch_size=2)
    full = list(iter(make_dataset(c, tok)))
    it = iter(make_dataset(c, tok))
    for _ in range(5):
        next(it)
    (tmp_path / "ckpt").mkdir()  # orbax creates it; the bare handler does not
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path / "ckpt"), item=it)
    restored = iter(make_dataset(c, tok))
    handler.restore(epath.Path(tmp_path / "ckpt"), item=restored)
    rest = list(restored)
    assert len(rest) == len(full) - 5
    for got, want in zip(rest, full[5:]):
        for key in KEYS:
            np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", qa_rows(4))
    c = cfg(path, num_epochs=1)
    want = list(iter(make_dataset(c, tok)))
    mp = cfg(path, num_epochs=1, worker_count=1)
    it = iter(make_dataset(mp, tok))
    got = [next(it)]
    state = it.get_state()
    it.close()
    resumed = iter(make_dataset(mp, tok))
    resumed.set_state(state)
    got += list(resumed)
    resumed.close()
    assert len(got) == len(want) == 2
    for a, b in zip(got, want):
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key])


# ---- malformed rows: every bad line is a DataError naming file:line, never another exception ---------
_json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                st.sampled_from(["question", "answer", "messages", "role", "content",
                                                 "flag"]),
                                inner, max_size=4), max_leaves=8)
_bad_lines = st.one_of(
    st.text(min_size=1, max_size=30).filter(lambda t: t.strip() and "\n" not in t and "\r" not in t),
    _json_values.map(json.dumps))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=_bad_lines, where=st.integers(0, 3))
def test_any_line_is_a_row_or_a_data_error_naming_its_line(tok, tmp_path, line, where):
    rows = [json.dumps(r) for r in qa_rows(4)]
    rows.insert(where, line)
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    try:
        data = make_dataset(cfg(os.fspath(path), batch_size=2), tok)
    except DataError as e:
        assert f"mixed.jsonl:{where + 1}:" in str(e)
        skipped = make_dataset(cfg(os.fspath(path), batch_size=2, skip_bad_rows=True), tok)
        assert skipped.bad_rows == 1 and f"mixed.jsonl:{where + 1}:" in skipped.store.bad_row_messages[0]
    else:  # the line happens to be a valid row (e.g. a complete question/answer object)
        assert data.bad_rows == 0 and data.num_examples == 10
