"""Serving: the continuous-batching slot engine (``engine``) and its request/event types."""

from dmax_jax.serving.engine import SERVED_STRATEGIES, Engine
from dmax_jax.serving.requests import (
                                       FINISH_REASONS,
                                       BlockCommitted,
                                       EngineClosedError,
                                       EngineRequest,
                                       EngineRequestError,
                                       Event,
                                       Finished,
                                       ProvisionalStep,
                                       RequestHandle,
                                       Usage,
)

__all__ = ["FINISH_REASONS", "SERVED_STRATEGIES", "BlockCommitted", "Engine", "EngineClosedError",
           "EngineRequest", "EngineRequestError", "Event", "Finished", "ProvisionalStep", "RequestHandle",
           "Usage"]
