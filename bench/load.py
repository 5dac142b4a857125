"""HF checkpoint load benchmark: peak host RSS and seconds per GB for a ~200 MB random checkpoint.

    python bench/load.py [--size-mb 200] [--keep DIR]

Writes a random LLaDA2-MoE checkpoint (split experts) once in float32 and once in bfloat16, then loads
each in a fresh subprocess so that the RSS peak belongs to the load alone. The child reports its
RSS after imports and backend start (baseline), its lifetime peak (``ru_maxrss``) and the net peak =
peak − baseline. Target: net peak ≤ 1.3 × the checkpoint's size on disk when loading in the on-disk
dtype. Files are read from a warm page cache (just written), so s/GB is the parse/copy cost, not
the disk's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TARGET_RATIO = 1.3


def _current_rss() -> int:
    """Resident bytes now (Linux /proc; elsewhere the peak so far, which only overstates baseline)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss()


def _peak_rss() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb if sys.platform == "darwin" else kb * 1024


def child(path: str, dtype: str) -> None:
    import jax
    import numpy as np

    from dmax_jax.checkpoint.hf import load_hf_params

    jax.device_put(np.zeros(16, np.float32)).block_until_ready()  # start the backend before the baseline
    base = _current_rss()
    t0 = time.perf_counter()
    params = load_hf_params(path, dtype=dtype)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    loaded = sum(x.nbytes for x in jax.tree.leaves(params))
    print(json.dumps({"baseline": base, "peak": _peak_rss(), "seconds": seconds, "loaded_bytes": loaded}))


def bench_config(target_bytes: int, itemsize: int):
    """A 1-dense + n-MoE config whose parameter bytes come closest to ``target_bytes``."""
    from dmax_jax.checkpoint.hf import param_shapes
    from dmax_jax.config import tiny_config

    def make(layers: int):
        return tiny_config(vocab_size=16384, hidden_size=512, intermediate_size=1536,
                           num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                           head_dim=64, moe_intermediate_size=256, num_experts=24, n_group=4, topk_group=2,
                           num_experts_per_tok=4)

    def nbytes(c) -> int:
        import jax
        import numpy as np

        return sum(int(np.prod(s.shape)) * itemsize for s in jax.tree.leaves(param_shapes(c)))

    return min((make(n) for n in range(2, 64)), key=lambda c: abs(nbytes(c) - target_bytes))


def write_random(path: Path, config, dtype: str, seed: int = 0) -> float:
    import jax
    import numpy as np

    from dmax_jax.checkpoint.hf import param_shapes, save_hf_params

    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32).astype(s.dtype),
                          param_shapes(config, dtype))
    t0 = time.perf_counter()
    save_hf_params(params, config, path, dtype=dtype, max_shard_bytes=64 * 2**20)
    return time.perf_counter() - t0


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def writer(path: str, dtype: str, size_mb: float) -> None:
    cfg = bench_config(int(size_mb * 2**20), 4 if dtype == "float32" else 2)
    seconds = write_random(Path(path), cfg, dtype)
    print(json.dumps({"seconds": seconds, "layers": cfg.num_hidden_layers, "experts": cfg.num_experts,
                      "files": len(list(Path(path).glob("*.safetensors")))}))


def run(*args: str) -> dict:
    """Every step runs in its own process: Linux keeps ``ru_maxrss`` across fork + exec, so a child
    spawned by a process holding the random weights would inherit that process's peak."""
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{args[0]} step failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=200.0, help="target checkpoint size on disk")
    ap.add_argument("--keep", type=Path, default=None, help="write checkpoints here and keep them")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--write", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.dtype)
        return 0
    if args.write:
        writer(args.write, args.dtype, args.size_mb)
        return 0

    mb = 2**20
    root = args.keep or Path(tempfile.mkdtemp(prefix="dmax_load_bench_"))
    cases = (("float32", "float32"), ("bfloat16", "bfloat16"), ("bfloat16", "float32"))
    rows, ok = [], True
    try:
        for disk_dt in ("float32", "bfloat16"):
            ckpt = root / f"ckpt_{disk_dt}"
            if ckpt.exists():
                shutil.rmtree(ckpt)
            w = run("--write", str(ckpt), "--dtype", disk_dt, "--size-mb", str(args.size_mb))
            size = disk_bytes(ckpt)
            print(f"wrote {ckpt} ({size / mb:.1f} MB in {w['files']} files, {w['layers']} layers, "
                  f"{w['experts']} experts) in {w['seconds']:.2f} s", flush=True)
            for load_dt in (ld for d, ld in cases if d == disk_dt):
                r = run("--child", str(ckpt), "--dtype", load_dt)
                net = r["peak"] - r["baseline"]
                same = disk_dt == load_dt
                passed = net <= TARGET_RATIO * size
                ok &= passed or not same
                rows.append((f"{disk_dt}->{load_dt}", size / mb, r["loaded_bytes"] / mb, r["seconds"],
                             r["seconds"] / (size / 2**30), r["baseline"] / mb, r["peak"] / mb, net / mb,
                             net / size, net / r["loaded_bytes"],
                             ("yes" if passed else "NO") if same else "n/a"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    head = ("case", "disk MB", "loaded MB", "load s", "s/GB", "base RSS MB", "peak RSS MB", "net MB",
            "net/disk", "net/loaded", f"<= {TARGET_RATIO}x")
    fmt = "{:<20}" + "{:>12}" * (len(head) - 1)
    print(fmt.format(*head))
    for r in rows:
        print(fmt.format(r[0], *(f"{v:.2f}" if isinstance(v, float) else v for v in r[1:])))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
