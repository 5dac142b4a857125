"""``python -m dmax_jax.serve``: flag checks, and the shipped demo model served in a subprocess —
the ``openai`` client streams an answer equal to ``generate``'s, then SIGTERM drains and exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
from server_util import free_port, wait_healthy

from dmax_jax import serve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv,needle", [
    (["--model", "/no/such/dir"], "--model /no/such/dir: no such directory"),
    (["--model", str(ROOT / "tests")], "no config.json"),
    (["--port", "70000"], "--port"),
    (["--port", "eighty"], "--port"),
    (["--max-batch", "0"], "--max-batch"),
    (["--max-queue", "-1"], "--max-queue"),
    (["--threshold", "1.5"], "--threshold"),
    (["--top-p", "0"], "--top-p"),
    (["--max-model-len", "0"], "--max-model-len"),
    (["--gen-length", "64"], "--gen-length"),      # absent max_tokens = all that fits: no such flag
    (["--compile-cache", "/proc/no/such/cache"], "--compile-cache /proc/no/such/cache: cannot create it"),
])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        serve.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("python -m dmax_jax.serve: error:")


def _drain_stderr(proc, sink):
    for line in proc.stderr:
        sink.append(line)


def test_demo_model_served_streams_generate_text_and_sigterm_exits_cleanly(tmp_path):
    from dmax_jax.data.chat import apply_chat_template
    from dmax_jax.decoding import generate
    from dmax_jax.demo import DEMO_DECODE, load_demo_model, test_problems
    from dmax_jax.demo.task import gsm8k_prompt
    from dmax_jax.serving.detok import detokenize

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "dmax_jax.serve", "--port", str(port), "--max-batch", "2",
                             "--log-level", "warning", "--compile-cache", str(tmp_path / "xla")],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=_drain_stderr, args=(proc, err), daemon=True)
    reader.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 600, alive=lambda: proc.poll() is None)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        assert [m.id for m in client.models.list()] == ["dmax"]
        question = test_problems(1)[0]["question"]    # the server wraps it in the model's prompt format
        stream = client.chat.completions.create(model="dmax", stream=True,
                                                messages=[{"role": "user", "content": question}])
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        model = load_demo_model("dmax")
        ids = apply_chat_template(model.tokenizer, [{"role": "user", "content": gsm8k_prompt(question)}],
                                  add_generation_prompt=True)
        res = generate(model, [ids], **DEMO_DECODE.generate_kwargs("spd", DEMO_DECODE.spd_threshold))
        assert text == detokenize(model.tokenizer, res.token_ids[0]) and "####" in text

        # SIGTERM while a stream is open: the stream still completes (drain), then the process exits 0
        live = client.chat.completions.create(model="dmax", stream=True,
                                              messages=[{"role": "user", "content": question}])
        first = next(iter(live))
        proc.send_signal(signal.SIGTERM)
        rest = "".join(c.choices[0].delta.content or "" for c in live if c.choices)
        assert (first.choices[0].delta.content or "") + rest == text
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        reader.join(timeout=10)
    assert "shut down cleanly" in "".join(err), "".join(err)[-2000:]
    assert any((tmp_path / "xla").iterdir())  # the engine's programs went to the persistent cache
    assert "Traceback" not in "".join(err)


def test_compile_cache_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert serve.parse_args([]).compile_cache == tmp_path / "xdg" / "dmax_jax" / "xla"
    assert (tmp_path / "xdg" / "dmax_jax" / "xla").is_dir()
    assert serve.parse_args(["--compile-cache", "none"]).compile_cache is None
    assert serve.parse_args(["--compile-cache", str(tmp_path / "c")]).compile_cache == tmp_path / "c"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))  # JAX's own setting wins
    assert serve.parse_args([]).compile_cache is None
