"""Inline CSS and JS for the decode-trace page (kept apart from the renderer so both stay readable).

Why inline: the page must open from a file:// URL, be mailed around and archived next to eval
results, so it carries no external assets.
"""

CSS = """
:root { --mask:#e5e7eb; --ink:#0f172a; --dim:#94a3b8; --soft:37,99,235; --rev:217,119,6;
        --ok:#15803d; --okbg:#dcfce7; --line:#e2e8f0;
        --mono: ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace; }
* { box-sizing: border-box; }
body { margin: 0; padding: 18px 22px 40px; font: 14px/1.45 system-ui, -apple-system, "Segoe UI",
       Roboto, "DejaVu Sans", sans-serif; color: var(--ink); background: #f8fafc; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 16px; margin: 0; }
h3 { font-size: 14px; margin: 0 0 6px; display: flex; gap: 8px; align-items: baseline; flex-wrap: wrap; }
h3 small, .meta { color: #64748b; font-weight: 400; font-size: 12px; }
.legend { display: flex; flex-wrap: wrap; gap: 10px 16px; align-items: center; margin: 10px 0 14px;
          font-size: 12px; color: #334155; }
.legend .item { display: flex; gap: 6px; align-items: center; }
.legend .tok { min-width: 3.2em; }
.trace { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px;
         margin: 0 0 18px; }
.stats { display: flex; flex-wrap: wrap; gap: 6px; margin: 8px 0; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 999px; background: #f1f5f9;
        border: 1px solid var(--line); font-size: 12px; color: #334155; white-space: nowrap; }
.pill b { color: var(--ink); }
.controls { display: none; gap: 6px; align-items: center; margin: 8px 0 10px; flex-wrap: wrap; }
body.js .controls { display: flex; }
.controls button { font: inherit; font-size: 14px; min-width: 2.2em; padding: 1px 8px; cursor: pointer;
                   border: 1px solid #cbd5e1; border-radius: 6px; background: #fff; }
.controls button:hover { background: #f1f5f9; }
.controls input[type=range] { flex: 1 1 260px; accent-color: rgb(var(--soft)); }
.where { font-size: 12px; color: #334155; min-width: 16em; font-variant-numeric: tabular-nums; }
.block { border-top: 1px solid var(--line); padding: 10px 0 4px; }
/* one grid per block; rows are subgrids so a position keeps its column in every step */
.grid { display: grid; grid-template-columns: 9.5em repeat(var(--n), max-content); gap: 2px;
        overflow-x: auto; padding-bottom: 4px; }
.pos, .step, .toks { display: grid; grid-template-columns: subgrid; }
.pos { grid-column: 2 / -1; font: 9px var(--mono); color: var(--dim); text-align: center; }
.step { grid-column: 1 / -1; align-items: center; border-radius: 6px; transition: opacity .15s; }
.toks { grid-column: 2 / -1; }
.step.future { opacity: .13; }
.step.current { background: #eff6ff; outline: 1px solid #bfdbfe; }
.lbl { display: flex; flex-direction: column; font-size: 10px; line-height: 1.2; color: #64748b;
       white-space: nowrap; overflow: hidden; cursor: pointer; padding-left: 3px; }
.lbl .sn { font-size: 11px; font-weight: 600; color: var(--ink); }
.badge { font-size: 9px; font-weight: 500; padding: 0 4px; margin-left: 4px; border-radius: 4px;
         background: #ede9fe; color: #6d28d9; border: 1px solid #c4b5fd; }
.tok { position: relative; display: block; min-width: 2.4em; max-width: 9em; padding: 3px 3px;
       border-radius: 4px; text-align: center; font: 12px/1.35 var(--mono); white-space: pre;
       overflow: hidden; text-overflow: ellipsis; border: 1px solid transparent; cursor: default; }
.tok.masked { background: var(--mask); color: #6b7280; }
.tok.prompt { background: #f8fafc; color: var(--dim); border-color: #eef2f7; font-style: italic; }
.tok.soft { background: rgba(var(--soft), calc(.10 + .75 * var(--c, 0))); color: #1e3a8a;
            border-color: rgba(var(--soft), .35); }
.tok.revised { background: rgba(var(--rev), calc(.12 + .70 * var(--c, 0))); color: #7c2d12;
               border-color: rgb(var(--rev)); padding-right: 7px; }
.tok.revised::before { content: "\\21BB"; position: absolute; top: -2px; right: 1px; font-size: 9px;
                       color: #9a3412; }
.tok.hi.soft, .tok.hi.revised, .tok.hi.revised::before { color: #fff; }
.tok.committed { background: var(--okbg); color: #14532d; border-color: var(--ok); font-weight: 600; }
.tok.eos { letter-spacing: .03em; font-size: 10px; text-decoration: underline dotted; }
.tok.new { box-shadow: inset 0 -2px 0 rgba(15,23,42,.55); }
.tok:hover { overflow: visible; z-index: 2; }
.tok.revised[data-prev]:hover::after { content: "was " attr(data-prev); position: absolute; left: 0;
       top: 100%; z-index: 3; background: #111827; color: #fff; padding: 1px 5px; border-radius: 4px;
       font-size: 11px; font-weight: 400; white-space: pre; }
/* sticky "sequence at the selected step": running text, light shading so it stays readable */
.flow { position: sticky; top: 0; z-index: 4; max-height: 30vh; overflow: auto; background: #fff;
        border: 1px solid var(--line); border-radius: 8px; padding: 8px 10px; margin: 0 0 12px;
        font: 13px/1.8 var(--mono); white-space: pre-wrap; word-break: break-word;
        box-shadow: 0 2px 6px rgba(15,23,42,.06); }
.flow .ptxt { color: var(--dim); }
.flow .tok.tok { display: inline; min-width: 0; max-width: none; padding: 1px 0; margin: 0; border: 0;
                 border-radius: 2px; font-size: 13px; font-weight: 400; white-space: pre-wrap;
                 overflow: visible; box-shadow: none; }
.flow .tok.soft { background: rgba(var(--soft), calc(.06 + .30 * var(--c, 0))); color: #1e3a8a; }
.flow .tok.revised { background: rgba(var(--rev), calc(.15 + .35 * var(--c, 0))); color: #7c2d12; }
.flow .tok.committed { background: transparent; color: var(--ink); }
.flow .tok.eos { font-size: 10px; color: var(--dim); }
.flow .tok.eos ~ .tok.eos { display: none; }
.flow .tok.revised::before { display: none; }
.flow .tok.nl::after { content: "\\A"; white-space: pre; }
.flow.has-prompt .tok.prompt { display: none; }
footer { color: #64748b; font-size: 12px; margin-top: 10px; }
"""

JS = """
(function () {
  "use strict";
  function setup(tr) {
    var steps = Array.prototype.slice.call(tr.querySelectorAll(".step"));
    var n = steps.length;
    if (!n) return;
    var slider = tr.querySelector(".scrub"), where = tr.querySelector(".where");
    var play = tr.querySelector(".play"), timer = null, cur = n - 1;
    var byBlock = {};
    steps.forEach(function (s) { (byBlock[s.dataset.block] = byBlock[s.dataset.block] || []).push(s); });
    var flowBlocks = Array.prototype.slice.call(tr.querySelectorAll(".fblk"));
    function show(g, scroll) {
      cur = Math.max(0, Math.min(n - 1, g));
      slider.value = cur;
      steps.forEach(function (s, i) {
        s.classList.toggle("future", i > cur);
        s.classList.toggle("current", i === cur);
      });
      var st = steps[cur];
      where.textContent = "step " + (cur + 1) + " / " + n + " \\u00b7 block " + st.dataset.block +
        ", step " + st.dataset.step + (st.dataset.cross === "1" ? " (cross)" : "");
      flowBlocks.forEach(function (fb) {
        var seen = (byBlock[fb.dataset.block] || []).filter(function (s) { return +s.dataset.index <= cur; });
        while (fb.firstChild) fb.removeChild(fb.firstChild);
        if (!seen.length) return;
        var chips = seen[seen.length - 1].querySelector(".toks").children;
        for (var k = 0; k < chips.length; k++) fb.appendChild(chips[k].cloneNode(true));
      });
      if (scroll) st.scrollIntoView({ block: "nearest" });
    }
    function stop() { if (timer) { clearInterval(timer); timer = null; play.textContent = "\\u25B6"; } }
    slider.max = n - 1;
    slider.addEventListener("input", function () { stop(); show(+slider.value, true); });
    tr.querySelector(".first").addEventListener("click", function () { stop(); show(0, true); });
    tr.querySelector(".prev").addEventListener("click", function () { stop(); show(cur - 1, true); });
    tr.querySelector(".next").addEventListener("click", function () { stop(); show(cur + 1, true); });
    tr.querySelector(".last").addEventListener("click", function () { stop(); show(n - 1, true); });
    play.addEventListener("click", function () {
      if (timer) { stop(); return; }
      if (cur >= n - 1) show(0, true);
      play.textContent = "\\u275A\\u275A";
      timer = setInterval(function () { if (cur >= n - 1) stop(); else show(cur + 1, true); }, 650);
    });
    steps.forEach(function (s, i) {
      s.querySelector(".lbl").addEventListener("click", function () { stop(); show(i, false); });
    });
    var m = /(?:^#|&)step=(\\d+)/.exec(location.hash);
    show(m ? +m[1] : n - 1, false);
  }
  document.querySelectorAll(".trace").forEach(setup);
  document.body.classList.add("js");
  document.body.setAttribute("data-ready", "1");
})();
"""
