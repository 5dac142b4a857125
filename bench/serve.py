"""Serving load test on localhost: the OpenAI server under closed/open-loop load vs sequential ``generate``.

For each model (the shipped demo ``dmax`` and a larger random model with the demo tokenizer) the
script serves it in-process (uvicorn on a free 127.0.0.1 port, one engine with ``--max-batch``
slots), warms it up, then sends the same ``--requests`` chat requests (held-out demo problems,
streamed) with closed-loop concurrency 1 / 4 / 16 and at an open-loop Poisson arrival rate, and
finally decodes the same prompts with sequential ``dmax_jax.generate`` calls (batch 1). Reported per
phase: aggregate generated tokens/s (completion tokens / phase wall time), p50 / p99 request latency,
p50 time to the first committed block (first streamed text), mean engine TPF, the compile count
(after warm-up → after the phase: must not move) and how many texts differ from ``generate``'s.

    python bench/serve.py [--requests 32] [--concurrency 1,4,16] [--rate 8] [--models demo,random]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import httpx  # noqa: E402
import numpy as np  # noqa: E402

MODELS = ("demo", "random")


def add_random_model_args(ap: argparse.ArgumentParser) -> None:
    """The flags of ``random_model_dir`` (shared with bench/prefix_cache.py)."""
    ap.add_argument("--hidden", type=int, default=192, help="random model hidden size")
    ap.add_argument("--layers", type=int, default=4, help="random model layers (1 dense + MoE)")
    ap.add_argument("--experts", type=int, default=16, help="random model routed experts")
    ap.add_argument("--logit-scale", type=float, default=8.0, help="sharpen the random model's lm_head")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,random", help=f"comma list of {MODELS}")
    ap.add_argument("--requests", type=int, default=32, help="requests per phase")
    ap.add_argument("--concurrency", default="1,4,16", help="closed-loop client counts")
    ap.add_argument("--rate", type=float, default=8.0, help="open-loop arrivals per second (0: skip)")
    ap.add_argument("--max-batch", type=int, default=16, help="engine slots")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prefill-batch", type=int, default=8, help="engine: requests prefilled per round")
    add_random_model_args(ap)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request at most")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    for m in args.models.split(","):
        if m not in MODELS:
            ap.error(f"--models: {m!r} is not one of {MODELS}")
    if args.requests < 1 or args.max_batch < 1 or args.max_tokens < 1 or args.rate < 0:
        ap.error("--requests, --max-batch and --max-tokens must be >= 1 and --rate >= 0")
    return args


# ---- models -------------------------------------------------------------------------------------------
def random_model_dir(out: Path, args) -> Path:
    """A larger random LLaDA2-MoE with the demo tokenizer, written as a real HF directory."""
    import jax

    from dmax_jax.checkpoint.hf import param_shapes, save_hf_params
    from dmax_jax.config import ModelConfig
    from dmax_jax.demo import default_model_dir

    demo = default_model_dir("dmax")
    cfg = ModelConfig.from_json(demo).replace(
        hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=args.layers,
        num_attention_heads=max(2, args.hidden // 32), num_key_value_heads=2, head_dim=32,
        num_experts=args.experts, moe_intermediate_size=args.hidden // 2)
    if getattr(args, "positions", None):     # bench/prefix_cache.py: prompts longer than the demo's 512
        cfg = cfg.replace(max_position_embeddings=args.positions)
    rng = np.random.default_rng(0)

    def leaf(path, s):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return np.ones(s.shape, np.float32)
        if "expert_bias" in name:
            return np.zeros(s.shape, np.float32)
        w = rng.normal(0.0, 0.02, s.shape) * (args.logit_scale if "lm_head" in name else 1.0)
        return w.astype(np.float32)

    params = jax.tree_util.tree_map_with_path(leaf, param_shapes(cfg, np.float32))
    save_hf_params(params, cfg, out)
    for f in demo.iterdir():  # the demo tokenizer, chat template and prompt format / decode defaults
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja") or f.name == "dmax_decode.json":
            (out / f.name).write_bytes(f.read_bytes())
    return out


def questions(n: int) -> list[str]:
    """Held-out demo questions, sent as they are: the server wraps them in the model's prompt format."""
    from dmax_jax.demo import test_problems

    return [p["question"] for p in test_problems(n)]


# ---- server -------------------------------------------------------------------------------------------
# Slot positions of the measured engine: the demo's prompt bucket 64 + 64 tokens, as in the recorded
# results (the server's own default is now the model's 512 positions: bigger programs, other timings).
BENCH_CAPACITY = 128


def start_server(model, defaults: dict, template: str, max_batch: int, prefill_batch: int, name: str):
    """The server exactly as ``python -m dmax_jax.serve`` builds it, in a uvicorn thread."""
    import uvicorn

    from dmax_jax.serving import Engine
    from dmax_jax.serving.server import ServeConfig, create_app

    ids, decode = model.config, next(iter(defaults.values()))
    engine = Engine(model, decode, max_batch=max_batch, capacity=BENCH_CAPACITY,
                    prefill_chunk=decode.prompt_bucket or 128, prefill_batch=prefill_batch,
                    strategies=tuple(defaults))
    cfg = ServeConfig(model_name=name, decode=decode, per_strategy=defaults, prompt_template=template)
    app = create_app(engine, model.tokenizer, cfg, mask_id=ids.resolved_mask_token_id,
                     vocab_size=ids.vocab_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and not server.started:
        if not thread.is_alive():
            raise RuntimeError("server thread died while starting")
        time.sleep(0.1)
    if not server.started:
        raise TimeoutError("server not started after 900 s")
    return engine, server, thread, url


def one_request(client: httpx.Client, url: str, name: str, question: str, max_tokens: int) -> dict:
    """Stream one chat request; latency, time to the first committed text, tokens, TPF, text."""
    body = {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, parts, rec = None, [], {}
    with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:200]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            if "error" in ch:
                raise RuntimeError(ch["error"]["message"])
            if ch["choices"] and ch["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter()
                parts.append(ch["choices"][0]["delta"]["content"])
            if ch["choices"] and ch["choices"][0]["finish_reason"]:
                rec["tpf"] = ch["dmax"]["tpf"]
            if ch.get("usage"):
                rec["tokens"] = ch["usage"]["completion_tokens"]
    end = time.perf_counter()
    return {**rec, "latency": end - t0, "ttfb": (first or end) - t0, "text": "".join(parts)}


def closed_loop(url, name, qs, conc, max_tokens, timeout):
    order = iter(range(len(qs)))
    lock = threading.Lock()
    out: list = [None] * len(qs)

    def worker():
        with httpx.Client(timeout=timeout) as c:
            while True:
                with lock:
                    i = next(order, None)
                if i is None:
                    return
                out[i] = one_request(c, url, name, qs[i], max_tokens)

    t = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as pool:
        for f in [pool.submit(worker) for _ in range(conc)]:
            f.result(timeout=timeout * len(qs))
    return out, time.perf_counter() - t


def open_loop(url, name, qs, rate, max_tokens, timeout):
    arrivals = np.cumsum(np.random.default_rng(0).exponential(1.0 / rate, len(qs)))

    def send(i):
        time.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
        with httpx.Client(timeout=timeout) as c:
            return one_request(c, url, name, qs[i], max_tokens)

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(len(qs)) as pool:
        out = list(pool.map(send, range(len(qs)), timeout=timeout * 4))
    return out, time.perf_counter() - t0


def sequential_generate(model, ids, decode):
    from dmax_jax.decoding import generate
    from dmax_jax.serving.detok import detokenize

    out = []
    t = time.perf_counter()
    for row in ids:
        t1 = time.perf_counter()
        res = generate(model, [row], decode)
        lat = time.perf_counter() - t1
        out.append({"latency": lat, "ttfb": lat, "tokens": res.tokens[0], "tpf": res.tpf[0],
                    "nfe": res.nfe[0], "text": detokenize(model.tokenizer, res.token_ids[0])})
    return out, time.perf_counter() - t


# ---- one model --------------------------------------------------------------------------------------
def row(model_name, mode, recs, wall, compiles, want, forwards=None):
    """One table row; ``forwards``: model forwards the engine ran one after another in the phase
    (``generate`` x1: the sum of the requests' NFE)."""
    lat = np.array([r["latency"] for r in recs])
    tokens = sum(r["tokens"] for r in recs)
    forwards = sum(r["nfe"] for r in recs) if forwards is None else forwards
    return {"model": model_name, "mode": mode, "requests": len(recs), "forwards": forwards,
            "tok_per_forward": tokens / max(forwards, 1),
            "tok_s": tokens / wall, "p50_s": float(np.percentile(lat, 50)),
            "p99_s": float(np.percentile(lat, 99)),
            "ttfb_p50_s": float(np.percentile([r["ttfb"] for r in recs], 50)),
            "tpf": float(np.mean([r["tpf"] for r in recs])), "compiles": compiles,
            "mismatch": sum(r["text"] != w for r, w in zip(recs, want))}


def bench_model(which: str, args, tmp: Path) -> list[dict]:
    import dmax_jax
    from dmax_jax.data.chat import apply_chat_template
    from dmax_jax.decoding import compile_count
    from dmax_jax.demo import default_model_dir
    from dmax_jax.serve import serve_defaults

    path = default_model_dir("dmax") if which == "demo" else random_model_dir(tmp / "random", args)
    model = dmax_jax.load_pretrained(path)
    n_params = sum(int(np.prod(a.shape)) for a in __import__("jax").tree.leaves(model.params))
    label = f"{which} ({n_params / 1e6:.2f} M)"
    defaults, template = serve_defaults(path, {"gen_length": args.max_tokens})
    decode = next(iter(defaults.values()))
    qs = questions(args.requests)
    wrapped = [template.replace("{prompt}", q) for q in qs]
    ids = [apply_chat_template(model.tokenizer, [{"role": "user", "content": w}], add_generation_prompt=True)
           for w in wrapped]

    generate_warm = sequential_generate(model, ids[:1], decode)  # compile
    del generate_warm
    c0 = compile_count()
    recs, wall = sequential_generate(model, ids, decode)
    want = [r["text"] for r in recs]
    rows = [row(label, "generate x1 (sequential)", recs, wall, f"{c0}->{compile_count()}", want)]

    engine, server, thread, url = start_server(model, defaults, template, args.max_batch, args.prefill_batch,
                                               which)
    try:
        closed_loop(url, which, qs[: args.max_batch], args.max_batch, args.max_tokens, args.timeout)  # warm
        for conc in [int(c) for c in args.concurrency.split(",")]:
            e0, f0 = engine.compile_count(), engine.stats()["forwards"]
            recs, wall = closed_loop(url, which, qs, conc, args.max_tokens, args.timeout)
            rows.append(row(label, f"server closed c={conc}", recs, wall, f"{e0}->{engine.compile_count()}",
                            want, engine.stats()["forwards"] - f0))
        if args.rate > 0:
            e0, f0 = engine.compile_count(), engine.stats()["forwards"]
            recs, wall = open_loop(url, which, qs, args.rate, args.max_tokens, args.timeout)
            rows.append(row(label, f"server open {args.rate:g} req/s", recs, wall,
                            f"{e0}->{engine.compile_count()}", want, engine.stats()["forwards"] - f0))
    finally:
        server.should_exit = True
        thread.join(120)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| model | mode | req | tok/s | p50 latency s | p99 latency s | p50 first block s | TPF | "
            "forwards | tokens / forward | compiles | text != generate |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['model']} | {r['mode']} | {r['requests']} | {r['tok_s']:.1f} | "
                     f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['ttfb_p50_s']:.3f} | {r['tpf']:.2f} | "
                     f"{r['forwards']} | {r['tok_per_forward']:.2f} | {r['compiles']} | {r['mismatch']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import jax

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.models.split(","):
            rows += bench_model(which, args, Path(tmp))
    print(f"backend {jax.default_backend()} ({jax.device_count()} device(s)), {os.cpu_count()} CPU cores; "
          f"{args.requests} requests per phase, max_tokens {args.max_tokens}, engine slots {args.max_batch}")
    print(table(rows))
    for which in args.models.split(","):
        by = {r["mode"]: r for r in rows if r["model"].startswith(which)}
        c1, c16 = by.get("server closed c=1"), by.get("server closed c=16")
        if c1 and c16:
            print(f"{which}: throughput c=16 / c=1 = {c16['tok_s'] / c1['tok_s']:.2f}x measured here; "
                  f"tokens per sequential forward c=16 / c=1 = "
                  f"{c16['tok_per_forward'] / c1['tok_per_forward']:.2f}x (the throughput ratio where a "
                  "forward costs the same for 1 or 16 rows)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
