"""``python -m dmax_jax.aot``: compile a training / decoding / serving program for a named chip from
this host, with no chip attached, and report the target compiler's memory plan and kernels.

    python -m dmax_jax.aot --target h200 --topology 1x1x8 --program train \\
        --config configs/llada2_mini_oput.yaml [key=value ...] --json r.json
    python -m dmax_jax.aot --target v6e --topology v6e:2x2 --program generate \\
        --model preset:dmax_16b --batch 1 --mesh expert=4

Bad flags exit 2 with one line; what compiles and what does not is in the report (exit 0 either
way: "does not fit" is an answer, not an error).
"""

from __future__ import annotations

import sys

from dmax_jax.aot.cli import main

if __name__ == "__main__":
    sys.exit(main())
