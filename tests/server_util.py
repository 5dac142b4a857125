"""Helpers for the server tests: a tiny random HF model dir, the server in a uvicorn thread, ports."""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from test_decoding_oracle import random_params

from dmax_jax.checkpoint.hf import save_hf_params
from dmax_jax.config import ModelConfig
from dmax_jax.data.tokenizer_build import build_tokenizer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_model_dir(path: Path, cfg: ModelConfig, seed: int = 0, lm_head_scale: float = 1.0) -> Path:
    """A real HF directory (safetensors + config.json + tokenizer with chat template)."""
    save_hf_params(random_params(cfg, seed=seed, lm_head_scale=lm_head_scale), cfg, path)
    build_tokenizer(path, vocab_size=cfg.vocab_size)
    return path


@dataclasses.dataclass
class Served:
    url: str          # http://127.0.0.1:PORT
    engine: Any
    model: Any
    server: Any
    thread: threading.Thread
    warm_compiles: int = 0     # the engine's compile count once serving (after warm-up)

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def stop(self, timeout: float = 120.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "uvicorn thread did not exit"


def serve_in_thread(app: Any, engine: Any, model: Any, timeout: float = 600.0) -> Served:
    """uvicorn on a free loopback port in a daemon thread; returns once /health answers."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, daemon=True, name="uvicorn-test")
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, timeout, alive=thread.is_alive)
    return Served(url, engine, model, server, thread)


def wait_healthy(url: str, timeout: float, alive=lambda: True) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"server at {url} died while starting")
        try:
            r = httpx.get(url + "/health", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"server at {url} not healthy after {timeout} s")


def wait_idle(url: str, timeout: float = 60.0) -> dict:
    """Poll /health until the engine holds no queued or running request."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(url + "/health", timeout=5).json()["engine"]
        if stats["queued"] == 0 and stats["prefilling"] == 0 and stats["decoding"] == 0:
            return stats
        time.sleep(0.05)
    raise TimeoutError(f"engine not idle after {timeout} s: {stats}")
