// The atlas page script: the scatter of every head and, on a click, that head's page, whose data
// is loaded lazily from heads/<name>.js (one script per head, so it works from file://).
// @DATA_ELEMENT_ID@ is filled in by lens_attn/render/atlas.py. Strings from the data reach the DOM
// only through textContent: corpus text is never parsed as HTML.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("@DATA_ELEMENT_ID@").textContent);
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const heads = DATA.heads;  // [{name, layer, head, values: {quantity: number|string}}]
  const loaded = new Map(), waiting = new Map();
  let current = null;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(v) {
    if (v === null || v === undefined) return "–";
    if (typeof v === "number") return Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(3);
    return String(v);
  }

  // ---------------------------------------------------------------- scatter
  const quantities = DATA.quantities;  // [{name, kind: "number"|"category"}]
  function fill(select, chosen) {
    for (const q of quantities) {
      const o = el("option", q.name); o.value = q.name; select.appendChild(o);
    }
    select.value = chosen;
    select.addEventListener("change", drawScatter);
  }
  fill($("x-select"), DATA.default_axes[0]);
  fill($("y-select"), DATA.default_axes[1]);
  fill($("color-select"), DATA.default_axes[2]);

  function axis(name) {
    const kind = quantities.find((q) => q.name === name).kind;
    const raw = heads.map((h) => h.values[name]);
    if (kind === "category") {
      const cats = [...new Set(raw.map((v) => (v === null ? "none" : v)))].sort();
      return { kind, cats, value: (h) => cats.indexOf(h.values[name] === null ? "none" : h.values[name]) };
    }
    const nums = raw.filter((v) => typeof v === "number" && isFinite(v));
    const lo = nums.length ? Math.min(...nums) : 0, hi = nums.length ? Math.max(...nums) : 1;
    return { kind, lo, hi: hi > lo ? hi : lo + 1,
      value: (h) => (typeof h.values[name] === "number" ? h.values[name] : null) };
  }
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
    "#7f7f7f", "#bcbd22", "#17becf"];
  function colour(a, h) {
    const v = a.value(h);
    if (v === null) return "#ccc";
    if (a.kind === "category") return PALETTE[v % PALETTE.length];
    const t = (v - a.lo) / (a.hi - a.lo);  // blue -> yellow
    const r = Math.round(68 + t * (253 - 68)), g = Math.round(1 + t * (231 - 1)), b = Math.round(84 + t * (37 - 84));
    return "rgb(" + r + "," + g + "," + b + ")";
  }
  function drawScatter() {
    const box = $("scatter"), W = +box.getAttribute("width"), H = +box.getAttribute("height"), P = 40;
    const ax = axis($("x-select").value), ay = axis($("y-select").value), ac = axis($("color-select").value);
    box.replaceChildren();
    const span = (a) => (a.kind === "category" ? [-0.5, a.cats.length - 0.5] : [a.lo, a.hi]);
    const [x0, x1] = span(ax), [y0, y1] = span(ay);
    const px = (v) => P + ((v - x0) / (x1 - x0)) * (W - 2 * P);
    const py = (v) => H - P - ((v - y0) / (y1 - y0)) * (H - 2 * P);
    box.appendChild(svg("line", { x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "#999" }));
    box.appendChild(svg("line", { x1: P, y1: P, x2: P, y2: H - P, stroke: "#999" }));
    const label = (text, x, y, anchor) => {
      const t = svg("text", { x, y, "font-size": 11, "text-anchor": anchor, fill: "#555" });
      t.textContent = text; box.appendChild(t);
    };
    label($("x-select").value + " (" + fmt(x0) + " … " + fmt(x1) + ")", W / 2, H - 8, "middle");
    label($("y-select").value + " (" + fmt(y0) + " … " + fmt(y1) + ")", 4, 14, "start");
    const r = heads.length > 500 ? 2.5 : 4;
    for (const h of heads) {
      const vx = ax.value(h), vy = ay.value(h);
      if (vx === null || vy === null) continue;
      // categories are spread a little so heads sharing a value stay visible
      const jitter = (a, h2) => (a.kind === "category" ? ((h2.layer * 7919 + h2.head * 104729) % 61) / 61 * 0.6 - 0.3 : 0);
      const c = svg("circle", { cx: px(vx + jitter(ax, h)), cy: py(vy + jitter(ay, { layer: h.head, head: h.layer })),
        r, fill: colour(ac, h), id: "dot-" + h.name });
      const title = svg("title", {}); title.textContent = h.name; c.appendChild(title);
      c.addEventListener("click", () => { location.hash = h.name; });
      if (current === h.name) c.classList.add("selected");
      box.appendChild(c);
    }
    const legend = $("legend");
    legend.replaceChildren();
    if (ac.kind === "category") {
      ac.cats.forEach((cat, i) => {
        const s = el("span", "● ", ""); s.style.color = PALETTE[i % PALETTE.length];
        legend.appendChild(s); legend.appendChild(el("span", cat + "  "));
      });
    } else {
      legend.textContent = "colour: " + $("color-select").value + " from " + fmt(ac.lo) + " (dark) to " + fmt(ac.hi) + " (yellow)";
    }
  }

  // ---------------------------------------------------------------- head page
  window.lensAtlasHead = function (name, data) {  // called by heads/<name>.js
    loaded.set(name, data);
    const done = waiting.get(name);
    if (done) { waiting.delete(name); done(); }
  };
  function load(name, then) {
    if (loaded.has(name)) return then();
    waiting.set(name, then);
    const s = document.createElement("script");
    s.src = "heads/" + encodeURIComponent(name) + ".js";
    s.onerror = () => { $("head-status").textContent = "could not load heads/" + name + ".js"; };
    document.body.appendChild(s);
  }
  function openHead(name) {
    const info = heads.find((h) => h.name === name);
    if (!info) return;
    current = name;
    document.querySelectorAll("#scatter circle.selected").forEach((c) => c.classList.remove("selected"));
    const dot = $("dot-" + name);
    if (dot) dot.classList.add("selected");
    $("head-heading").textContent = "Head " + name;
    $("head-status").textContent = "loading…";
    load(name, () => { if (current === name) showHead(info, loaded.get(name)); });
  }

  function tokenSpan(text, weight, isQuery) {
    const s = el("span", text, "tok" + (isQuery ? " query" : ""));
    if (weight > 0) s.style.background = "rgba(31,119,180," + Math.min(1, 0.15 + weight).toFixed(2) + ")";
    return s;
  }
  function example(ex) {
    const div = el("div", null, "example");
    div.appendChild(el("span", "doc " + ex.doc + " · pos " + ex.query_pos + " · " + fmt(ex.activation), "meta"));
    const weights = new Map();
    for (const k of ex.keys) if (k.offset !== null) weights.set(k.offset, k.weight);
    ex.context.forEach((t, i) => {
      const offset = i - ex.context_query;
      div.appendChild(tokenSpan(t, weights.get(offset) || 0, offset === 0));
    });
    const keys = ex.keys.map((k) => JSON.stringify(k.token) + (k.key_pos < 0 ? " (BOS)" : " @" + k.key_pos) + " " + k.weight.toFixed(2));
    div.appendChild(el("span", "→ " + keys.join(", "), "keys"));
    return div;
  }
  function table(id, header, rows) {
    const t = $(id);
    t.replaceChildren();
    const tr = el("tr");
    header.forEach((h) => tr.appendChild(el("th", h)));
    t.appendChild(tr);
    for (const row of rows) {
      const r = el("tr");
      row.forEach((c) => r.appendChild(el("td", c)));
      t.appendChild(r);
    }
  }
  function heatmap(tokens, pattern) {
    const n = tokens.length, cell = Math.max(3, Math.min(8, Math.floor(240 / n)));
    const c = document.createElement("canvas");
    c.width = n * cell; c.height = n * cell;
    const g = c.getContext("2d");
    for (let q = 0; q < n; q++) for (let k = 0; k <= q; k++) {
      const w = pattern[q][k];
      g.fillStyle = "rgba(31,119,180," + w.toFixed(3) + ")";
      g.fillRect(k * cell, q * cell, cell, cell);
    }
    return c;
  }
  function showHead(info, data) {
    $("head-status").textContent = "";
    const notes = $("head-notes");
    notes.replaceChildren();
    for (const line of data.notes) notes.appendChild(el("li", line));
    if (!data.notes.length) notes.appendChild(el("li", "no labels (run discover --corpus to add them)"));
    table("head-metrics", ["quantity", "value"], Object.entries(info.values).map(([k, v]) => [k, fmt(v)]));
    const top = $("top-examples");
    top.replaceChildren(...data.top.map(example));
    const dec = $("decile-examples");
    dec.replaceChildren();
    let last = -1;
    for (const ex of data.deciles) {
      if (ex.decile !== last) { dec.appendChild(el("div", "decile " + (ex.decile + 1) + " of 10", "decile")); last = ex.decile; }
      dec.appendChild(example(ex));
    }
    table("ov-table", ["attends to", "weight", "writes (top logits)"],
      data.ov.map((r) => [r.source, fmt(r.weight), r.top.map((t) => t[0] + " " + t[1].toFixed(1)).join("  ·  ")]));
    table("qk-table", ["query", "key", "score"], data.qk.map((r) => [r.query, r.key, fmt(r.score)]));
    const probes = $("probe-patterns");
    probes.replaceChildren();
    DATA.probes.forEach((probe, i) => {
      const d = el("div");
      d.appendChild(el("div", probe.name, "note"));
      if (data.probes[i]) d.appendChild(heatmap(probe.tokens, data.probes[i]));
      d.appendChild(el("div", probe.tokens.join(""), "note"));
      probes.appendChild(d);
    });
    const pca = $("pca");
    pca.replaceChildren();
    if (data.pca && data.pca.coords.length) {
      const xs = data.pca.coords.map((c) => c[0]), ys = data.pca.coords.map((c) => c[1]);
      const acts = data.pca.activation, amax = Math.max(...acts, 1e-9);
      const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      data.pca.coords.forEach((c, i) => {
        pca.appendChild(svg("circle", { cx: 10 + ((c[0] - x0) / (x1 - x0 || 1)) * 280, cy: 210 - ((c[1] - y0) / (y1 - y0 || 1)) * 200,
          r: 2.5, fill: "rgba(214,39,40," + (0.15 + 0.85 * acts[i] / amax).toFixed(2) + ")" }));
      });
      const t = svg("text", { x: 10, y: 12, "font-size": 10, fill: "#555" });
      t.textContent = "explained variance " + data.pca.explained.map((e) => (100 * e).toFixed(0) + "%").join(", ") + "; redder = higher activation";
      pca.appendChild(t);
    }
  }

  // ---------------------------------------------------------------- start
  $("summary").textContent = DATA.summary;
  $("provenance").textContent = JSON.stringify(DATA.provenance, null, 1);
  if (DATA.circuit_svg) {  // the circuit stage's graph, as an image (scripts in it cannot run)
    const slot = $("circuit-graph-slot"), img = document.createElement("img");
    img.src = "data:image/svg+xml;base64," + DATA.circuit_svg;
    img.alt = "circuit graph";
    slot.appendChild(img);
    slot.hidden = false;
  }
  $("head-search").addEventListener("change", (e) => { location.hash = e.target.value.trim().toUpperCase(); });
  window.addEventListener("hashchange", () => openHead(decodeURIComponent(location.hash.slice(1))));
  drawScatter();
  openHead(location.hash ? decodeURIComponent(location.hash.slice(1)) : DATA.open_head);
})();
