"""The decode-trace schema (docs/internals.md "Decoding results and traces"), dependency-free.

One place for the names that the decoder writes (``decoding.stats``) and the viewer reads
(``dmax_jax.viz``): the per-position state names (index = the int8 code in the trace buffers) and
the keys of a trace and of one of its steps.
"""

STATE_NAMES = ("prompt", "masked", "soft", "committed", "revised")
PROMPT, MASKED, SOFT, COMMITTED, REVISED = range(len(STATE_NAMES))
TRACE_KEYS = ("prompt_len", "block_length", "mask_id", "eos_id", "steps")
STEP_KEYS = ("block", "block_start", "step", "cross", "tokens", "confidence", "state")
