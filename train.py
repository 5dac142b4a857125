"""Train DMax (OPUT) with JAX: python train.py --config CONFIG.yaml [key.path=value ...]

Without any argument it runs the embedded demo (a few CPU minutes): a short OPUT fine-tune of the
shipped tiny base model (dmax_jax/demo/configs/oput_quick.yaml), then an evaluation of it against base
on 100 held-out problems, printed as one table with 95 % intervals (dmax_jax.demo.run_quick_demo).
With only overrides (or --print-config) the config is configs/tiny.yaml, a tiny random model.

Overrides use dotted keys and YAML values, e.g. run.num_steps=20, data.paths=[a.jsonl,b.jsonl],
model.source=hf:/ckpt/LLaDA2.0-mini. A run resumes from the newest checkpoint in run.out_dir, so the
same command continues an interrupted run. data.paths entries generate:arith[:N] and
generate:arith_varied[:N] ask for the demo's generated problems, written under run.out_dir/task_data
before training starts.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

# transformers serves tokenizers and configs here (no torch models): keep its torch advisory quiet
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from a checkout without installing
from dmax_jax.cli import OneLineParser  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
DEMO_DIR = Path("runs/demo_quick")
EXIT_CONFIG, EXIT_NON_FINITE, EXIT_INTERRUPTED = 2, 3, 130


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__.split("\n\n")
    parser = OneLineParser(description="\n\n".join(doc[:2]), epilog=doc[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, metavar="YAML",
                        help="training YAML (default: none = the embedded demo; with overrides or "
                             "--print-config: configs/tiny.yaml)")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first, one process per host on a pod "
                             "(default: off)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit (default: off)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="config overrides, applied in order after the YAML")
    args = parser.parse_args(argv)
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"overrides must look like key.path=value, got {bad}")
    return args


def _fail(message: str, code: int = EXIT_CONFIG) -> int:
    """The project's one error-line format, ``<command>: error: <what>``."""
    from dmax_jax.cli import error_line

    print(error_line("train.py", message), file=sys.stderr)
    return code


def _input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input (a config key, data row, checkpoint, model folder, output path)."""
    from dmax_jax.checkpoint.hf import CheckpointError
    from dmax_jax.checkpoint.train_state import CheckpointRestoreError, ResumeMismatchError
    from dmax_jax.cli import OutputPathError
    from dmax_jax.data.chat import TokenizerError
    from dmax_jax.data.pipeline import DataError
    from dmax_jax.training.config import TrainConfigError

    return (TrainConfigError, DataError, ResumeMismatchError, CheckpointRestoreError, CheckpointError,
            TokenizerError, OutputPathError, FileNotFoundError)


def _interrupted(err: BaseException, argv: list[str]) -> int:
    """Ctrl-C or SIGTERM: where the run stands and the exact command that continues it; exits 130
    (Ctrl-C) or 143 (SIGTERM, e.g. a preempted VM)."""
    command = shlex.join(["python", "train.py", *argv])
    last = getattr(err, "last_checkpoint_step", None)
    where = (f"last checkpoint: update {last} in {err.checkpoint_dir}" if last is not None else
             "no checkpoint written yet (a rerun starts from the beginning)")
    update = getattr(err, "update", None)
    print(f"train.py: interrupted{'' if update is None else f' after update {update}'}; {where}\n"
          f"resume with: {command}", file=sys.stderr)
    return getattr(err, "exit_code", EXIT_INTERRUPTED)


def _summary_line(summary) -> str:
    loss = summary.final_metrics.get("loss")
    line = (f"done: steps {summary.start_step} → {summary.final_step} in {summary.seconds:.1f}s; "
            f"final loss {loss if loss is None else f'{loss:.4f}'}; "
            f"checkpoint {summary.last_checkpoint_step} in {summary.checkpoint_dir}"
            + (f"; HF export {summary.hf_export_dir}" if summary.hf_export_dir else ""))
    if summary.no_answer_rows:
        line += (f"\n{summary.no_answer_rows} data rows left no answer token after truncation to "
                 f"data.max_length {summary.config.data.max_length} (their prompts fill it; they teach "
                 "nothing)")
    if summary.bad_rows:
        shown = summary.bad_row_messages[:3]
        line += (f"\nskipped {summary.bad_rows} bad data rows (data.skip_bad_rows=true); first "
                 f"{len(shown)}:\n  " + "\n  ".join(shown))
    return line


def run_training(args: argparse.Namespace, argv: list[str]) -> int:
    """Load the config, write generated demo data if it asks for some, train; errors → one message."""
    import yaml

    from dmax_jax.cli import check_writable
    from dmax_jax.training.config import TrainConfigError, load_train_config

    try:
        cfg = load_train_config(args.config, args.overrides)
    except (TrainConfigError, FileNotFoundError) as e:
        return _fail(str(e))
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    try:
        check_writable("run.out_dir", cfg.run.out_dir, directory=True)   # before any model or data
    except ValueError as e:
        return _fail(str(e))
    if args.distributed:
        import jax

        jax.distributed.initialize()
    from dmax_jax.training.loop import NonFiniteLossError, train

    try:
        if any(p.startswith("generate:") for p in cfg.data.paths):
            from dmax_jax.demo.data import materialize  # the demo's data step: the library reads files

            cfg = materialize(cfg)
        summary = train(cfg)
    except KeyboardInterrupt as e:
        return _interrupted(e, argv)
    except _input_errors() as e:
        return _fail(str(e))
    except NonFiniteLossError as e:
        return _fail(str(e), EXIT_NON_FINITE)
    except OSError as e:  # the machine, not the input: a full disk, a vanished mount (exit 1, one line)
        return _fail(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}; the checkpoints written "
                     "so far are kept (rerun the same command to resume)", 1)
    print(_summary_line(summary))
    return 0


def run_embedded_demo() -> int:
    """python train.py: OPUT fine-tune of the shipped demo base, evaluated and tabulated."""
    from dmax_jax.cli import check_writable
    from dmax_jax.demo import run_quick_demo

    reused = (DEMO_DIR / "train" / "checkpoints").is_dir()
    print("train.py: no --config given; running the embedded demo (OPUT fine-tune of the shipped tiny "
          f"base model, then evaluation on 100 held-out problems; see README). Its files go to {DEMO_DIR}"
          + (f"; {DEMO_DIR} holds an earlier demo run, which is reused (the fine-tune resumes or is "
             f"already done) — remove {DEMO_DIR} to start over" if reused else
             f" (remove {DEMO_DIR} to start over)"), flush=True)
    try:
        check_writable("the demo folder", DEMO_DIR, directory=True)
        run_quick_demo(DEMO_DIR)
    except KeyboardInterrupt as e:
        print(f"train.py: demo interrupted; rerun `python train.py` to continue (the fine-tune resumes "
              f"from its last checkpoint in {DEMO_DIR / 'train'})", file=sys.stderr)
        return getattr(e, "exit_code", EXIT_INTERRUPTED)
    except _input_errors() as e:  # e.g. runs/demo_quick left by another version
        return _fail(f"{e}\n(remove {DEMO_DIR} to start the demo afresh)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.config is None and not args.overrides and not args.print_config:
        return run_embedded_demo()
    if args.config is None:
        args.config = DEFAULT_CONFIG
        print(f"train.py: no --config given; running the tiny CPU preset {args.config}", flush=True)
    return run_training(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
