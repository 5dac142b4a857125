"""Write the embedded demo's data: GSM8K-format train/test JSONL and the task tokenizer.

Usage: ``python tools/make_task_data.py --out data/arith [--task arith_small --n-train 30000 --n-test 1000
--seed 0]`` (``--task``: a ``generate:`` task name; default the shipped demo's).
Output (byte-identical for the same arguments): ``OUT/train.jsonl``, ``OUT/test.jsonl`` (rows
``{"question", "answer"}``, answers end with ``#### N``) and ``OUT/tokenizer/`` (load it with
``transformers.AutoTokenizer.from_pretrained``). Prints prompt/answer token-length statistics under
the chat template and the algorithm §5.4 GSM8K prompt, so the demo's sequence length can be checked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dmax_jax.demo.data import GENERATED_TASKS  # noqa: E402
from dmax_jax.demo.examples import DEMO_TASK  # noqa: E402
from dmax_jax.demo.task import TEMPLATES, generate_problems, write_jsonl  # noqa: E402
from dmax_jax.demo.tokenizer import (  # noqa: E402
    build_task_tokenizer,
    format_length_stats,
    sequence_lengths,
)

MIN_TEST = 500


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder (created; files are overwritten)")
    parser.add_argument("--task", choices=sorted(GENERATED_TASKS), default=DEMO_TASK,
                        help="which generated task (default: %(default)s, the shipped demo's)")
    parser.add_argument("--n-train", type=int, default=30_000, help="train problems")
    parser.add_argument("--n-test", type=int, default=1000, help=f"held-out test problems (>= {MIN_TEST})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="tokenizer size (default: the task's demo size, 640 digit / 768 whole-number)")
    parser.add_argument("--tokenizer-problems", type=int, default=20_000,
                        help="train the BPE on the first this-many train problems")
    parser.add_argument("--stats-sample", type=int, default=5000,
                        help="length statistics over the first this-many train problems")
    args = parser.parse_args(argv)
    if args.n_train < 1:
        parser.error(f"--n-train must be >= 1, got {args.n_train}")
    if args.n_test < MIN_TEST:
        parser.error(f"--n-test must be >= {MIN_TEST} for a meaningful held-out accuracy, got {args.n_test}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    phrasing, scale = GENERATED_TASKS[args.task]
    train = generate_problems(args.n_train, seed=args.seed, split="train", phrasing=phrasing, scale=scale)
    test = generate_problems(args.n_test, seed=args.seed, split="test", phrasing=phrasing, scale=scale)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    # generate_problems(k) is a prefix of generate_problems(n >= k): the BPE sees train.jsonl's head.
    tok_dir = build_task_tokenizer(out / "tokenizer", n_problems=min(args.tokenizer_problems, args.n_train),
                                   seed=args.seed, vocab_size=args.vocab_size, phrasing=phrasing,
                                   scale=scale)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    print(f"wrote {len(train)} train / {len(test)} test problems ({len(TEMPLATES)} templates) "
          f"and a {len(tokenizer)}-token tokenizer to {out}")
    for name, rows in (("train", train[: args.stats_sample]), ("test", test)):
        print(f"token lengths, {name} ({len(rows)} problems; answer includes <|role_end|>, total adds EOS):")
        print(format_length_stats(sequence_lengths(tokenizer, rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
