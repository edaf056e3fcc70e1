"use strict";
// vllm-loglik report: draws the data of vllm_loglik/report.py. No network, no library.
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const PAGE = 100;
  const LN2 = Math.log(2);
  const $ = (sel, root) => (root || document).querySelector(sel);

  function el(tag, props, ...kids) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : v);
    }
    for (const kid of kids) if (kid !== null && kid !== undefined) node.append(kid);
    return node;
  }
  const SVG = "http://www.w3.org/2000/svg";
  function sv(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    return Number(x).toFixed(digits === undefined ? 4 : digits);
  }
  function big(x) {
    if (x === null || x === undefined) return "–";
    return Math.abs(x) >= 1e6 ? Number(x).toExponential(3) : fmt(x, 3);
  }
  const int = (x) => Number(x).toLocaleString("en-US");
  // A token's text with its whitespace made visible.
  const shown = (t) => JSON.stringify(t);

  // A detail's token: [vocab index, logprob, rank, alternative, its logprob, ...].
  const tokText = (t) => D.vocab[t[0]];
  function alternatives(t) {
    const out = [];
    for (let i = 3; i + 1 < t.length; i += 2) out.push([D.vocab[t[i]], t[i + 1]]);
    return out;
  }

  // ------------------------------------------------------------------ views
  const views = ["overview", "lines", "line", "choice", "problems"];
  const tabs = {};
  for (const b of document.querySelectorAll("nav button")) {
    tabs[b.dataset.view] = b;
    b.addEventListener("click", () => show(b.dataset.view));
  }
  if (!D.questions.length) tabs.choice.disabled = true;
  function show(view) {
    for (const v of views) {
      $("#view-" + v).hidden = v !== view;
      tabs[v].setAttribute("aria-selected", String(v === view));
    }
    if (location.hash !== "#" + view) history.replaceState(null, "", "#" + view);
    hideTip();
  }

  // ------------------------------------------------------------------ summary
  const S = D.summary;
  $("#file").textContent = S.file;
  function term(dl, key, name, value) {
    dl.append(el("dt", { text: name }), el("dd", { id: key ? "s-" + key : null, text: value }));
  }
  const sum = $("#summary");
  term(sum, "lines", "lines", int(S.lines));
  term(sum, "texts", "scored texts", int(S.texts));
  term(sum, "tokens", "scored tokens", int(S.scored_tokens));
  term(sum, "errors", "lines that failed", int(S.errors));
  term(sum, "unreadable", "lines not read", int(S.unreadable));
  term(sum, "outliers", "outliers", int(S.outliers));
  if (S.accuracy !== undefined) term(sum, "accuracy", "multiple-choice accuracy", fmt(S.accuracy));
  term(sum, "formats", "read as", S.formats.join(", ") || "–");
  const settings = $("#settings");
  const run = S.run || {};
  if (S.models.length && !run.model) term(settings, "models", "model", S.models.join(", "));
  for (const [k, v] of Object.entries(run)) {
    term(settings, null, k, typeof v === "string" ? v : JSON.stringify(v));
  }
  if (!settings.children.length) term(settings, null, "run", "not recorded (no .run.json beside the file)");
  term(settings, null, "report made", S.made);

  // ------------------------------------------------------------------ histogram
  let range = null; // [low, high] of the metric, from a histogram bar
  function metricValue(r, metric) {
    const v = r[metric];
    if (v === null || v === undefined) return null;
    return metric === "perplexity" ? Math.log10(Math.max(v, 1e-300)) : v;
  }
  function drawHistogram() {
    const metric = $("#metric").value;
    const values = D.rows.map((r) => metricValue(r, metric)).filter((v) => v !== null);
    const box = $("#histogram");
    box.textContent = "";
    if (!values.length) { box.append(el("p", { class: "note", text: "No scored texts." })); return; }
    let lo = Math.min(...values), hi = Math.max(...values);
    if (hi === lo) { lo -= 0.5; hi += 0.5; }
    const n = D.bins, width = (hi - lo) / n;
    const counts = new Array(n).fill(0), outl = new Array(n).fill(0);
    for (const r of D.rows) {
      const v = metricValue(r, metric);
      if (v === null) continue;
      const b = Math.min(n - 1, Math.floor((v - lo) / width));
      counts[b]++;
      if (r.outlier) outl[b]++;
    }
    const W = 900, H = 260, L = 48, B = 36, T = 10;
    const max = Math.max(...counts);
    const svg = sv("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": `histogram of ${metric === "perplexity" ? "log10 perplexity" : "bits per byte"}` });
    const x = (v) => L + ((v - lo) / (hi - lo)) * (W - L - 10);
    const y = (c) => H - B - (c / max) * (H - B - T);
    for (let b = 0; b < n; b++) {
      if (!counts[b]) continue;
      const rect = sv("rect", { class: "bar" + (outl[b] * 2 >= counts[b] ? " outlier" : ""),
        x: x(lo + b * width) + 0.5, y: y(counts[b]), width: Math.max(1, x(lo + width) - x(lo) - 1),
        height: H - B - y(counts[b]), tabindex: 0 });
      const a = lo + b * width, z = a + width;
      rect.append(sv("title", {}, `${fmt(a, 3)} to ${fmt(z, 3)}: ${counts[b]} texts` +
        (outl[b] ? `, ${outl[b]} outliers` : "")));
      const pick = () => { range = [a, z, metric]; linesState.page = 0; drawLines(); show("lines"); };
      rect.addEventListener("click", pick);
      rect.addEventListener("keydown", (e) => { if (e.key === "Enter") pick(); });
      svg.append(rect);
    }
    svg.append(sv("line", { class: "axis", x1: L, y1: H - B, x2: W - 10, y2: H - B }));
    for (let i = 0; i <= 5; i++) {
      const v = lo + ((hi - lo) * i) / 5;
      svg.append(sv("text", { x: x(v), y: H - B + 14, "text-anchor": "middle" },
        metric === "perplexity" ? big(Math.pow(10, v)) : fmt(v, 2)));
    }
    svg.append(sv("text", { x: (W + L) / 2, y: H - 4, "text-anchor": "middle" },
      metric === "perplexity" ? "perplexity (log scale)" : "bits per byte"));
    svg.append(sv("text", { x: L - 6, y: T + 8, "text-anchor": "end" }, String(max)));
    svg.append(sv("text", { x: L - 6, y: H - B, "text-anchor": "end" }, "0"));
    if (D.fences && metric === "bits_per_byte") {
      for (const f of D.fences) {
        if (f < lo || f > hi) continue;
        svg.append(sv("line", { class: "fence", x1: x(f), y1: T, x2: x(f), y2: H - B }));
      }
    }
    box.append(svg);
  }
  $("#metric").addEventListener("change", drawHistogram);

  // ------------------------------------------------------------------ the lines table
  const linesState = { key: "line", dir: 1, query: "", outliers: false, page: 0 };
  function filtered() {
    const q = linesState.query.toLowerCase();
    let rows = D.rows;
    if (q) rows = rows.filter((r) => r.id.toLowerCase().includes(q) || r.text.toLowerCase().includes(q));
    if (linesState.outliers) rows = rows.filter((r) => r.outlier);
    if (range) {
      const [a, z, metric] = range;
      rows = rows.filter((r) => { const v = metricValue(r, metric); return v !== null && v >= a && v <= z; });
    }
    const { key, dir } = linesState;
    const value = (r) => (key === "line" ? r.line + r.index / 1e4 : r[key]);
    return rows.slice().sort((p, q2) => {
      const a = value(p), b = value(q2);
      if (a === b) return p.line - q2.line || p.index - q2.index;
      if (a === null || a === undefined) return 1;
      if (b === null || b === undefined) return -1;
      return (a < b ? -1 : 1) * dir;
    });
  }
  function drawLines() {
    const rows = filtered();
    const pages = Math.max(1, Math.ceil(rows.length / PAGE));
    linesState.page = Math.min(linesState.page, pages - 1);
    const body = $("#lines tbody");
    const frag = document.createDocumentFragment();
    for (const r of rows.slice(linesState.page * PAGE, (linesState.page + 1) * PAGE)) {
      const open = () => openLine(r);
      const tr = el("tr", { class: (r.detail >= 0 ? "openable" : "") + (r.outlier ? " outlier" : ""),
        tabindex: 0, "data-line": r.line, onclick: open,
        onkeydown: (e) => { if (e.key === "Enter") open(); } },
        el("td", { class: "num", text: r.line }),
        el("td", { class: "left", text: r.of > 1 ? `${r.id} [${r.index}]` : r.id }),
        el("td", { class: "text", text: r.text, title: r.text }),
        el("td", { class: "num", text: fmt(r.logprob) }),
        el("td", { class: "num", text: r.num_tokens }),
        el("td", { class: "num perplexity", text: big(r.perplexity) }),
        el("td", { class: "num", text: fmt(r.bits_per_byte) }),
        el("td", { text: r.is_greedy === null || r.is_greedy === undefined ? "–" : r.is_greedy ? "yes" : "no" }));
      frag.append(tr);
    }
    body.replaceChildren(frag);
    for (const th of document.querySelectorAll("#lines th")) {
      const key = th.querySelector("button").dataset.key;
      if (key === linesState.key) th.setAttribute("aria-sort", linesState.dir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
    $("#count").textContent = `${int(rows.length)} of ${int(D.rows.length)} texts`;
    $("#range").replaceChildren();
    if (range) {
      $("#range").append(`${range[2] === "perplexity" ? "log10 perplexity" : "bits per byte"} ` +
        `${fmt(range[0], 3)} to ${fmt(range[1], 3)} `,
        el("button", { text: "clear", onclick: () => { range = null; drawLines(); } }));
    }
    pager($("#pager"), linesState, pages, drawLines);
  }
  function pager(box, state, pages, draw) {
    box.replaceChildren();
    if (pages <= 1) return;
    const go = (p) => { state.page = p; draw(); };
    box.append(el("button", { text: "‹ previous", disabled: state.page === 0, onclick: () => go(state.page - 1) }),
      `page ${state.page + 1} of ${pages} `,
      el("button", { text: "next ›", disabled: state.page >= pages - 1, onclick: () => go(state.page + 1) }));
  }
  for (const b of document.querySelectorAll("#lines th button")) {
    b.addEventListener("click", () => {
      const key = b.dataset.key;
      linesState.dir = linesState.key === key ? -linesState.dir : (key === "line" || key === "id" || key === "text" ? 1 : -1);
      linesState.key = key;
      linesState.page = 0;
      drawLines();
    });
  }
  $("#search").addEventListener("input", (e) => { linesState.query = e.target.value; linesState.page = 0; drawLines(); });
  $("#outliers-only").addEventListener("change", (e) => { linesState.outliers = e.target.checked; linesState.page = 0; drawLines(); });

  // ------------------------------------------------------------------ one line
  const BUCKETS = [[10, "#b6e8b0", "top 10"], [100, "#fbe89a", "top 100"], [1000, "#f7a99c", "top 1,000"],
    [Infinity, "#d6a8f0", "beyond"]];
  let current = null, mode = "surprisal";
  function surprisalColour(lp, max) {
    const bits = -lp / LN2, t = Math.max(0, Math.min(1, bits / max));
    return `hsl(${(1 - t) * 55}, 95%, ${96 - t * 42}%)`;
  }
  function rankColour(rank) {
    if (rank === null || rank === undefined) return "#e5e7eb";
    for (const [limit, colour] of BUCKETS) if (rank <= limit) return colour;
    return BUCKETS[3][1];
  }
  function openLine(r) {
    current = r;
    drawLine();
    show("line");
  }
  function drawLine() {
    const r = current;
    const heat = $("#heatmap"), words = $("#words");
    heat.replaceChildren(); words.replaceChildren();
    if (!r) {
      $("#line-title").textContent = "Line";
      $("#line-stats").textContent = "Open a line from the Lines table.";
      $("#line-controls").hidden = true; $("#words-title").hidden = true;
      return;
    }
    $("#line-title").textContent = `Line ${r.line}` + (r.id ? `: ${r.id}` : "") + (r.of > 1 ? ` [${r.index}]` : "");
    $("#line-stats").textContent = `logprob ${fmt(r.logprob)} over ${r.num_tokens} tokens, perplexity ` +
      `${big(r.perplexity)}, ${fmt(r.bits_per_byte)} bits per byte`;
    const siblings = $("#siblings");
    siblings.replaceChildren();
    if (r.of > 1) {
      siblings.append("This line's continuations: ");
      for (const s of D.rows.filter((o) => o.line === r.line)) {
        siblings.append(el("button", { class: s === r ? "current" : null, "aria-pressed": String(s === r),
          text: `[${s.index}] ${JSON.stringify(s.text.slice(0, 30))} ${fmt(s.logprob, 2)}`,
          onclick: () => openLine(s) }), " ");
      }
    }
    const detail = r.detail >= 0 ? D.details[r.detail] : null;
    const tokens = detail && detail.tokens;
    $("#line-controls").hidden = !tokens;
    if (!tokens) {
      heat.append(el("span", { class: "note", text: (detail && detail.text || r.text) + "\n\n(no per-token content in this line: " +
        "score with --details, or save the server's full response)" }));
    } else {
      const max = Math.max(8, ...tokens.filter((t) => t[1] !== null).map((t) => -t[1] / LN2));
      const frag = document.createDocumentFragment();
      tokens.forEach((t, i) => {
        const colour = t[1] === null ? null : mode === "rank" ? rankColour(t[2]) : surprisalColour(t[1], max);
        frag.append(el("span", { class: "tok" + (t[1] === null ? " none" : ""), tabindex: 0, "data-i": i,
          style: colour ? `background:${colour}` : null, text: tokText(t).replace(/\n/g, "↵\n") }));
      });
      heat.append(frag);
      const legend = $("#legend");
      legend.replaceChildren();
      if (mode === "rank") {
        for (const [, colour, name] of BUCKETS) legend.append(el("span", {}, el("i", { style: `background:${colour}` }), name));
      } else {
        legend.append(el("span", {}, el("i", { style: `background:${surprisalColour(0, max)}` }), "0 bits"),
          el("span", {}, el("i", { style: `background:${surprisalColour(-max * LN2 / 2, max)}` }), `${fmt(max / 2, 1)}`),
          el("span", {}, el("i", { style: `background:${surprisalColour(-max * LN2, max)}` }), `${fmt(max, 1)} bits or more`));
      }
    }
    const ws = detail && detail.words;
    $("#words-title").hidden = !ws;
    if (ws) {
      const frag = document.createDocumentFragment();
      const max = Math.max(8, ...ws.map((w) => -w[2] / LN2));
      ws.forEach((w, i) => {
        frag.append(el("span", { class: "tok word", tabindex: 0, "data-w": i,
          style: `background:${surprisalColour(w[2], max)}`, text: w[0] }), " ");
      });
      words.append(frag);
    }
  }
  for (const input of document.querySelectorAll("input[name=mode]")) {
    input.addEventListener("change", () => { mode = input.value; drawLine(); });
  }

  // ------------------------------------------------------------------ tooltips
  const tip = $("#tooltip");
  function hideTip() { tip.hidden = true; }
  function showTip(target) {
    const detail = current && D.details[current.detail];
    if (!detail) return;
    tip.replaceChildren();
    if (target.dataset.i !== undefined) {
      const t = detail.tokens[Number(target.dataset.i)];
      tip.append(el("div", { class: "tt-token", text: shown(tokText(t)) }));
      if (t[1] === null) {
        tip.append(el("div", { text: "no logprob (the first token of the prompt)" }));
      } else {
        tip.append(el("div", { class: "tt-logprob", text: `logprob ${fmt(t[1])}` }),
          el("div", { class: "tt-surprisal", text: `surprisal ${fmt(-t[1] / LN2, 2)} bits` }),
          el("div", { class: "tt-rank", text: `rank ${t[2] === null || t[2] === undefined ? "unknown" : t[2]}` }));
        const alts = alternatives(t);
        if (alts.length) {
          const table = el("table", {}, ...alts.map((a) => el("tr", {}, el("td", { text: shown(a[0]) }),
            el("td", { text: fmt(a[1]) }))));
          tip.append(el("div", { text: "top alternatives" }), table);
        }
      }
    } else {
      const w = detail.words[Number(target.dataset.w)];
      tip.append(el("div", { class: "tt-token", text: shown(w[0]) }),
        el("div", { class: "tt-logprob", text: `logprob ${fmt(w[2])}` }),
        el("div", { text: `surprisal ${fmt(-w[2] / LN2, 2)} bits, ${w[3]} tokens, at character ${w[1]}` }));
    }
    tip.hidden = false;
    const box = target.getBoundingClientRect();
    const w = tip.offsetWidth, h = tip.offsetHeight;
    let left = Math.min(box.left, window.innerWidth - w - 8), top = box.bottom + 6;
    if (top + h > window.innerHeight) top = Math.max(4, box.top - h - 6);
    tip.style.left = Math.max(4, left) + "px";
    tip.style.top = top + "px";
  }
  for (const box of [$("#heatmap"), $("#words")]) {
    box.addEventListener("mouseover", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
    box.addEventListener("focusin", (e) => { if (e.target.classList.contains("tok")) showTip(e.target); });
    box.addEventListener("mouseout", hideTip);
    box.addEventListener("focusout", hideTip);
  }
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") hideTip(); });

  // ------------------------------------------------------------------ multiple choice
  const qState = { page: 0 };
  function drawChoice() {
    const qs = D.questions;
    if (!qs.length) { $("#choice-summary").textContent = "No line carries a label."; return; }
    const c = D.calibration;
    const right = qs.filter((q) => q.correct).length;
    $("#choice-summary").replaceChildren(`${int(qs.length)} questions; accuracy `,
      el("strong", { id: "accuracy", text: fmt(right / qs.length) }),
      ` (${int(right)} right); expected calibration error `, el("strong", { id: "ece", text: fmt(c.ece) }),
      ` over ${c.bins.length} bins of the chosen answer's probability, normalised over its choices.`);
    const W = 420, H = 420, P = 44, size = W - P - 12;
    const svg = sv("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "reliability diagram", width: W });
    const x = (v) => P + v * size, y = (v) => H - P - v * size;
    svg.append(sv("line", { class: "axis", x1: x(0), y1: y(0), x2: x(1), y2: y(0) }),
      sv("line", { class: "axis", x1: x(0), y1: y(0), x2: x(0), y2: y(1) }),
      sv("line", { x1: x(0), y1: y(0), x2: x(1), y2: y(1), stroke: "#999", "stroke-dasharray": "4 3" }));
    for (const b of c.bins) {
      if (!b.count) continue;
      const bar = sv("rect", { x: x(b.low) + 1, y: y(b.accuracy), width: size / c.bins.length - 2,
        height: y(0) - y(b.accuracy), fill: "#6c8ee8" });
      bar.append(sv("title", {}, `confidence ${fmt(b.low, 1)}–${fmt(b.high, 1)}: ${b.count} questions, ` +
        `accuracy ${fmt(b.accuracy, 3)}, mean confidence ${fmt(b.confidence, 3)}`));
      svg.append(bar, sv("rect", { x: x(b.low) + 1, y: Math.min(y(b.accuracy), y(b.confidence)),
        width: size / c.bins.length - 2, height: Math.abs(y(b.accuracy) - y(b.confidence)),
        fill: "rgba(217,72,15,0.35)" }));
    }
    for (let i = 0; i <= 5; i++) {
      svg.append(sv("text", { x: x(i / 5), y: y(0) + 14, "text-anchor": "middle" }, fmt(i / 5, 1)),
        sv("text", { x: x(0) - 6, y: y(i / 5) + 4, "text-anchor": "end" }, fmt(i / 5, 1)));
    }
    svg.append(sv("text", { x: x(0.5), y: H - 8, "text-anchor": "middle" }, "confidence (chosen answer)"),
      sv("text", { x: 12, y: y(0.5), "text-anchor": "middle", transform: `rotate(-90 12 ${y(0.5)})` }, "accuracy"));
    $("#reliability").replaceChildren(svg, el("p", { class: "note",
      text: "Bars: accuracy per bin; shaded: the gap to the bin's mean confidence; dashed: perfect calibration." }));
    drawQuestions();
  }
  function drawQuestions() {
    const qs = D.questions, pages = Math.ceil(qs.length / PAGE);
    const frag = document.createDocumentFragment();
    for (const q of qs.slice(qState.page * PAGE, (qState.page + 1) * PAGE)) {
      const choices = el("td", { class: "left" });
      q.logprobs.forEach((lp, i) => {
        choices.append(el("div", { class: i === q.label ? "right" : i === q.chosen ? "wrong" : null,
          text: `${i}: ${fmt(lp)}  ${JSON.stringify(q.choices[i])}${i === q.label ? "  (right)" : ""}` }));
      });
      frag.append(el("tr", {}, el("td", { class: "num", text: q.line }), el("td", { class: "left", text: q.id }),
        el("td", { class: "num", text: q.label }),
        el("td", { class: "num " + (q.correct ? "right" : "wrong"), text: q.chosen }),
        el("td", { class: "num", text: fmt(q.confidence, 3) }), choices));
    }
    $("#questions tbody").replaceChildren(frag);
    pager($("#question-pager"), qState, pages, drawQuestions);
  }

  // ------------------------------------------------------------------ problems
  function drawProblems() {
    const errs = document.createDocumentFragment();
    for (const e of D.errors) {
      errs.append(el("tr", {}, el("td", { class: "num", text: e.line }), el("td", { class: "left", text: e.id === null || e.id === undefined ? "" : String(e.id) }),
        el("td", { class: "num", text: e.status || "" }), el("td", { class: "left", text: e.message })));
    }
    if (!D.errors.length) errs.append(el("tr", {}, el("td", { class: "left", colspan: 4, text: "None." })));
    $("#errors tbody").replaceChildren(errs);
    const bad = document.createDocumentFragment();
    for (const u of D.unreadable) {
      bad.append(el("tr", {}, el("td", { class: "num", text: u.line }), el("td", { class: "left", text: u.reason }),
        el("td", { class: "text", text: u.text, title: u.text })));
    }
    if (!D.unreadable.length) bad.append(el("tr", {}, el("td", { class: "left", colspan: 3, text: "None." })));
    $("#unreadable tbody").replaceChildren(bad);
  }

  drawHistogram();
  drawLines();
  drawLine();
  drawChoice();
  drawProblems();
  const start = location.hash.slice(1);
  show(views.includes(start) && !(start === "choice" && !D.questions.length) ? start : "overview");
  window.reportReadyMs = performance.now();
  document.body.dataset.ready = "1";
})();
