"""What a deviceless compile says about a program: memory plan, kernels, costs, SPMD warnings.

Everything here is read from the target compiler's own output (``memory_analysis()``,
``cost_analysis()``, the compiled HLO text, the compiler's log); what it does not report is
``"not reported"``, never an estimate.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax

from dmax_jax.aot.targets import Target

REMAT_WARNING = "Involuntary full rematerialization"
NOT_REPORTED = "not reported"  # the compiler gave no figure (deviceless GPU compiles give no costs)
_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')
# A kernel call's HLO instruction is named after the Pallas kernel (``%splash_mha_fwd.3 = ...``,
# ``%gmm.1``); an unnamed ``pallas_call`` (tokamax) names its op class in the op metadata.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([A-Za-z0-9_\-]+?)(?:\.\d+)*\s*=")
_OP_TYPE = re.compile(r'__type\\?"\s*:\s*\\?"([A-Za-z0-9_.]+)')
_TRITON_NAME = re.compile(r'name = \\?"([A-Za-z0-9_.\-]+)')  # the Triton module's kernel name
KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu", "__cudnn$fmha")


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """The compiler logs SPMD warnings from C++ to file descriptor 2; capture it (and re-emit it)."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode("utf-8", "replace")
            lines.extend(text.splitlines())


def _kernel_name(line: str) -> str:
    m = _INSTRUCTION.match(line)
    name = m.group(1) if m else "unnamed"
    if name in ("pallas_call", "custom-call", "custom_call", "unnamed"):
        triton = _TRITON_NAME.search(line)
        op = _OP_TYPE.search(line)
        if triton and triton.group(1) != "_unknown_":
            name = triton.group(1)
        elif op:
            name = op.group(1).rsplit(".", 1)[-1]
    return name


def kernels(hlo_text: str) -> dict[str, int]:
    """Kernel custom calls in compiled HLO: ``{"<target>:<kernel name>": count}``; other custom
    calls (XLA's own, e.g. sharding markers) as ``{"<target>": count}``."""
    out: collections.Counter = collections.Counter()
    for line in hlo_text.splitlines():
        m = _CUSTOM_CALL.search(line)
        if not m:
            continue
        target = m.group(1)
        out[f"{target}:{_kernel_name(line)}" if target in KERNEL_TARGETS else target] += 1
    return dict(sorted(out.items()))


def _memory(compiled: jax.stages.Compiled) -> dict[str, int | None]:
    ma = compiled.memory_analysis()
    if ma is None:
        return {"argument_bytes": None, "output_bytes": None, "alias_bytes": None, "temp_bytes": None,
                "peak_bytes": None}
    arg, out, alias, temp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                             int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
    peak = int(getattr(ma, "peak_memory_in_bytes", 0) or 0)
    plan = arg + out - alias + temp + int(ma.generated_code_size_in_bytes)
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
            "generated_code_bytes": int(ma.generated_code_size_in_bytes),
            "compiler_peak_bytes": peak or None,
            # what must be resident at once: live arguments + outputs (donated ones counted once) + temps
            "peak_bytes": max(peak, plan)}


def _cost(compiled: jax.stages.Compiled) -> dict[str, float | str]:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001  (some backends raise instead of returning None)
        ca = None
    if isinstance(ca, list):
        ca = ca[0] if ca else None
    if not ca:
        return {"flops": NOT_REPORTED, "bytes_accessed": NOT_REPORTED}
    flops, bytes_ = ca.get("flops"), ca.get("bytes accessed")
    return {"flops": NOT_REPORTED if flops is None else float(flops),
            "bytes_accessed": NOT_REPORTED if bytes_ is None else float(bytes_)}


def compile_and_report(lower: Callable[[], jax.stages.Lowered], chip: Target, *,
                       default_device: jax.Device | None = None, **facts: Any) -> dict[str, Any]:
    """Lower and compile (timed, stderr captured) and report the target compiler's view.
    ``default_device``: libraries that pick kernels by the default device (tokamax) see the target."""
    ctx = jax.default_device(default_device) if default_device is not None else contextlib.nullcontext()
    with captured_stderr() as log, ctx:
        t0 = time.perf_counter()
        lowered = lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
    remat = [line for line in log if REMAT_WARNING in line]
    for line in log:  # keep the compiler's messages visible, minus per-trace noise
        if "Autotuning cache miss" not in line:
            print(line, file=sys.stderr)
    mem = _memory(compiled)
    fits = None if mem["peak_bytes"] is None else mem["peak_bytes"] <= chip.fits_bytes
    return {**facts, **mem, "hbm_bytes": chip.hbm_bytes, "fits_bytes": chip.fits_bytes, "fits": fits,
            "lower_seconds": round(t1 - t0, 2), "compile_seconds": round(t2 - t1, 2), **_cost(compiled),
            "kernels": kernels(compiled.as_text()), "remat_warnings": len(remat),
            "remat_warning_lines": [r[:300] for r in remat[:5]]}


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
