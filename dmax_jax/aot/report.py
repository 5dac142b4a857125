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
    """The compiler logs SPMD warnings from C++ to file descriptor 2: capture it into a log file
    (named first, and kept if the compiler aborts the process — XLA aborts on some internal errors)."""
    lines: list[str] = []
    fd, path = tempfile.mkstemp(prefix="dmax-aot-compiler-", suffix=".log")
    print(f"(compiler log: {path}; kept if the compiler aborts)", file=sys.stderr)
    sys.stderr.flush()
    saved = os.dup(2)
    os.dup2(fd, 2)
    try:
        yield lines
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(fd)
        with open(path, encoding="utf-8", errors="replace") as f:
            lines.extend(f.read().splitlines())
        os.unlink(path)


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


def _compile_one(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, float]:
    t = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - t


def compile_and_report(lower: Callable[[], Any], chip: Target, *,
                       default_device: jax.Device | None = None,
                       beside: Callable[[str], int] | None = None, **facts: Any) -> dict[str, Any]:
    """Lower and compile (timed, the compiler's log captured) and report the target compiler's view.
    ``lower()`` gives one ``Lowered`` or a dict of them (the engine's programs): then the report
    gives each program's memory and the largest peak. ``beside(name)``: per-device bytes that stay
    resident while that program runs but are not its arguments (the engine's prefix pool beside its
    round programs, the parameters beside the pool's copy programs); added to its peak.
    ``default_device``: libraries that pick kernels by the default device (tokamax) see the target."""
    ctx = jax.default_device(default_device) if default_device is not None else contextlib.nullcontext()
    with captured_stderr() as log, ctx:
        t0 = time.perf_counter()
        lowered = lower()
        t1 = time.perf_counter()
        many = isinstance(lowered, dict)
        compiled = {k: _compile_one(v) for k, v in (lowered.items() if many else [("program", lowered)])}
    remat = [line for line in log if REMAT_WARNING in line]
    for line in log:  # keep the compiler's messages visible, minus per-trace noise
        if "Autotuning cache miss" not in line:
            print(line, file=sys.stderr)
    mems = {k: _memory(c) for k, (c, _) in compiled.items()}
    for k, m in mems.items():
        extra = beside(k) if beside is not None else 0
        if extra and m["peak_bytes"] is not None:
            m["resident_beside_bytes"], m["peak_bytes"] = extra, m["peak_bytes"] + extra
    main = max(mems, key=lambda k: mems[k]["peak_bytes"] or 0)
    found: collections.Counter = collections.Counter()
    for c, _ in compiled.values():
        found.update(kernels(c.as_text()))
    mem = mems[main]
    fits = None if mem["peak_bytes"] is None else mem["peak_bytes"] <= chip.fits_bytes
    report = {**facts, **mem, "hbm_bytes": chip.hbm_bytes, "fits_bytes": chip.fits_bytes, "fits": fits,
              "lower_seconds": round(t1 - t0, 2),
              "compile_seconds": round(sum(sec for _, sec in compiled.values()), 2),
              **_cost(compiled[main][0]), "kernels": dict(sorted(found.items())),
              "remat_warnings": len(remat), "remat_warning_lines": [r[:300] for r in remat[:5]]}
    if many:
        report["largest_program"] = main
        report["programs"] = {k: {"peak_bytes": m["peak_bytes"], "temp_bytes": m["temp_bytes"],
                                  "resident_beside_bytes": m.get("resident_beside_bytes", 0),
                                  "compile_seconds": round(compiled[k][1], 2)} for k, m in mems.items()}
    return report


def dumps(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=False, default=str)
