"""Decode-trace visualisation: ``DecodeTrace`` dicts (docs/internals.md) → a self-contained HTML page."""

from dmax_jax.viz.html import render_trace_html, write_trace_html

__all__ = ["render_trace_html", "write_trace_html"]
