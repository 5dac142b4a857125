"""``python -m dmax_jax.serve``: an OpenAI-compatible DMax server on one engine.

    python -m dmax_jax.serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--max-batch N]
                             [--max-queue N] [--prefix-cache-gb GB] [--compile-cache DIR|none]

Without ``--model`` it serves the shipped demo ``dmax`` model (dmax_jax/assets/demo/dmax) with the
demo's decoding geometry (block 32); slots hold the model's ``max_position_embeddings`` positions
(``--max-model-len``: fewer), and a request without ``max_tokens`` may use all that fit. Flags are checked
before anything loads: a bad value prints one line naming it and exits with status 2. SIGTERM (or
Ctrl-C) stops accepting connections, lets in-flight requests finish for up to ``--drain-timeout``
seconds (then cancels them, which aborts their engine requests), stops the engine and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dmax_jax.cli import OneLineParser

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

PROG = "python -m dmax_jax.serve"


def _int_at_least(lo: int, hi: int | None = None):
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {rng}, got {v}")
        return v
    return parse


def _gb(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GB, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {s}")
    return v


# DecodeConfig fields the server takes as flags: the engine's static geometry (block_length, top_k,
# soft_impl, max_unroll, expected_tpf, dtype) and the defaults of requests that leave a knob out. No
# gen_length: a request without max_tokens may generate up to the slot's positions (--max-model-len).
SERVE_FIELDS = ("strategy", "block_length", "threshold", "accept_threshold", "steps",
                "temperature", "top_p", "sample_top_k", "seed", "top_k", "soft_impl", "dtype", "max_unroll",
                "expected_tpf", "weights")


def model_path(args: argparse.Namespace) -> Path:
    from dmax_jax.demo import default_model_dir

    return default_model_dir("dmax") if args.model is None else Path(args.model)


def serve_defaults(path: Path, flags: dict) -> tuple[dict, str]:
    """``({strategy: DecodeConfig}, prompt_template)`` for the served strategies: DecodeConfig defaults
    < the model's ``dmax_decode.json`` (``decode``, then ``strategies[s]``) < the flags given. The first
    key is the default strategy. Raises DecodeConfigError / ModelDefaultsError on bad values."""
    from dmax_jax.decoding import DecodeConfig
    from dmax_jax.decoding.model_defaults import PLACEHOLDER, load_model_defaults
    from dmax_jax.serving.engine import SERVED_STRATEGIES

    md = load_model_defaults(path)
    first = flags.get("strategy") or (md.decode.get("strategy") if md else None) or "spd"
    if first not in SERVED_STRATEGIES:
        raise ValueError(f"--strategy: the engine serves {', '.join(SERVED_STRATEGIES)}, not {first}")
    out = {}
    for s in (first, *[t for t in SERVED_STRATEGIES if t != first]):
        given = {**flags, "strategy": s}
        if s == "threshold" and s != first:
            given.pop("steps", None)        # --steps is the default strategy's; threshold takes none
        out[s] = md.config(DecodeConfig(), given) if md else DecodeConfig().replace(**given)
    return out, (md.prompt_template if md else PLACEHOLDER)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from dmax_jax.decoding import DecodeConfigError
    from dmax_jax.decoding.cli_args import add_decode_args, config_error_line, given_fields

    ap = OneLineParser(
        prog=PROG, description="Serve a DMax / LLaDA2-MoE model behind the OpenAI API. Decoding "
                 "flags set the defaults of requests that leave a knob out (max_tokens: all that fits); "
                 "unset flags come from the model's dmax_decode.json, then the DecodeConfig defaults.")
    ap.add_argument("--model", help="HF model directory (default: the shipped demo 'dmax' model)")
    ap.add_argument("--served-model-name", help="model id clients send (default: the directory's name)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=_int_at_least(0, 65535), default=8000, help="0 = any free port")
    ap.add_argument("--max-batch", type=_int_at_least(1), default=16, help="engine slots (default 16)")
    ap.add_argument("--max-model-len", "--capacity", dest="capacity", type=_int_at_least(1), metavar="N",
                    help="positions per slot: prompt + max_tokens of one request at most (default and "
                    "upper bound: the model's max_position_embeddings; the demo's is 512)")
    ap.add_argument("--prefill-chunk", type=_int_at_least(1), help="prompt tokens per prefilled request "
                    "per round (default: the model's prompt_bucket from dmax_decode.json, else 128)")
    ap.add_argument("--prefill-batch", type=_int_at_least(1), default=8,
                    help="requests prefilled together in one round (default 8)")
    ap.add_argument("--prefix-cache-gb", type=_gb, metavar="GB",
                    help="device memory (1e9 bytes) for the prefix cache: committed K/V blocks that requests "
                    "sharing a prompt prefix (system prompts, few-shot, chat history) reuse instead of "
                    "prefilling, tokens unchanged (default: as many blocks as the slots hold; 0: off)")
    ap.add_argument("--prefix-cache-prompts-only", action="store_true",
                    help="keep only prompt blocks in the prefix cache, not a finished request's generated "
                    "blocks (reused chat replies hold the cross-block forward's K/V: equal to a prefill's "
                    "in exact arithmetic, not bit for bit)")
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to drain at shutdown")
    ap.add_argument("--max-queue", type=_int_at_least(0), default=None, metavar="N",
                    help="requests that may wait for a slot; more get HTTP 503 with Retry-After "
                    "(default: no bound)")
    ap.add_argument("--compact", choices=("auto", "on", "off"), default="auto",
                    help="compacted forwards: each forward runs only for the slots that need it (auto: on "
                    "for CPU, off for GPU / TPU; the tokens are the same)")
    ap.add_argument("--compile-cache", metavar="DIR|none",
                    help="JAX's persistent compilation cache, so a restart skips most of the warm-up "
                    f"compile (default: $JAX_COMPILATION_CACHE_DIR if set, else {default_compile_cache()}; "
                    "none: off)")
    ap.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_decode_args(ap, fields=SERVE_FIELDS, group_title="decoding (defaults: DecodeConfig's, overridden "
                    "by the model's dmax_decode.json)")
    args = ap.parse_args(argv)
    if args.model is not None:
        p = Path(args.model)
        if not p.is_dir():
            ap.error(f"--model {args.model}: no such directory")
        if not (p / "config.json").is_file():
            ap.error(f"--model {args.model}: no config.json in it (not an HF model directory)")
    if args.drain_timeout < 0:
        ap.error(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    args.compile_cache = compile_cache_dir(args.compile_cache, ap.error)
    try:
        args.decode, args.prompt_template = serve_defaults(model_path(args), given_fields(args, SERVE_FIELDS))
    except DecodeConfigError as e:
        print(config_error_line(e, PROG), file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))
    return args


def default_compile_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dmax_jax" / "xla"


def compile_cache_dir(flag: str | None, error) -> Path | None:
    """The persistent compilation cache directory (created), or None for ``none`` / JAX's own
    ``JAX_COMPILATION_CACHE_DIR`` (which JAX then uses by itself). It only stores executables keyed by
    program, JAX version and device: a hit runs exactly what a fresh compile would."""
    if flag is not None and flag.lower() == "none":
        return None
    if flag is None and os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return None
    path = Path(flag) if flag is not None else default_compile_cache()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error(f"--compile-cache {path}: cannot create it ({e.strerror})")
    if not os.access(path, os.W_OK):
        error(f"--compile-cache {path}: not writable")
    return path


def build(args: argparse.Namespace):
    """Load the model and build ``(engine, app, served name)`` (no socket yet)."""
    import dmax_jax
    from dmax_jax.data.chat import resolve_special_ids
    from dmax_jax.serving.engine import Engine
    from dmax_jax.serving.prefix_cache import entries_for_bytes
    from dmax_jax.serving.server import ServeConfig, create_app

    if args.compile_cache is not None:
        import jax

        jax.config.update("jax_compilation_cache_dir", os.fspath(args.compile_cache))
    path = model_path(args)
    strategies = tuple(args.decode)
    dc = args.decode[strategies[0]]
    dtype = dc.dtype or "float32"       # validated by DecodeConfig (--dtype)
    model = dmax_jax.load_pretrained(path, dtype=dtype)
    if dc.weights != "native":  # --weights int8: quantized once at load, every engine program reads int8
        import dataclasses

        from dmax_jax.model.quant import params_for

        model = dataclasses.replace(model, params=params_for(model.params, dc.weights))
    if model.tokenizer is None:
        raise ValueError(f"--model {path}: holds no tokenizer files; the server needs one")
    ids = resolve_special_ids(model.config, model.tokenizer, strict=False)
    capacity = args.capacity     # None: the model's max_position_embeddings
    limit = model.config.max_position_embeddings
    if capacity is not None and not dc.block_length <= capacity <= limit:
        raise ValueError(f"--max-model-len {capacity}: must be in [{dc.block_length} (the block length), "
                         f"{limit} (the model's max_position_embeddings)]")
    prefill_chunk = args.prefill_chunk or dc.prompt_bucket or 128
    defaults = dc.replace(dtype=dtype, mask_id=ids.mask_id, eos_id=ids.eos_id)
    blocks = None if args.prefix_cache_gb is None else entries_for_bytes(
        args.prefix_cache_gb * 1e9, model.config, dc.block_length, dtype)
    engine = Engine(model, defaults, max_batch=args.max_batch, capacity=capacity, prefill_chunk=prefill_chunk,
                    prefill_batch=args.prefill_batch, strategies=strategies,
                    compact={"auto": "auto", "on": True, "off": False}[args.compact],
                    prefix_cache_blocks=blocks, prefix_cache_generated=not args.prefix_cache_prompts_only)
    name = args.served_model_name or path.resolve().name
    cfg = ServeConfig(model_name=name, decode=dc, per_strategy=dict(args.decode),
                      prompt_template=args.prompt_template, drain_timeout=args.drain_timeout,
                      max_queue=args.max_queue)
    app = create_app(engine, model.tokenizer, cfg, mask_id=ids.mask_id, vocab_size=model.config.vocab_size)
    return engine, app, name


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        print(f"{PROG}: error: {e.name} is not installed; install the serve extra: pip install "
              "'dmax-jax[serve]'", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")  # the refusal lines
    try:
        engine, app, name = build(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    cache = "" if args.compile_cache is None else f"; compilation cache {args.compile_cache}"
    print(f"{PROG}: compiling the engine for '{name}' ({args.max_batch} slots{cache})...", file=sys.stderr,
          flush=True)
    engine.start()
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout, lifespan="on")
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM / SIGINT (graceful shutdown), then restores the previous handlers and
    # re-raises the signal; with these no-op handlers restored, the re-raise does not kill the process
    # before the engine is stopped, and a requested shutdown exits 0. The caller's handlers come back
    # afterwards (main may run inside another program, e.g. a test process).
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run()
    finally:
        engine.stop(drain=False)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        print(f"{PROG}: error: could not listen on {args.host}:{args.port}", file=sys.stderr)
        return 2
    print(f"{PROG}: shut down cleanly", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
