// The report's page script: reads the JSON data, decodes the patterns, renders CircuitsVis views.
// @DATA_ELEMENT_ID@ is filled in by lens_attn/render/report.py (DATA_ELEMENT_ID).
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("@DATA_ELEMENT_ID@").textContent);
  const $ = (id) => document.getElementById(id);
  const state = { prompt: 0, layer: 0, head: 0, query: 0 };  // layer indexes DATA.layers
  const decoded = new Map();
  let nextView = 0;

  const ENTITIES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ENTITIES[c]);

  // base64 bytes -> [head][query_pos][key_pos] floats (see the Python module docstring)
  function decode(prompt, li) {
    const key = prompt + ":" + li;
    if (decoded.has(key)) return decoded.get(key);
    const p = DATA.prompts[prompt], entry = p.layers[li], n = p.n;
    const bin = atob(entry.data);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const heads = [];
    let o = 0;
    for (let h = 0; h < DATA.n_heads; h++) {
      const step = entry.scales[h] / 255, rows = [];
      for (let q = 0; q < n; q++) {
        const row = new Array(n).fill(0), end = entry.tri ? q + 1 : n;
        for (let k = 0; k < end; k++) row[k] = bytes[o++] * step;
        rows.push(row);
      }
      heads.push(rows);
    }
    decoded.set(key, heads);
    return heads;
  }

  // a fresh div for every view: CircuitsVis.render makes a new React root on the element given
  function mount(hostId, component, props) {
    const host = $(hostId), div = document.createElement("div");
    div.id = "lens-attn-view-" + (nextView++);
    host.replaceChildren(div);
    if (typeof CircuitsVis === "undefined") {
      div.textContent = "CircuitsVis failed to load.";
      return;
    }
    CircuitsVis.render(div.id, CircuitsVis[component], props);
  }

  function option(select, value, text) {
    const o = document.createElement("option");
    o.value = String(value);
    o.textContent = text;
    select.appendChild(o);
  }
  const label = (li, h) => "L" + DATA.layers[li] + "H" + h;
  const tokens = () => DATA.prompts[state.prompt].tokens;

  function fillQueries() {
    const sel = $("query-select");
    sel.replaceChildren();
    tokens().forEach((t, i) => option(sel, i, i + ": " + JSON.stringify(t)));
    state.query = tokens().length - 1;
    sel.value = String(state.query);
  }

  function renderLayer() {
    const heads = decode(state.prompt, state.layer);
    $("layer-heading").textContent =
      "Layer " + DATA.layers[state.layer] + ": every head (CircuitsVis AttentionHeads)";
    mount("layer-view", "AttentionHeads", {
      attention: heads,
      tokens: tokens(),  // drawn on a canvas as text
      attentionHeadNames: heads.map((_, h) => label(state.layer, h)),
    });
  }

  function renderHead() {
    const pattern = decode(state.prompt, state.layer)[state.head];
    const name = label(state.layer, state.head);
    $("head-heading").textContent = "Head " + name;
    const notes = $("head-notes");
    notes.replaceChildren();
    for (const line of (DATA.heads || {})[name] || ["no label"]) {
      const li = document.createElement("li");
      li.textContent = line;  // text, never HTML
      notes.appendChild(li);
    }
    mount("head-view", "AttentionPattern", { attention: pattern, tokens: tokens() });
    const row = pattern[state.query];
    $("query-heading").textContent = "Attention of query " + state.query + " " +
      JSON.stringify(tokens()[state.query]) + " over the keys";
    mount("query-view", "ColoredTokens", {
      tokens: tokens().map(escapeHtml),  // ColoredTokens inserts tokens as HTML
      values: row,
      minValue: 0,
      maxValue: Math.max(...row, 1e-9),
    });
    for (const td of document.querySelectorAll("#score-grid td.selected")) {
      td.classList.remove("selected");
    }
    const cell = $("cell-" + DATA.layers[state.layer] + "-" + state.head);
    if (cell) cell.classList.add("selected");
  }

  function openHead(layer, head, scroll) {
    const li = DATA.layers.indexOf(layer);
    if (li < 0 || head < 0 || head >= DATA.n_heads) return false;
    const layerChanged = li !== state.layer;
    state.layer = li;
    state.head = head;
    $("layer-select").value = String(li);
    $("head-select").value = String(head);
    if (layerChanged) renderLayer();
    renderHead();
    if (scroll) $("head-section").scrollIntoView();
    return true;
  }

  function scoreColour(v, lo, hi) {
    const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
    return "rgb(" + Math.round(255 - 200 * t) + "," + Math.round(255 - 120 * t) + ",255)";
  }

  function renderScores() {
    const name = $("score-select").value, grid = DATA.scores.values[name];
    const finite = grid.flat().filter((v) => v !== null);
    const lo = Math.min(...finite), hi = Math.max(...finite);
    const table = $("score-grid");
    table.replaceChildren();
    const top = table.insertRow(), corner = document.createElement("th");
    corner.textContent = "layer \\ head";
    top.appendChild(corner);
    for (let h = 0; h < DATA.n_heads; h++) {
      const th = document.createElement("th");
      th.textContent = String(h);
      top.appendChild(th);
    }
    grid.forEach((values, layer) => {
      const tr = table.insertRow(), th = document.createElement("th");
      th.textContent = String(layer);
      tr.appendChild(th);
      values.forEach((v, h) => {
        const td = tr.insertCell();
        td.id = "cell-" + layer + "-" + h;
        td.textContent = v === null ? "-" : v.toFixed(2);
        td.title = "L" + layer + "H" + h + " " + name + " = " + (v === null ? "n/a" : v);
        if (v !== null) td.style.background = scoreColour(v, lo, hi);
        if (DATA.layers.includes(layer)) {
          td.addEventListener("click", () => openHead(layer, h, true));
        } else {
          td.classList.add("missing");
          td.title += " (layer not captured)";
        }
      });
    });
    renderHead();
  }

  function showPrompt() {
    $("prompt-text").textContent = tokens().join("");
    fillQueries();
  }

  const promptSel = $("prompt-select"), layerSel = $("layer-select"), headSel = $("head-select");
  DATA.prompts.forEach((p, i) => option(promptSel, i, "prompt " + i + " (" + p.n + " tokens)"));
  DATA.layers.forEach((l, i) => option(layerSel, i, "layer " + l));
  for (let h = 0; h < DATA.n_heads; h++) option(headSel, h, "head " + h);
  if (DATA.prompts.length < 2) $("prompt-control").hidden = true;
  promptSel.addEventListener("change", () => {
    state.prompt = +promptSel.value;
    showPrompt();
    renderLayer();
    renderHead();
  });
  layerSel.addEventListener("change", () => {
    state.layer = +layerSel.value;
    renderLayer();
    renderHead();
  });
  headSel.addEventListener("change", () => {
    state.head = +headSel.value;
    renderHead();
  });
  $("query-select").addEventListener("change", () => {
    state.query = +$("query-select").value;
    renderHead();
  });

  showPrompt();
  $("summary").textContent = DATA.prompts.length + " prompt(s); layers " +
    DATA.layers.join(", ") + "; " + DATA.n_heads + " heads per layer";
  if (Object.keys(DATA.provenance).length) {
    $("provenance").textContent = JSON.stringify(DATA.provenance, null, 1);
  }
  renderLayer();
  if (DATA.scores) {
    DATA.scores.names.forEach((n) => option($("score-select"), n, n));
    if (DATA.open_score && DATA.scores.names.includes(DATA.open_score)) {
      $("score-select").value = DATA.open_score;
    }
    $("score-select").addEventListener("change", renderScores);
    renderScores();
  } else {
    $("scores-section").hidden = true;
    renderHead();
  }
  const m = /^#L(\d+)H(\d+)$/.exec(location.hash);
  if (m) openHead(+m[1], +m[2], true);
  else if (DATA.open_head) openHead(DATA.open_head[0], DATA.open_head[1], false);
  window.addEventListener("hashchange", () => {  // links such as the circuit graph's nodes
    const h = /^#L(\d+)H(\d+)$/.exec(location.hash);
    if (h) openHead(+h[1], +h[2], true);
  });
})();
