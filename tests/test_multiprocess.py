"""Two ``jax.distributed`` CPU processes (4 fake devices each, gloo collectives) run the sharded OPUT
step on one global 8-device mesh; losses and gathered params must equal the one-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from mp_worker import reference_run

WORKER = Path(__file__).with_name("mp_worker.py")
REPO = WORKER.parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two extra Python processes, each compiling the sharded step (~40 s on a busy 2-core box)
def test_two_processes_match_one_process(tmp_path):
    port, out = _free_port(), tmp_path / "result.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--process-id", str(i), "--num-processes", "2",
                               "--port", str(port), "--mesh", "2,4,1,1", "--out", str(out)],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    try:
        ref_losses, ref_params = reference_run()  # computed while the workers start up and compile
        for p in procs:
            logs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        tail = "\n".join(line for line in logs[i].splitlines() if "SPMD" not in line)[-3000:]
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{tail}"
    got = np.load(out)
    assert int(got["devices"]) == 8 and int(got["local_devices"]) == 4
    np.testing.assert_allclose(got["losses"], ref_losses, rtol=2e-5)
    for path, want in jax.tree_util.tree_leaves_with_path(ref_params):
        key = jax.tree_util.keystr(path)
        np.testing.assert_allclose(got[key], want, atol=2e-5, rtol=1e-4, err_msg=key)
