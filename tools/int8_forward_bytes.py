"""Bytes per decode block forward of DMax-16B by the TPU compiler: bf16 weights vs int8 weight-only.

    JAX_PLATFORMS=cpu python tools/int8_forward_bytes.py [--target v5p] [--batch 1] [--json OUT]

The same measurement as ``bench/aot.py::forward_bytes_row`` (``bench/fullsize.py::depth_corrected_cost``:
three one-layer-per-stack programs compiled for a compile-only chip, the cost analysis' "bytes accessed"
scaled to the real depth), once with the bf16 parameter tree and once with ``model.quant.quantize_abstract``
of it (int8 weights + float32 per-channel scales; bf16 compute). Also the resident weight bytes of each tree.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="v5p")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--cache", type=int, default=2048)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import bench.fullsize as fs
    from dmax_jax.aot.targets import topology_devices
    from dmax_jax.config import PRESETS
    from dmax_jax.model.quant import quantize_abstract, weight_bytes

    cfg = PRESETS["dmax_16b"]()
    device = topology_devices(args.target, None)[0]
    plain = fs.param_shapes
    rows = {}
    for weights in ("native", "int8"):
        fs.param_shapes = plain if weights == "native" else (lambda c, dt: quantize_abstract(plain(c, dt)))
        got = fs.depth_corrected_cost(cfg, args.batch, args.block, args.cache, "bfloat16", None, device)
        rows[weights] = {"bytes_per_forward": got["bytes"],
                         "bytes_per_moe_layer": got["bytes_per_moe_layer"],
                         "bytes_per_dense_layer": got["bytes_per_dense_layer"],
                         "weight_bytes": weight_bytes(fs.param_shapes(cfg, fs.DECODE_DTYPES["bfloat16"]))}
    fs.param_shapes = plain
    out = {"target": args.target, "device_kind": device.device_kind, "batch": args.batch, "block": args.block,
           "cache": args.cache, **rows,
           "int8_over_bf16_bytes_per_forward":
               rows["int8"]["bytes_per_forward"] / rows["native"]["bytes_per_forward"]}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
