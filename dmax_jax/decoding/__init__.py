"""Block decoding for LLaDA2-MoE: Soft Parallel Decoding and the threshold / HF-generate baselines.

``generate(model, prompt_ids, strategy="spd"|"threshold"|"llada2", ...) -> GenerateResult`` runs one
compiled program per request shape (prefill + block loop + step loop, all ``lax.while_loop``);
``compile_count()`` reports how many programs were compiled. Layout: ``layout`` (buckets, row
geometry), ``strategies`` (per-step rules), ``cache`` (model calls against the KV cache), ``loop``
(the compiled program), ``stats`` (results, NFE/TPF, traces), ``api`` (``generate``).
"""

from dmax_jax.decoding.api import clear_compiled, compile_count, generate
from dmax_jax.decoding.loop import DecodeSpec
from dmax_jax.decoding.stats import DecodeTrace, GenerateResult
from dmax_jax.decoding.strategies import STATE_NAMES, STRATEGIES

__all__ = ["DecodeSpec", "DecodeTrace", "GenerateResult", "STATE_NAMES", "STRATEGIES", "clear_compiled",
           "compile_count", "generate"]
