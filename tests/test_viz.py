"""Decode-trace HTML page: structure, escaping, validation, and a real headless-Chromium render."""

from __future__ import annotations

import copy
import html
from html.parser import HTMLParser

import pytest

from dmax_jax.viz.html import render_trace_html, write_trace_html

MASK, EOS = 2, 1
VOCAB = {1: "<|endoftext|>", 5: "Question", 6: ":", 7: " 3", 10: "\n", 20: " Tom", 21: " has", 22: " apples",
         23: " +", 24: " buys", 30: "7", 31: " so", 32: ".", 33: " =",
         66: "<script>alert('x')</script>", 67: 'a&b"c'}


def token_text(i: int) -> str:
    return VOCAB[i]


def _step(block, start, step, tokens, conf, state, cross=False):
    return {"block": block, "block_start": start, "step": step, "cross": cross, "tokens": tokens,
            "confidence": conf, "state": state}


M, P, S, C, R, K = MASK, "prompt", "soft", "committed", "revised", "masked"


def make_trace() -> dict:
    """Two blocks of 8 as SPD produces them: prompt tail, soft tokens, revisions, a cross step, EOS."""
    pt = [5, 6, 7]
    one = [1.0, 1.0, 1.0]
    steps = [
        _step(0, 0, 1, pt + [20, 21, M, M, M], one + [.92, .61, .31, .22, .18], [P] * 3 + [S, S, K, K, K]),
        _step(0, 0, 2, pt + [20, 24, 22, 66, M], one + [.95, .70, .66, .40, .25], [P] * 3 + [S, R, S, S, K]),
        _step(0, 0, 3, pt + [20, 24, 22, 23, 10], one + [.97, .88, .80, .58, .52], [P] * 3 + [S, S, S, R, S]),
        _step(0, 0, 4, pt + [20, 24, 22, 23, 10], one + [.99, .97, .95, .93, .91], [P] * 3 + [C] * 5),
        _step(1, 8, 1, [30, 31, M, M, M, M, M, M], [.9, .7, .4, .3, .2, .2, .1, .1], [S, S] + [K] * 6,
              cross=True),
        _step(1, 8, 2, [30, 31, 67, 32, 1, M, M, M], [.93, .6, .7, .8, .75, .3, .2, .2], [S] * 5 + [K] * 3),
        _step(1, 8, 3, [30, 33, 67, 32, 1, 1, 1, 1], [.95, .81, .9, .9, .9, .9, .9, .9], [S, R] + [S] * 6),
        _step(1, 8, 4, [30, 33, 67, 32, 1, 1, 1, 1], [.97, .93, .94, .95, .96, .97, .98, .99], [C] * 8),
    ]
    return {"prompt_len": 3, "block_length": 8, "mask_id": MASK, "eos_id": EOS, "steps": steps}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None]):
        self.tag, self.attrs = tag, attrs
        self.content: list[Node | str] = []  # child nodes and text, in document order

    @property
    def children(self) -> list[Node]:
        return [c for c in self.content if isinstance(c, Node)]

    @property
    def classes(self) -> list[str]:
        return (self.attrs.get("class") or "").split()

    def iter(self):
        yield self
        for c in self.children:
            yield from c.iter()

    def find(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes)]

    def all_text(self) -> str:
        return "".join(c if isinstance(c, str) else c.all_text() for c in self.content)


class TreeBuilder(HTMLParser):
    VOID = {"meta", "input", "br", "img", "link", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].content.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        for k in range(len(self.stack) - 1, 0, -1):
            if self.stack[k].tag == tag:
                del self.stack[k:]
                return
        raise AssertionError(f"unbalanced </{tag}>")

    def handle_data(self, data):
        self.stack[-1].content.append(data)


def parse(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert [n.tag for n in builder.stack] == ["#root"], "unclosed elements"
    return builder.root


def expected_label(tok: int, state: str) -> str:
    if state == "masked":
        return "[M]"
    return "EOS" if tok == EOS else VOCAB[tok].replace("\n", "\u21b5")


def test_page_structure_matches_trace():
    trace = make_trace()
    root = parse(render_trace_html(trace, token_text, title="GSM8K #0"))
    assert [n.all_text() for n in root.find("title")] == ["GSM8K #0"]
    blocks = root.find("section", "block")
    assert [(b.attrs["data-block"], b.attrs["data-steps"]) for b in blocks] == [("0", "4"), ("1", "4")]
    rows = root.find("div", "step")
    assert len(rows) == len(trace["steps"])
    prev_tokens: dict[int, list[int]] = {}
    for k, (row, st) in enumerate(zip(rows, trace["steps"])):
        assert (row.attrs["data-block"], row.attrs["data-step"], row.attrs["data-index"]) == (
            str(st["block"]), str(st["step"]), str(k))
        assert row.attrs["data-cross"] == str(int(st["cross"]))
        assert bool(row.find("span", "badge")) == st["cross"]
        chips = row.find("span", "tok")
        assert [c.classes[1] for c in chips] == st["state"]
        labels = [expected_label(t, s) for t, s in zip(st["tokens"], st["state"])]
        assert [c.all_text() for c in chips] == labels
        before = prev_tokens.get(st["block"], [t if s == "prompt" else MASK
                                               for t, s in zip(st["tokens"], st["state"])])
        for chip, tok, conf, state, old in zip(chips, st["tokens"], st["confidence"], st["state"], before):
            assert ("new" in chip.classes) == (old == MASK and tok != MASK)
            assert f"conf {conf:.3f}" in chip.attrs["title"]
            if state in ("soft", "revised"):
                assert chip.attrs["style"] == f"--c:{conf:.3f}"
                assert ("hi" in chip.classes) == (conf >= 0.55)
            if state == "revised":
                assert old not in (tok, MASK)
                assert chip.attrs["data-prev"] == VOCAB[old] and f"(id {old})" in chip.attrs["title"]
            else:
                assert "data-prev" not in chip.attrs
            assert ("eos" in chip.classes) == (tok == EOS and state != "masked")
        prev_tokens[st["block"]] = st["tokens"]
    # per-block header counts and the trace summary
    heads = [b.find("h3")[0].all_text() for b in blocks]
    assert "4 steps (1 cross)" in heads[1] and "cross" not in heads[0]
    assert "2 revisions" in heads[0] and "5 tokens" in heads[0] and "EOS" not in heads[0]
    assert "1 revisions" in heads[1] and "4 tokens" in heads[1] and "EOS" in heads[1]
    summary = root.find("div", "stats")[0].all_text()
    # tokens before EOS: 5 in block 0 + 4 in block 1 = 9 over 8 block steps
    assert "9 tokens before EOS" in summary and "1.12 tokens / step" in summary and "3 revisions" in summary
    # the sticky sequence view holds each block's final state
    flow = root.find("span", "fblk")
    assert [f.attrs["data-block"] for f in flow] == ["0", "1"]
    for f, st in zip(flow, (trace["steps"][3], trace["steps"][7])):
        assert [c.classes[1] for c in f.find("span", "tok")] == st["state"]
    assert len(root.find("span", "nl")) == 3  # the "\n" token: block-0 steps 3 and 4, and the flow view
    # self-contained: no external resources
    assert not [n for n in root.iter() if n.attrs.get("src") or n.tag == "link"]


def test_token_text_and_title_are_escaped():
    page = render_trace_html(make_trace(), token_text, title="<b>x</b> & \"y\"")
    assert "<script>alert" not in page and "<b>x</b>" not in page
    assert html.escape(VOCAB[66]) in page and "&lt;b&gt;x&lt;/b&gt; &amp; &quot;y&quot;" in page
    root = parse(page)
    assert len(root.find("script")) == 1  # only the page's own script
    revised = [c for c in root.find("span", "revised") if c.attrs.get("data-prev") == VOCAB[66]]
    assert len(revised) == 1 and revised[0].all_text() == " +"
    assert {c.all_text() for c in root.find("span", "tok")} >= {VOCAB[66], VOCAB[67]}


def test_tokenizer_object_is_accepted(tmp_path):
    from transformers import AutoTokenizer

    from dmax_jax.data.tokenizer_build import build_tokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "tok"))
    ids = tok.encode("Tom has 7 apples", add_special_tokens=False)
    trace = {"prompt_len": 0, "block_length": len(ids), "mask_id": tok.mask_token_id,
             "eos_id": tok.eos_token_id,
             "steps": [_step(0, 0, 1, ids, [0.9] * len(ids), ["committed"] * len(ids))]}
    root = parse(render_trace_html(trace, tok))
    texts = [c.all_text() for c in root.find("div", "step")[0].find("span", "tok")]
    assert "".join(texts) == "Tom has 7 apples"


def test_multiple_rows_and_write(tmp_path):
    trace = make_trace()
    other = copy.deepcopy(trace)
    other["steps"] = other["steps"][:4]
    out = write_trace_html(tmp_path / "a" / "b.html", [trace, other], token_text, prompt_text=["Q1?", "Q2?"])
    page = out.read_text(encoding="utf-8")
    assert page == render_trace_html([trace, other], token_text, prompt_text=["Q1?", "Q2?"])
    root = parse(page)
    rows = root.find("section", "trace")
    assert [(r.attrs["data-row"], r.attrs["data-steps"], r.attrs["data-blocks"]) for r in rows] == [
        ("0", "8", "2"), ("1", "4", "1")]
    assert [r.find("span", "ptxt")[0].all_text() for r in rows] == ["Q1?", "Q2?"]
    assert all("has-prompt" in r.find("div", "flow")[0].classes for r in rows)
    with pytest.raises(ValueError, match="prompt_text has 1 entries for 2"):
        render_trace_html([trace, other], token_text, prompt_text=["Q1?"])


def test_numpy_trace_renders_like_lists():
    np = pytest.importorskip("numpy")
    trace = make_trace()
    arr = copy.deepcopy(trace)
    arr["block_length"] = np.int64(8)
    for st in arr["steps"]:
        st["tokens"] = np.asarray(st["tokens"], np.int32)
        st["confidence"] = np.asarray(st["confidence"], np.float32).astype(np.float64)
        st["state"] = np.asarray(st["state"])
        st["cross"] = np.bool_(st["cross"])
    assert render_trace_html(arr, token_text) == render_trace_html(trace, token_text)
    # a NaN confidence (e.g. unset on prompt positions) is shown as such, never breaks the shading
    arr["steps"][0]["confidence"][0] = np.nan
    arr["steps"][0]["confidence"][3] = np.nan
    chips = parse(render_trace_html(arr, token_text)).find("div", "step")[0].find("span", "tok")
    assert "conf nan" in chips[0].attrs["title"] and chips[3].attrs["style"] == "--c:0.000"


@pytest.mark.parametrize("mutate, err, match", [
    (lambda t: t.pop("eos_id"), ValueError, "missing key 'eos_id'"),
    (lambda t: t["steps"][2].pop("cross"), ValueError, r"\['steps'\]\[2\] is missing key 'cross'"),
    (lambda t: t["steps"][1]["state"].__setitem__(0, "final"), ValueError, "unknown state 'final'"),
    (lambda t: t["steps"][5]["confidence"].pop(), ValueError, r"\['confidence'\] has length 7"),
    (lambda t: t["steps"].append(copy.deepcopy(t["steps"][0])), ValueError, "block 0 are not consecutive"),
    (lambda t: t["steps"][6].__setitem__("block_start", 16), ValueError, "block_start"),
    (lambda t: t.__setitem__("steps", []), ValueError, "non-empty"),
    (lambda t: t.__setitem__("block_length", 0), ValueError, "block_length"),
])
def test_invalid_traces_raise(mutate, err, match):
    trace = make_trace()
    mutate(trace)
    with pytest.raises(err, match=match):
        render_trace_html(trace, token_text)


def test_invalid_token_text_raises():
    with pytest.raises(TypeError, match="token_text must be"):
        render_trace_html(make_trace(), {1: "x"})
    with pytest.raises(TypeError, match=r"token_text\(5\) returned int"):
        render_trace_html(make_trace(), lambda i: i)
    with pytest.raises(ValueError, match="trace is empty"):
        render_trace_html([], token_text)


@pytest.mark.browser
def test_chromium_renders_page(tmp_path):
    import browser

    trace = make_trace()
    page = write_trace_html(tmp_path / "trace.html", trace, token_text, title="render check",
                            prompt_text="Question: 3")
    url = page.resolve().as_uri()

    png = browser.screenshot(url, tmp_path / "shot.png", size=(1200, 900))
    width, height, rows = browser.read_png_rgb(png)
    assert (width, height) == (1200, 900)
    pixels = [bytes(r[i:i + 3]) for r in rows for i in range(0, len(r), 3)]
    counts: dict[bytes, int] = {}
    for p in pixels:
        counts[p] = counts.get(p, 0) + 1
    background = max(counts, key=counts.get)
    assert counts[background] < 0.95 * len(pixels), "screenshot is (nearly) blank"
    assert len(counts) > 100, f"only {len(counts)} distinct colours: page did not render"
    # solid fills of the state chips are on screen: masked grey, committed green, shaded soft blue
    assert counts.get(bytes.fromhex("e5e7eb"), 0) > 200 and counts.get(bytes.fromhex("dcfce7"), 0) > 200
    assert sum(n for p, n in counts.items() if p[2] > p[0] + 80 and p[2] > p[1] + 40) > 500

    dom = parse(browser.dump_dom(url))
    body = dom.find("body")[0]
    assert body.attrs.get("data-ready") == "1" and "js" in body.classes, "page script did not run"
    steps = dom.find("div", "step")
    assert len(steps) == 8 and len(dom.find("section", "block")) == 2
    assert not dom.find("div", "future")
    assert [s.attrs["data-index"] for s in dom.find("div", "current")] == ["7"]
    assert dom.find("span", "where")[0].all_text() == "step 8 / 8 \u00b7 block 1, step 4"
    section = dom.find("section", "trace")[0]  # step rows + sequence view (the legend lies outside)
    for state in ("prompt", "masked", "soft", "committed", "revised"):
        assert len(section.find("span", state)) == sum(
            s["state"].count(state) for s in trace["steps"]) + sum(
            s["state"].count(state) for s in (trace["steps"][3], trace["steps"][7]))

    # the scrubber, positioned by the URL: step index 2 = block 0, step 3; block 1 not reached yet
    dom = parse(browser.dump_dom(url + "#step=2"))
    assert [s.attrs["data-index"] for s in dom.find("div", "future")] == [str(i) for i in range(3, 8)]
    assert dom.find("span", "where")[0].all_text() == "step 3 / 8 \u00b7 block 0, step 3"
    flow = dom.find("span", "fblk")
    assert [c.classes[1] for c in flow[0].find("span", "tok")] == trace["steps"][2]["state"]
    assert flow[1].find("span", "tok") == []
