"""Decode trace → one self-contained HTML page (issue 6).

Why: Soft Parallel Decoding (algorithm §5.2) fills a block in a few forwards, keeps decoded tokens *soft*
(re-decodable) and revises them; the numbers (NFE, TPF) do not show *how* a block converged. The page
shows every step of every block as a row of token chips: masked, soft (shaded by confidence), committed,
revised (previous token on hover) and prompt-tail tokens, plus a scrubber that replays the steps.

Input is the ``DecodeTrace`` contract of docs/internals.md (one dict per batch row). The page has no
external assets (inline CSS and a small inline script); all token text is HTML-escaped.
"""

from __future__ import annotations

import html
import math
import operator
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dmax_jax.decoding.trace_schema import RESULT_KEYS, STATE_NAMES, STEP_KEYS, TRACE_KEYS
from dmax_jax.viz._static import CSS, JS

_HI_CONFIDENCE = 0.55  # above this the shaded chip background is dark enough for white text
_LEGEND = (  # (classes, sample text, confidence for the shade, description)
    ("prompt", "abc", 0, "prompt tail inside the first block"),
    ("masked", "[M]", 0, "still [MASK]"),
    ("soft", "p.3", 0.3, ""),
    ("soft hi", "p.9", 0.9, "soft: decoded, still re-decodable; shade = confidence"),
    ("revised hi", "xyz", 0.6, "revised this step (hover: previous token)"),
    ("committed", "ok", 0, "committed (final)"),
    ("soft new", "abc", 0.45, "underline = newly decoded this step"),
)


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def _display(text: str) -> str:
    """Make whitespace and control characters visible inside a fixed-width chip."""
    if text == "":
        return "\u2205"
    out = text.replace("\r\n", "\n").replace("\n", "\u21b5").replace("\t", "\u21e5").replace("\r", "\u240d")
    return "".join(ch if ch >= " " else f"\\x{ord(ch):02x}" for ch in out)


def _resolve_token_text(token_text: Any) -> Callable[[int], str]:
    """Accept a ``tokenizer`` (anything with ``decode(list[int])``) or a plain ``id -> str`` callable."""
    decode = getattr(token_text, "decode", None)
    if callable(decode) and not isinstance(token_text, (bytes, bytearray)):
        fn: Callable[[int], str] = lambda i: decode([i], skip_special_tokens=False)
    elif callable(token_text):
        fn = token_text
    else:
        raise TypeError(f"token_text must be a callable id -> str or a tokenizer with .decode, "
                        f"got {type(token_text).__name__}")
    cache: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in cache:
            s = fn(i)
            if not isinstance(s, str):
                raise TypeError(f"token_text({i}) returned {type(s).__name__}, expected str")
            cache[i] = s
        return cache[i]

    return text


def _validate(trace: Any, row: int) -> list[list[dict[str, Any]]]:
    """Check one DecodeTrace and group its steps by block (steps of a block must be consecutive)."""
    where = f"trace[{row}]"
    if not isinstance(trace, Mapping):
        raise TypeError(f"{where} must be a dict (DecodeTrace), got {type(trace).__name__}")
    for key in TRACE_KEYS:
        if key not in trace:
            raise ValueError(f"{where} is missing key {key!r}")
    try:
        blen = operator.index(trace["block_length"])  # accepts numpy integers too
    except TypeError:
        blen = 0
    if blen <= 0:
        raise ValueError(f"{where}['block_length'] must be a positive int, got {trace['block_length']!r}")
    steps = trace["steps"]
    if not isinstance(steps, Sequence) or len(steps) == 0:
        raise ValueError(f"{where}['steps'] must be a non-empty list of steps")
    blocks: list[list[dict[str, Any]]] = []
    seen: set[int] = set()
    for k, st in enumerate(steps):
        sw = f"{where}['steps'][{k}]"
        if not isinstance(st, Mapping):
            raise TypeError(f"{sw} must be a dict, got {type(st).__name__}")
        for key in STEP_KEYS:
            if key not in st:
                raise ValueError(f"{sw} is missing key {key!r}")
        for key in ("tokens", "confidence", "state"):
            if len(st[key]) != blen:
                raise ValueError(f"{sw}[{key!r}] has length {len(st[key])}, expected block_length={blen}")
        bad = [s for s in st["state"] if s not in STATE_NAMES]
        if bad:
            raise ValueError(f"{sw}['state'] has unknown state {bad[0]!r}; expected one of {STATE_NAMES}")
        b = int(st["block"])
        if blocks and int(blocks[-1][0]["block"]) == b:
            if int(st["block_start"]) != int(blocks[-1][0]["block_start"]):
                raise ValueError(f"{sw}['block_start'] differs from the earlier steps of block {b}")
            blocks[-1].append(st)
        elif b in seen:
            raise ValueError(f"{sw}: steps of block {b} are not consecutive")
        else:
            seen.add(b)
            blocks.append([st])
    return blocks


def _conf(x: Any) -> float:
    """Confidence for shading and means; a non-finite value (e.g. unset on prompt positions) counts as 0."""
    c = float(x)
    return c if math.isfinite(c) else 0.0


def _chip(tok: int, state: str, conf: float, pos: int, prev: int | None, tr: Mapping[str, Any],
          text: Callable[[int], str]) -> str:
    """One token chip. ``prev`` = the token at this position before this step (None for none)."""
    mask_id, eos_id = int(tr["mask_id"]), int(tr["eos_id"])
    classes = ["tok", state]
    if state == "masked" or tok == mask_id:
        label = "[M]"
    elif tok == eos_id:
        label, classes = "EOS", classes + ["eos"]
    else:
        raw = text(tok)
        label = _display(raw)
        if "\n" in raw:
            classes.append("nl")
    if prev == mask_id and tok != mask_id:
        classes.append("new")
    tip = f"pos {pos} \u00b7 {state} \u00b7 id {tok} \u00b7 conf {conf:.3f}"
    attrs = ""
    if state in ("soft", "revised"):
        attrs += f' style="--c:{_conf(conf):.3f}"'
        if _conf(conf) >= _HI_CONFIDENCE:
            classes.append("hi")
    if prev is not None and prev != tok and prev != mask_id:
        shown = "EOS" if prev == eos_id else _display(text(prev))
        tip += f" \u00b7 was {shown!r} (id {prev})"
        if state == "revised":
            attrs += f' data-prev="{_esc(shown)}"'
    return f'<span class="{" ".join(classes)}" title="{_esc(tip)}"{attrs}>{_esc(label)}</span>'


def _row_chips(st: Mapping[str, Any], prev: Sequence[int] | None, tr: Mapping[str, Any],
               text: Callable[[int], str]) -> str:
    start = int(st["block_start"])
    return "".join(
        _chip(int(t), s, float(c), start + j, None if prev is None else int(prev[j]), tr, text)
        for j, (t, c, s) in enumerate(zip(st["tokens"], st["confidence"], st["state"])))


def _step_row(st: Mapping[str, Any], prev: list[int], index: int, tr: Mapping[str, Any],
              text: Callable[[int], str]) -> str:
    """One step = label (step number, cross badge, +new / revised / masked counts) and its chips."""
    mask_id = int(tr["mask_id"])
    new = sum(p == mask_id and int(t) != mask_id for p, t in zip(prev, st["tokens"]))
    rev, left = list(st["state"]).count("revised"), list(st["state"]).count("masked")
    cross = bool(st["cross"])
    step = _esc(str(st["step"]))
    counts = f"+{new} new" + (f" \u00b7 \u21bb{rev}" if rev else "") + (f" \u00b7 {left} [M]" if left else "")
    return (f'<div class="step" data-block="{int(st["block"])}" data-step="{step}" data-index="{index}" '
            f'data-cross="{int(cross)}"><div class="lbl" title="+{new} newly decoded, {rev} revised, '
            f'{left} still masked"><span class="sn">step {step}'
            f'{"<span class=badge>cross</span>" if cross else ""}</span><span>{counts}</span></div>'
            f'<div class="toks">{_row_chips(st, prev, tr, text)}</div></div>')


def _render_block(steps: list[dict[str, Any]], first_index: int, tr: Mapping[str, Any],
                  text: Callable[[int], str]) -> tuple[str, list[tuple[int, float]], int]:
    """A block section; also returns its final generated (token, confidence) pairs and revision count."""
    mask_id, eos_id, blen = int(tr["mask_id"]), int(tr["eos_id"]), int(tr["block_length"])
    b, start = int(steps[0]["block"]), int(steps[0]["block_start"])
    # Before its first step every non-prompt position of a block is [MASK] (algorithm §5.2).
    prev = [int(t) if s == "prompt" else mask_id for t, s in zip(steps[0]["tokens"], steps[0]["state"])]
    rows = []
    for k, st in enumerate(steps):
        rows.append(_step_row(st, prev, first_index + k, tr, text))
        prev = [int(t) for t in st["tokens"]]
    last = steps[-1]
    gen = [(int(t), _conf(c)) for t, s, c in zip(last["tokens"], last["state"], last["confidence"])
           if s != "prompt" and int(t) != mask_id]
    revisions = sum(list(st["state"]).count("revised") for st in steps)
    n_cross = sum(bool(st["cross"]) for st in steps)
    kept = _until_eos(gen, eos_id)
    pills = [f"<b>{len(steps)}</b> steps" + (f" ({n_cross} cross)" if n_cross else ""),
             f"<b>{len(kept)}</b> tokens", f"<b>{revisions}</b> revisions"]
    if gen:
        pills.append(f"mean final conf <b>{sum(c for _, c in gen) / len(gen):.2f}</b>")
    if len(kept) < len(gen):
        pills.append("<b>EOS</b>")
    pos = "".join(f"<span>{start + j}</span>" for j in range(blen))
    return (f'<section class="block" data-block="{b}" data-steps="{len(steps)}"><h3>Block {b} '
            f'<small>positions {start}\u2013{start + blen - 1}</small>'
            + "".join(f'<span class="pill">{p}</span>' for p in pills)
            + f'</h3><div class="grid"><div class="pos" aria-hidden="true">{pos}</div>{"".join(rows)}</div>'
            "</section>", gen, revisions)


def _until_eos(gen: list[tuple[int, float]], eos_id: int) -> list[tuple[int, float]]:
    for k, (t, _) in enumerate(gen):
        if t == eos_id:
            return gen[:k]
    return gen


_CONTROLS = (
    '<div class="controls"><button class="first" title="first step">\u00ab</button>'
    '<button class="prev" title="previous step">\u2039</button>'
    '<button class="play" title="play / pause">\u25b6</button>'
    '<button class="next" title="next step">\u203a</button>'
    '<button class="last" title="last step">\u00bb</button>'
    '<input class="scrub" type="range" min="0" max="{m}" value="{m}" aria-label="decoding step">'
    '<span class="where"></span></div>')


def _render_trace(tr: Mapping[str, Any], blocks: list[list[dict[str, Any]]], row: int,
                  text: Callable[[int], str], prompt_text: str | None) -> str:
    """One batch row: summary pills, scrubber, sticky sequence view (final state), block sections."""
    eos_id, blen = int(tr["eos_id"]), int(tr["block_length"])
    total = sum(len(b) for b in blocks)
    parts, flow = [], []
    index = generated = revisions = 0
    eos_seen = False
    for steps in blocks:
        part, gen, rev = _render_block(steps, index, tr, text)
        parts.append(part)
        flow.append(f'<span class="fblk" data-block="{int(steps[0]["block"])}">'
                    f"{_row_chips(steps[-1], None, tr, text)}</span>")
        index += len(steps)
        revisions += rev
        if not eos_seen:
            kept = _until_eos(gen, eos_id)
            generated += len(kept)
            eos_seen = len(kept) < len(gen)
    stats = [f"prompt <b>{int(tr['prompt_len'])}</b> tokens", f"block length <b>{blen}</b>",
             f"<b>{len(blocks)}</b> blocks", f"<b>{generated}</b> tokens before EOS"]
    if all(k in tr for k in RESULT_KEYS):  # the decoder's own accounting: the same TPF as its result
        nfe, ref = int(tr["nfe"]), int(tr["tokens_ref"])
        stats += [f"<b>{total}</b> block steps + <b>{int(tr['prefill_forwards'])}</b> prefill = "
                  f"<b>{nfe}</b> forwards (NFE)",
                  f"TPF <b>{ref / nfe if nfe else 0.0:.2f}</b> ({ref} tokens / {nfe} forwards)"]
    else:
        stats += [f"<b>{total}</b> block steps (forwards, no prefill)",
                  f"<b>{generated / total:.2f}</b> tokens / step"]
    stats.append(f"<b>{revisions}</b> revisions")
    has_prompt = prompt_text is not None
    ptxt = f'<span class="ptxt">{_esc(prompt_text)}</span>' if has_prompt else ""
    return (f'<section class="trace" data-row="{row}" data-steps="{total}" data-blocks="{len(blocks)}" '
            f'style="--n:{blen}"><header><h2>Sequence {row}</h2></header><div class="stats">'
            + "".join(f'<span class="pill">{s}</span>' for s in stats) + "</div>"
            + _CONTROLS.format(m=total - 1)
            + f'<div class="flow{" has-prompt" if has_prompt else ""}" title="sequence at the selected step">'
            f'{ptxt}{"".join(flow)}</div>{"".join(parts)}</section>')


def render_trace_html(trace: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                      token_text: Callable[[int], str] | Any, *, title: str = "DMax decoding trace",
                      prompt_text: str | Sequence[str] | None = None) -> str:
    """Render one DecodeTrace (or a list of them, one per batch row) as a self-contained HTML page.

    ``token_text`` maps a token id to its text: a callable, or a tokenizer (``decode([id])`` is used).
    ``prompt_text`` (a string, or one per row) is shown dimmed before the generated text when given.
    """
    traces = [trace] if isinstance(trace, Mapping) else list(trace)
    if not traces:
        raise ValueError("trace is empty: expected a DecodeTrace dict or a non-empty list of them")
    if prompt_text is None or isinstance(prompt_text, str):
        prompts: list[str | None] = [prompt_text] * len(traces)
    else:
        prompts = list(prompt_text)
        if len(prompts) != len(traces):
            raise ValueError(f"prompt_text has {len(prompts)} entries for {len(traces)} trace rows")
    text = _resolve_token_text(token_text)
    sections = [_render_trace(tr, _validate(tr, r), r, text, prompts[r]) for r, tr in enumerate(traces)]
    legend = "".join(
        f'<span class="item"><span class="tok {cls}" style="--c:{c}">{_esc(sample)}</span>{_esc(desc)}</span>'
        for cls, sample, c, desc in _LEGEND)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f'<h1>{_esc(title)}</h1><div class="meta">Soft Parallel Decoding trace \u00b7 one row per forward '
        "inside a block \u00b7 hover a token for its id, confidence and previous token.</div>"
        f'<div class="legend">{legend}</div>{"".join(sections)}'
        "<footer>Generated by dmax_jax.viz.html</footer>"
        f"<script>{JS}</script></body></html>\n")


def write_trace_html(path: str | os.PathLike[str], trace: Mapping[str, Any] | Sequence[Mapping[str, Any]],
                     token_text: Callable[[int], str] | Any, *, title: str = "DMax decoding trace",
                     prompt_text: str | Sequence[str] | None = None) -> pathlib.Path:
    """Render (see ``render_trace_html``) and write the page to ``path`` (parents created); returns it."""
    out = pathlib.Path(path)
    page = render_trace_html(trace, token_text, title=title, prompt_text=prompt_text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
