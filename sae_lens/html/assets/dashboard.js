// sae_lens feature dashboard. Written for this package; no third-party code.
// Reads the gzip+base64 compact payload inlined in #sae-data (format: sae_lens/html/dashboard.py),
// and builds DOM only for the selected feature and the visible rows of the feature list.
(function () {
  "use strict";

  const ROW_HEIGHT = 30;
  const ROW_OVERSCAN = 8;
  const ACT_LEVELS = 32767; // int16 quantisation steps up to a feature's largest |activation|
  const SVG_NS = "http://www.w3.org/2000/svg";

  const state = {
    meta: null,
    features: [], // {index, density, maxAct, meanAct, nTop, intervals, hist, lg, nn, co, scale, firstContext, topTokens}
    vocab: [],
    ids: null, // token ids of every context, concatenated
    acts: null, // int16 activations, scaled per feature
    starts: null, // context c spans [starts[c], starts[c + 1])
    byIndex: new Map(),
    prompt: null,
    sortKey: "index",
    sortDir: 1,
    order: [], // positions into features, after filter + sort
    selected: null,
    view: "feature",
    pickedToken: 0,
  };
  const dom = {};

  // -- small helpers ------------------------------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const key in attrs) node.setAttribute(key, attrs[key]);
    return node;
  }

  function fmt(value, sig) {
    sig = sig || 3;
    if (value === null || value === undefined || !isFinite(value)) return "–";
    if (value === 0) return "0";
    const a = Math.abs(value);
    if (a >= 1e5 || a < 1e-3) {
      return value.toExponential(sig - 1).replace(/\.?0+e/, "e").replace("e+", "e");
    }
    return String(Number(value.toPrecision(sig)));
  }

  function fmtCount(n) {
    const units = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];
    for (const [threshold, suffix] of units) {
      if (Math.abs(n) >= threshold) return String(Number((n / threshold).toPrecision(3))) + suffix;
    }
    return String(n);
  }

  function fmtPct(fraction) {
    return fmt(fraction * 100) + "%";
  }

  // Visible stand-ins for control characters, so a newline token is one visible cell.
  function showToken(text) {
    if (text === "") return "∅";
    return text.replace(/\n/g, "↵").replace(/\r/g, "␍").replace(/\t/g, "⇥");
  }

  function chipText(text) {
    return showToken(text).replace(/^ /, "␣").replace(/ $/, "␣");
  }

  function tokenChip(text) {
    const chip = el("span", "chip", chipText(text));
    chip.dataset.tip = JSON.stringify(text);
    return chip;
  }

  // "Nice" axis ticks: multiples of 1, 2, 2.5 or 5 x 10^k (the same maths as sae_lens/html/svg.py).
  function niceTicks(low, high, target) {
    if (!(high > low)) return [low];
    const raw = (high - low) / target;
    const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
    const residual = raw / magnitude;
    let step = 10 * magnitude;
    for (const s of [1, 2, 2.5, 5, 10]) {
      if (residual <= s * (1 + 1e-9)) { step = s * magnitude; break; }
    }
    const ticks = [];
    const first = Math.ceil(low / step - 1e-9);
    const last = Math.floor(high / step + 1e-9);
    for (let k = first; k <= last; k++) ticks.push(Number((k * step).toPrecision(12)));
    return ticks;
  }

  function shade(act, maxAct) {
    if (!act || !maxAct) return "";
    const alpha = Math.min(1, Math.abs(act) / Math.abs(maxAct)) * 0.9;
    return act > 0 ? "rgba(234, 98, 18, " + alpha.toFixed(3) + ")" : "rgba(37, 99, 235, " + alpha.toFixed(3) + ")";
  }

  // -- loading ------------------------------------------------------------------------------------

  async function decodePayload(node) {
    if (node.dataset.encoding !== "gzip+base64") throw new Error("unknown data encoding " + node.dataset.encoding);
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser has no DecompressionStream (needs Chrome 80+, Firefox 113+ or Safari 16.4+)");
    }
    const binary = atob(node.textContent.trim());
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    const buffer = await new Response(stream).arrayBuffer();
    // Layout (sae_lens/html/dashboard.py): uint32 L | JSON header | pad to 4 | typed arrays.
    const headerLength = new DataView(buffer).getUint32(0, true);
    const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 4, headerLength)));
    if (header.v !== 2) throw new Error("unsupported dashboard payload version " + header.v);
    let offset = 4 + headerLength;
    offset += (4 - (offset % 4)) % 4;
    const nContexts = header.n_contexts;
    const nTok = header.n_context_tokens;
    const lengths = new Uint32Array(buffer, offset, nContexts);
    offset += 4 * nContexts;
    const scales = new Float32Array(buffer, offset, header.features.length);
    offset += 4 * header.features.length;
    const ids = header.id_bytes === 4 ? new Uint32Array(buffer, offset, nTok) : new Uint16Array(buffer, offset, nTok);
    offset += header.id_bytes * nTok;
    const acts = new Int16Array(buffer, offset, nTok);
    const starts = new Float64Array(nContexts + 1);
    for (let c = 0; c < nContexts; c++) starts[c + 1] = starts[c] + lengths[c];
    return { header: header, scales: scales, ids: ids, acts: acts, starts: starts };
  }

  // A context is [token ids, activations] for context number c of the payload.
  function context(c, scale) {
    const s = state.starts[c];
    const e = state.starts[c + 1];
    const raw = state.acts.subarray(s, e);
    const values = new Float64Array(raw.length);
    const k = scale / ACT_LEVELS;
    for (let i = 0; i < raw.length; i++) values[i] = raw[i] * k;
    return [state.ids.subarray(s, e), values];
  }

  function topTokensOf(feature) {
    // The max-activating token of each top example, most active first, without repeats.
    const seen = new Set();
    const out = [];
    for (let c = feature.firstContext; c < feature.firstContext + feature.nTop; c++) {
      const s = state.starts[c];
      const e = state.starts[c + 1];
      let best = -1;
      let bestValue = -Infinity;
      for (let i = s; i < e; i++) {
        if (state.acts[i] > bestValue) { bestValue = state.acts[i]; best = i; }
      }
      if (best < 0) continue;
      const token = state.vocab[state.ids[best]];
      if (!seen.has(token)) { seen.add(token); out.push(token); }
      if (out.length >= 8) break;
    }
    return out;
  }

  function ingest(decoded) {
    const header = decoded.header;
    state.meta = header.meta;
    state.vocab = header.vocab;
    state.prompt = header.prompt;
    state.ids = decoded.ids;
    state.acts = decoded.acts;
    state.starts = decoded.starts;
    let next = 0;
    state.features = header.features.map(function (row, position) {
      const intervals = row[5];
      const feature = {
        index: row[0], density: row[1], maxAct: row[2], meanAct: row[3], nTop: row[4],
        intervals: intervals, hist: row[6], lg: row[7], nn: row[8], co: row[9],
        scale: decoded.scales[position], firstContext: next,
      };
      next += feature.nTop;
      for (const interval of intervals) next += interval[2];
      feature.topTokens = topTokensOf(feature);
      feature.search = feature.topTokens.join("\u0000").toLowerCase();
      return feature;
    });
    if (next !== header.n_contexts) throw new Error("payload holds " + header.n_contexts + " contexts, features name " + next);
    state.features.forEach(function (f, position) { state.byIndex.set(f.index, position); });
  }

  // -- page skeleton ------------------------------------------------------------------------------

  function buildSkeleton() {
    const meta = state.meta;
    const app = document.getElementById("app");
    app.textContent = "";
    const top = el("header", "topbar");
    top.appendChild(el("div", "brand", meta.title));
    const info = el("div", "meta");
    const sae = meta.sae;
    const pills = [
      ["", sae.name],
      ["", sae.architecture],
      ["d_in ", String(sae.d_in)],
      ["d_sae ", String(sae.d_sae)],
      ["", sae.model_name],
      ["", sae.hook_name],
      ["", fmtCount(meta.n_tokens) + " tokens"],
    ];
    for (const [label, value] of pills) {
      if (value === undefined || value === null || value === "") continue;
      const pill = el("span");
      if (label) pill.appendChild(document.createTextNode(label));
      pill.appendChild(el("b", "", value));
      info.appendChild(pill);
    }
    top.appendChild(info);
    const tabs = el("nav", "tabs");
    dom.tabFeatures = el("a", "", "Features");
    dom.tabFeatures.href = "#feature=" + (state.features.length ? state.features[0].index : 0);
    tabs.appendChild(dom.tabFeatures);
    if (state.prompt) {
      dom.tabPrompt = el("a", "", "Prompt");
      dom.tabPrompt.href = "#prompt";
      tabs.appendChild(dom.tabPrompt);
    }
    top.appendChild(tabs);
    app.appendChild(top);

    const layout = el("div", "layout");
    layout.appendChild(buildListPanel());
    dom.detail = el("section", "detail");
    dom.detail.id = "detail";
    layout.appendChild(dom.detail);
    app.appendChild(layout);
  }

  // -- feature list (virtualised) -----------------------------------------------------------------

  const COLUMNS = [
    ["index", "Index"],
    ["density", "Density"],
    ["maxAct", "Max act"],
    ["meanAct", "Mean act"],
    [null, "Top tokens"],
  ];

  function filterInput(labelText, placeholder, id, wide) {
    const label = el("label", wide ? "wide" : "");
    label.appendChild(document.createTextNode(labelText));
    const input = el("input");
    input.type = "text";
    input.id = id;
    input.placeholder = placeholder;
    input.autocomplete = "off";
    input.spellcheck = false;
    input.addEventListener("input", refreshList);
    label.appendChild(input);
    return [label, input];
  }

  function buildListPanel() {
    const panel = el("aside", "list-panel");
    const filters = el("div", "filters");
    let pair;
    pair = filterInput("Search top tokens", "e.g. the, ing, (", "f-search", true);
    filters.appendChild(pair[0]); dom.search = pair[1];
    pair = filterInput("Index", "12 or 100-200", "f-index", false);
    filters.appendChild(pair[0]); dom.index = pair[1];
    pair = filterInput("Max act ≥", "e.g. 2.5", "f-maxact", false);
    filters.appendChild(pair[0]); dom.maxAct = pair[1];
    pair = filterInput("Density ≥ (%)", "e.g. 0.01", "f-dmin", false);
    filters.appendChild(pair[0]); dom.densMin = pair[1];
    pair = filterInput("Density ≤ (%)", "e.g. 1", "f-dmax", false);
    filters.appendChild(pair[0]); dom.densMax = pair[1];
    panel.appendChild(filters);

    const status = el("div", "list-status");
    dom.count = el("span", "count");
    dom.count.id = "list-count";
    status.appendChild(dom.count);
    const reset = el("button", "", "Clear filters");
    reset.type = "button";
    reset.addEventListener("click", function () {
      for (const input of [dom.search, dom.index, dom.maxAct, dom.densMin, dom.densMax]) input.value = "";
      refreshList();
    });
    status.appendChild(reset);
    panel.appendChild(status);

    const head = el("div", "list-head");
    head.setAttribute("role", "row");
    dom.sortButtons = {};
    for (const [key, label] of COLUMNS) {
      if (!key) { head.appendChild(el("span", "", label)); continue; }
      const button = el("button", "", label);
      button.type = "button";
      button.dataset.sort = key;
      button.addEventListener("click", function () {
        if (state.sortKey === key) state.sortDir = -state.sortDir;
        else { state.sortKey = key; state.sortDir = key === "index" ? 1 : -1; }
        refreshList();
      });
      dom.sortButtons[key] = button;
      head.appendChild(button);
    }
    panel.appendChild(head);

    dom.viewport = el("div", "list-viewport");
    dom.viewport.id = "feature-list";
    dom.viewport.setAttribute("role", "grid");
    dom.spacer = el("div", "list-spacer");
    dom.viewport.appendChild(dom.spacer);
    dom.viewport.addEventListener("scroll", scheduleRows, { passive: true });
    dom.viewport.addEventListener("click", function (event) {
      const row = event.target.closest(".list-row");
      if (row) location.hash = "feature=" + row.dataset.index;
    });
    window.addEventListener("resize", scheduleRows);
    panel.appendChild(dom.viewport);
    return panel;
  }

  function parseNumber(text) {
    const t = text.trim();
    if (!t) return null;
    const v = Number(t);
    return isFinite(v) ? v : NaN;
  }

  function currentFilter() {
    const search = dom.search.value.trim().toLowerCase();
    let indexLow = null;
    let indexHigh = null;
    const indexText = dom.index.value.trim();
    const range = indexText.match(/^(\d+)\s*(?:-|–|\.\.)\s*(\d+)$/);
    if (range) { indexLow = Number(range[1]); indexHigh = Number(range[2]); }
    else if (/^\d+$/.test(indexText)) { indexLow = indexHigh = Number(indexText); }
    const maxAct = parseNumber(dom.maxAct.value);
    const densMin = parseNumber(dom.densMin.value);
    const densMax = parseNumber(dom.densMax.value);
    return { search, indexLow, indexHigh, maxAct, densMin, densMax, badIndex: indexText !== "" && indexLow === null };
  }

  function refreshList() {
    const f = currentFilter();
    const terms = f.search ? f.search.split(/[,\s]+/).filter(Boolean) : [];
    const passes = function (feature) {
      if (f.badIndex) return false;
      if (f.indexLow !== null && (feature.index < f.indexLow || feature.index > f.indexHigh)) return false;
      if (f.maxAct !== null && !(feature.maxAct >= f.maxAct)) return false;
      if (f.densMin !== null && !(feature.density * 100 >= f.densMin)) return false;
      if (f.densMax !== null && !(feature.density * 100 <= f.densMax)) return false;
      for (const term of terms) if (feature.search.indexOf(term) < 0) return false;
      return true;
    };
    const key = state.sortKey;
    const dir = state.sortDir;
    const order = [];
    state.features.forEach(function (feature, position) { if (passes(feature)) order.push(position); });
    order.sort(function (a, b) {
      const fa = state.features[a];
      const fb = state.features[b];
      return (fa[key] - fb[key]) * dir || fa.index - fb.index;
    });
    state.order = order;
    for (const k in dom.sortButtons) {
      const button = dom.sortButtons[k];
      const label = COLUMNS.find(function (c) { return c[0] === k; })[1];
      const active = k === key;
      button.classList.toggle("sorted", active);
      button.textContent = label + (active ? (dir > 0 ? " ▲" : " ▼") : "");
      button.setAttribute("aria-sort", active ? (dir > 0 ? "ascending" : "descending") : "none");
    }
    dom.count.textContent = order.length + " of " + state.features.length + " features";
    dom.spacer.style.height = order.length * ROW_HEIGHT + "px";
    // A new filter or order starts at the top of the list (routing then reveals the selected row).
    dom.viewport.scrollTop = 0;
    renderRows();
  }

  let rowsScheduled = false;
  function scheduleRows() {
    if (rowsScheduled) return;
    rowsScheduled = true;
    requestAnimationFrame(function () { rowsScheduled = false; renderRows(); });
  }

  // Densities span orders of magnitude: the bar is log-scaled between 1e-6 and 1.
  function densityBarWidth(density) {
    if (!(density > 0)) return 0;
    const t = (Math.log10(density) + 6) / 6;
    return Math.max(2, Math.min(1, t) * 26);
  }

  function renderRows() {
    const viewport = dom.viewport;
    const order = state.order;
    const first = Math.max(0, Math.floor(viewport.scrollTop / ROW_HEIGHT) - ROW_OVERSCAN);
    const visible = Math.ceil((viewport.clientHeight || 600) / ROW_HEIGHT) + 2 * ROW_OVERSCAN;
    const last = Math.min(order.length, first + visible);
    const fragment = document.createDocumentFragment();
    for (let r = first; r < last; r++) {
      const feature = state.features[order[r]];
      const row = el("div", "list-row");
      row.setAttribute("role", "row");
      row.dataset.index = feature.index;
      row.style.transform = "translateY(" + r * ROW_HEIGHT + "px)";
      if (feature.index === state.selected) row.classList.add("selected");
      row.appendChild(el("span", "idx", "#" + feature.index));
      const dens = el("span", "dens");
      const bar = el("span", "bar");
      bar.style.width = densityBarWidth(feature.density) + "px";
      dens.appendChild(bar);
      dens.appendChild(el("span", "", fmtPct(feature.density)));
      row.appendChild(dens);
      row.appendChild(el("span", "", fmt(feature.maxAct)));
      row.appendChild(el("span", "", fmt(feature.meanAct)));
      const toks = el("span", "toks");
      for (const t of feature.topTokens.slice(0, 5)) toks.appendChild(tokenChip(t));
      row.appendChild(toks);
      fragment.appendChild(row);
    }
    dom.spacer.textContent = "";
    if (!order.length) dom.spacer.appendChild(el("div", "list-empty", "No feature matches these filters."));
    dom.spacer.appendChild(fragment);
  }

  function revealRow(index) {
    const r = state.order.findIndex(function (p) { return state.features[p].index === index; });
    if (r < 0) return;
    const viewport = dom.viewport;
    const top = r * ROW_HEIGHT;
    if (top < viewport.scrollTop || top + ROW_HEIGHT > viewport.scrollTop + viewport.clientHeight) {
      viewport.scrollTop = Math.max(0, top - viewport.clientHeight / 3);
    }
    renderRows();
  }

  // -- feature detail -----------------------------------------------------------------------------

  function card(title, caption) {
    const node = el("div", "card");
    node.appendChild(el("h2", "", title));
    if (caption) node.appendChild(el("p", "caption", caption));
    return node;
  }

  function stat(label, value, note) {
    const node = el("div", "stat");
    node.appendChild(el("div", "label", label));
    node.appendChild(el("div", "value", value));
    if (note) node.appendChild(el("div", "note", note));
    return node;
  }

  function renderContext(context, maxAct) {
    const ids = context[0];
    const acts = context[1];
    let best = 0;
    for (let i = 1; i < acts.length; i++) if (acts[i] > acts[best]) best = i;
    const row = el("div", "ctx");
    row.appendChild(el("div", "cmax", acts.length ? fmt(acts[best]) : ""));
    const toks = el("div", "toks");
    for (let i = 0; i < ids.length; i++) {
      const text = state.vocab[ids[i]];
      const span = el("span", "tok", showToken(text));
      if (text !== showToken(text)) span.classList.add("ctl");
      const background = shade(acts[i], maxAct);
      if (background) span.style.backgroundColor = background;
      if (i === best && acts[i] > 0) span.classList.add("max");
      span.dataset.act = String(acts[i]);
      span.dataset.tip = JSON.stringify(text) + "  act " + fmt(acts[i], 4);
      toks.appendChild(span);
    }
    row.appendChild(toks);
    return row;
  }

  // The `n` contexts of `feature` from payload index `first` on, or the note `emptyText` when there are none.
  function contextList(feature, first, n, emptyText) {
    const list = el("div", "contexts");
    for (let k = first; k < first + n; k++) {
      list.appendChild(renderContext(context(k, feature.scale), feature.maxAct));
    }
    if (!n) list.appendChild(el("p", "empty", emptyText));
    return list;
  }

  function shadingLegend(maxAct) {
    const row = el("div", "legend-row");
    row.appendChild(el("span", "", "0"));
    row.appendChild(el("span", "gradient"));
    row.appendChild(el("span", "", fmt(maxAct) + " (feature max)"));
    const mark = el("span", "maxmark", "tok");
    row.appendChild(mark);
    row.appendChild(el("span", "", "= the context's max-activating token · hover a token for its value"));
    return row;
  }

  function histogramSvg(edges, counts) {
    const width = 520;
    const height = 200;
    const m = { left: 48, right: 12, top: 10, bottom: 36 };
    const w = width - m.left - m.right;
    const h = height - m.top - m.bottom;
    const root = svg("svg", { class: "chart", viewBox: "0 0 " + width + " " + height, width: width, height: height, role: "img" });
    root.setAttribute("aria-label", "histogram of nonzero activations");
    const x0 = edges[0];
    const x1 = edges[edges.length - 1] > x0 ? edges[edges.length - 1] : x0 + 1;
    const maxCount = Math.max(1, Math.max.apply(null, counts));
    const yTicks = niceTicks(0, maxCount, 4);
    const yTop = Math.max(maxCount, yTicks[yTicks.length - 1]);
    const sx = function (v) { return m.left + ((v - x0) / (x1 - x0)) * w; };
    const sy = function (v) { return m.top + h - (v / yTop) * h; };
    root.appendChild(svg("rect", { x: m.left, y: m.top, width: w, height: h, class: "plot-bg" }));
    for (const t of yTicks) {
      root.appendChild(svg("line", { x1: m.left, x2: m.left + w, y1: sy(t), y2: sy(t), class: "grid" }));
      const label = svg("text", { x: m.left - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end" });
      label.textContent = fmtCount(t);
      root.appendChild(label);
    }
    for (let i = 0; i < counts.length; i++) {
      if (!counts[i]) continue;
      const left = sx(edges[i]);
      const right = sx(edges[i + 1]);
      const bar = svg("rect", {
        x: (left + 0.5).toFixed(1), y: sy(counts[i]).toFixed(1),
        width: Math.max(0.8, right - left - 1).toFixed(1), height: (m.top + h - sy(counts[i])).toFixed(1),
        fill: "rgb(234, 98, 18)", class: "bar",
      });
      const title = svg("title", {});
      title.textContent = "[" + fmt(edges[i]) + ", " + fmt(edges[i + 1]) + "): " + counts[i];
      bar.appendChild(title);
      root.appendChild(bar);
    }
    root.appendChild(svg("line", { x1: m.left, x2: m.left + w, y1: m.top + h, y2: m.top + h, class: "axis" }));
    for (const t of niceTicks(x0, x1, 6)) {
      root.appendChild(svg("line", { x1: sx(t), x2: sx(t), y1: m.top + h, y2: m.top + h + 4, class: "axis" }));
      const label = svg("text", { x: sx(t), y: m.top + h + 17, class: "tick", "text-anchor": "middle" });
      label.textContent = fmt(t);
      root.appendChild(label);
    }
    const xl = svg("text", { x: m.left + w / 2, y: height - 4, class: "axis-label", "text-anchor": "middle" });
    xl.textContent = "activation";
    root.appendChild(xl);
    return root;
  }

  function valueRow(labelNode, value, scale, extraClass) {
    const row = el("div", "vrow" + (extraClass ? " " + extraClass : ""));
    const label = el("span", "label");
    label.appendChild(labelNode);
    row.appendChild(label);
    row.appendChild(el("span", "v", fmt(value)));
    const track = el("span", "track");
    const fill = el("span", "fill" + (value < 0 ? " neg" : ""));
    fill.style.width = (scale > 0 ? Math.min(100, (Math.abs(value) / scale) * 100) : 0).toFixed(1) + "%";
    track.appendChild(fill);
    row.appendChild(track);
    return row;
  }

  const LOGIT_CAPTIONS = {
    W_U: ["Direct effect on next-token logits: the decoder direction times the unembedding W_U.",
      "Ignores later layers and the final LayerNorm."],
    tied_embeddings: ["Similarity to the tied token embeddings (decoder direction · W_E): not a next-token prediction.",
      "Caveat: an encoder such as MiniLM has no next-token head; this shows which input-token embeddings the direction points towards."],
  };

  function logitsCard(feature) {
    const source = state.meta.logit_source;
    const node = card(source === "tied_embeddings" ? "Token embedding alignment" : "Logit effects",
      LOGIT_CAPTIONS[source] ? LOGIT_CAPTIONS[source][0] : "");
    node.id = "logits";
    const lg = feature.lg;
    if (!source || !lg) {
      node.appendChild(el("p", "empty", "No logit effects were computed for this SAE (logit source: none)."));
      return node;
    }
    node.appendChild(el("p", "caveat", LOGIT_CAPTIONS[source][1]));
    const cols = el("div", "logit-cols");
    const scale = Math.max.apply(null, lg[1].concat(lg[3]).map(Math.abs).concat([1e-12]));
    const sides = [["Top (most positive)", lg[0], lg[1]], ["Bottom (most negative)", lg[2], lg[3]]];
    for (const [title, ids, values] of sides) {
      const col = el("div");
      col.appendChild(el("h3", "", title));
      if (!ids.length) col.appendChild(el("p", "empty", "none"));
      for (let i = 0; i < ids.length; i++) col.appendChild(valueRow(tokenChip(state.vocab[ids[i]]), values[i], scale));
      cols.appendChild(col);
    }
    node.appendChild(cols);
    return node;
  }

  function featureLink(index) {
    if (state.byIndex.has(index)) {
      const link = el("a", "flink", "#" + index);
      link.href = "#feature=" + index;
      return link;
    }
    const span = el("span", "absent", "#" + index);
    span.title = "feature " + index + " is not included in this dashboard";
    return span;
  }

  function neighboursCard(title, caption, pairs, id) {
    const node = card(title, caption);
    node.id = id;
    const features = pairs[0];
    const values = pairs[1];
    if (!features.length) node.appendChild(el("p", "empty", "none"));
    const scale = Math.max.apply(null, values.map(Math.abs).concat([1e-12]));
    for (let i = 0; i < features.length; i++) {
      const row = el("div", "vrow nrow");
      row.appendChild(featureLink(features[i]));
      const toks = el("span", "label");
      const other = state.byIndex.has(features[i]) ? state.features[state.byIndex.get(features[i])] : null;
      if (other) for (const t of other.topTokens.slice(0, 4)) toks.appendChild(tokenChip(t));
      else toks.appendChild(el("span", "faint", "not in this page"));
      row.appendChild(toks);
      row.appendChild(el("span", "v", fmt(values[i])));
      const track = el("span", "track");
      const fill = el("span", "fill" + (values[i] < 0 ? " neg" : ""));
      fill.style.width = (Math.abs(values[i]) / scale * 100).toFixed(1) + "%";
        track.appendChild(fill);
      row.appendChild(track);
      node.appendChild(row);
    }
    return node;
  }

  function intervalsCard(feature) {
    const quantile = state.meta.interval_kind === "quantile";
    const node = card(
      quantile ? "Examples from quantile intervals" : "Examples from equal-width intervals",
      quantile
        ? "The feature's nonzero activations are split into quantile intervals (each holds an equal share of them); examples are sampled from each."
        : "The activation range is cut into intervals of equal width (these are not quantiles); examples are sampled from each."
    );
    node.id = "intervals";
    // Each interval's contexts follow the top examples, in payload order; show the highest interval first.
    let c = feature.firstContext + feature.nTop;
    const intervals = feature.intervals.map(function (interval) {
      const entry = { low: interval[0], high: interval[1], first: c, n: interval[2] };
      c += interval[2];
      return entry;
    }).sort(function (a, b) { return b.high - a.high; });
    if (!intervals.length) node.appendChild(el("p", "empty", "No interval examples in this data."));
    intervals.forEach(function (interval, i) {
      const block = el("div", "interval");
      const head = el("div", "interval-head");
      head.appendChild(el("span", "kind", (quantile ? "Quantile interval " : "Equal-width interval ") + (i + 1) + "/" + intervals.length));
      head.appendChild(el("span", "range", "[" + fmt(interval.low) + ", " + fmt(interval.high) + "]"));
      head.appendChild(el("span", "n", interval.n + " example" + (interval.n === 1 ? "" : "s")));
      block.appendChild(head);
      // The examples are drawn from a sample, so a thin interval can hold activations none of
      // the kept candidates fall in.
      block.appendChild(contextList(feature, interval.first, interval.n, "no examples kept for this interval"));
      node.appendChild(block);
    });
    return node;
  }

  function neighbourInOrder(step) {
    const r = state.order.findIndex(function (p) { return state.features[p].index === state.selected; });
    if (r < 0 || !state.order.length) return null;
    const next = state.order[(r + step + state.order.length) % state.order.length];
    return state.features[next].index;
  }

  function renderFeature(index) {
    const detailPane = dom.detail;
    detailPane.textContent = "";
    detailPane.scrollTop = 0;
    const position = state.byIndex.get(index);
    if (position === undefined) {
      const missing = el("div", "card");
      missing.id = "feature-missing";
      missing.appendChild(el("h2", "", "Feature " + index + " is not in this dashboard"));
      missing.appendChild(el("p", "muted", "This page holds " + state.features.length + " features; pick one from the list."));
      detailPane.appendChild(missing);
      return;
    }
    const feature = state.features[position];
    const root = el("article", "feature");
    root.id = "feature-view";
    root.dataset.index = feature.index;

    const head = el("div", "feature-head");
    const titles = el("div");
    const h1 = el("h1", "", "Feature " + feature.index);
    h1.id = "feature-title";
    titles.appendChild(h1);
    titles.appendChild(el("div", "sub", state.meta.sae.name + " · " + state.meta.sae.hook_name));
    head.appendChild(titles);
    const nav = el("div", "nav-buttons");
    const prev = el("button", "", "← Prev");
    prev.type = "button";
    prev.title = "previous feature in the list (k)";
    prev.addEventListener("click", function () { const i = neighbourInOrder(-1); if (i !== null) location.hash = "feature=" + i; });
    const next = el("button", "", "Next →");
    next.type = "button";
    next.title = "next feature in the list (j)";
    next.addEventListener("click", function () { const i = neighbourInOrder(1); if (i !== null) location.hash = "feature=" + i; });
    nav.appendChild(prev);
    nav.appendChild(next);
    head.appendChild(nav);
    root.appendChild(head);

    const nTokens = state.meta.n_tokens;
    const stats = el("div", "stats");
    const oneIn = feature.density > 0 ? "1 in " + fmtCount(Math.round(1 / feature.density)) + " tokens" : "never fires";
    stats.appendChild(stat("Density", fmtPct(feature.density), oneIn));
    stats.appendChild(stat("Max activation", fmt(feature.maxAct)));
    stats.appendChild(stat("Mean when firing", fmt(feature.meanAct)));
    stats.appendChild(stat("Fires on", fmtCount(Math.round(feature.density * nTokens)) + " tokens", "of " + fmtCount(nTokens) + " collected"));
    root.appendChild(stats);

    const top = card("Top activations", "Contexts around the tokens where this feature is most active; the left column is the context's max activation.");
    top.id = "top-examples";
    top.classList.add("section");
    top.appendChild(shadingLegend(feature.maxAct));
    top.appendChild(contextList(feature, feature.firstContext, feature.nTop, "No examples in this data."));
    root.appendChild(top);

    const row1 = el("div", "grid2");
    const nonzero = feature.hist[1].reduce(function (a, b) { return a + b; }, 0);
    const hist = card("Activation histogram",
      "Nonzero activations (" + fmtCount(nonzero) + " counted). Fires on " + fmtPct(feature.density) + " of " + fmtCount(nTokens) + " tokens.");
    hist.id = "histogram";
    if (feature.hist[1].length) hist.appendChild(histogramSvg(feature.hist[0], feature.hist[1]));
    else hist.appendChild(el("p", "empty", "No nonzero activations recorded."));
    row1.appendChild(hist);
    row1.appendChild(logitsCard(feature));
    root.appendChild(row1);

    const row2 = el("div", "grid2");
    row2.appendChild(neighboursCard("Nearest features", "By cosine similarity of decoder directions, over the whole dictionary.", feature.nn, "nearest"));
    row2.appendChild(neighboursCard("Most correlated features", "By correlation of activations over the collected tokens.", feature.co, "correlated"));
    root.appendChild(row2);

    const iv = intervalsCard(feature);
    iv.classList.add("section");
    root.appendChild(iv);
    detailPane.appendChild(root);
  }

  // -- prompt view --------------------------------------------------------------------------------

  function renderPrompt() {
    const prompt = state.prompt;
    const pane = dom.detail;
    pane.textContent = "";
    const root = el("article", "prompt");
    root.id = "prompt-view";
    const head = el("div", "feature-head");
    const titles = el("div");
    titles.appendChild(el("h1", "", "Prompt"));
    titles.appendChild(el("div", "sub", "Each token with the features most active on it; click a token to pick it."));
    head.appendChild(titles);
    root.appendChild(head);

    let maxValue = 0;
    for (const [, values] of prompt.top) for (const v of values) maxValue = Math.max(maxValue, v);
    const textCard = card("Tokens", "Shaded by each token's strongest feature activation (max " + fmt(maxValue) + ").");
    const tokens = el("div", "prompt-tokens");
    tokens.id = "prompt-tokens";
    const rows = [];
    prompt.tokens.forEach(function (id, position) {
      const text = state.vocab[id];
      const span = el("span", "tok", showToken(text));
      const values = prompt.top[position][1];
      const strongest = values.length ? Math.max.apply(null, values) : 0;
      const background = shade(strongest, maxValue);
      if (background) span.style.backgroundColor = background;
      span.dataset.tip = JSON.stringify(text) + "  top " + (prompt.top[position][0].length
        ? "#" + prompt.top[position][0][0] + " " + fmt(prompt.top[position][1][0], 4) : "none");
      span.dataset.position = position;
      span.addEventListener("click", function () { pick(position); });
      tokens.appendChild(span);
    });
    textCard.classList.add("section");
    textCard.appendChild(tokens);
    root.appendChild(textCard);

    const tableCard = card("Top features per token", "Feature links open that feature's dashboard.");
    tableCard.classList.add("section");
    const table = el("table", "data");
    table.id = "prompt-table";
    const thead = el("thead");
    const hr = el("tr");
    hr.appendChild(el("th", "num", "#"));
    hr.appendChild(el("th", "", "Token"));
    hr.appendChild(el("th", "", "Top features (activation)"));
    thead.appendChild(hr);
    table.appendChild(thead);
    const tbody = el("tbody");
    prompt.tokens.forEach(function (id, position) {
      const tr = el("tr");
      tr.appendChild(el("td", "num", String(position)));
      const tokenCell = el("td");
      tokenCell.appendChild(tokenChip(state.vocab[id]));
      tr.appendChild(tokenCell);
      const cell = el("td");
      const [features, values] = prompt.top[position];
      if (!features.length) cell.appendChild(el("span", "faint", "–"));
      for (let i = 0; i < features.length; i++) {
        const item = el("span", "feat");
        item.appendChild(featureLink(features[i]));
        item.appendChild(document.createTextNode(" " + fmt(values[i])));
        cell.appendChild(item);
      }
      tr.appendChild(cell);
      rows.push(tr);
      tbody.appendChild(tr);
    });
    table.appendChild(tbody);
    tableCard.appendChild(table);
    root.appendChild(tableCard);
    pane.appendChild(root);

    function pick(position) {
      state.pickedToken = position;
      tokens.querySelectorAll(".picked").forEach(function (n) { n.classList.remove("picked"); });
      rows.forEach(function (r) { r.classList.remove("picked"); });
      const span = tokens.children[position];
      if (span) span.classList.add("picked");
      if (rows[position]) { rows[position].classList.add("picked"); rows[position].scrollIntoView({ block: "nearest" }); }
    }
  }

  // -- routing: #feature=N, #prompt ---------------------------------------------------------------

  function parseHash() {
    const hash = decodeURIComponent(location.hash.replace(/^#/, ""));
    const match = hash.match(/(?:^|&)feature=(\d+)/);
    if (match) return { view: "feature", index: Number(match[1]) };
    if (hash === "prompt" && state.prompt) return { view: "prompt" };
    return null;
  }

  function route() {
    let target = parseHash();
    if (!target && !state.features.length && state.prompt) {
      // A prompt-only page (`sae-lens inspect --html`) opens on the prompt view.
      history.replaceState(null, "", "#prompt");
      target = { view: "prompt" };
    }
    if (!target) {
      if (!state.features.length) {
        dom.detail.textContent = "";
        dom.detail.appendChild(el("p", "empty", "This dashboard holds no features."));
        return;
      }
      // Open on the first feature without adding a history entry, so Back leaves the page.
      const first = state.features[state.order.length ? state.order[0] : 0].index;
      history.replaceState(null, "", "#feature=" + first);
      target = { view: "feature", index: first };
    }
    state.view = target.view;
    if (dom.tabPrompt) dom.tabPrompt.classList.toggle("active", target.view === "prompt");
    dom.tabFeatures.classList.toggle("active", target.view === "feature");
    if (target.view === "prompt") {
      renderPrompt();
      return;
    }
    state.selected = target.index;
    dom.tabFeatures.href = "#feature=" + target.index;
    document.title = "Feature " + target.index + " · " + state.meta.title;
    renderFeature(target.index);
    revealRow(target.index);
  }

  // -- tooltip (token values on hover) --------------------------------------------------------------

  function setupTooltip() {
    const tip = document.getElementById("tooltip");
    document.addEventListener("mouseover", function (event) {
      const target = event.target.closest ? event.target.closest("[data-tip]") : null;
      if (!target) { tip.hidden = true; return; }
      tip.textContent = target.dataset.tip;
      tip.hidden = false;
      const box = target.getBoundingClientRect();
      const left = Math.min(window.innerWidth - tip.offsetWidth - 8, Math.max(8, box.left));
      const top = box.top - tip.offsetHeight - 6 < 4 ? box.bottom + 6 : box.top - tip.offsetHeight - 6;
      tip.style.left = left + "px";
      tip.style.top = top + "px";
    });
    document.addEventListener("scroll", function () { tip.hidden = true; }, true);
  }

  function setupKeys() {
    document.addEventListener("keydown", function (event) {
      if (event.target.tagName === "INPUT" || event.metaKey || event.ctrlKey || event.altKey) return;
      if (state.view !== "feature") return;
      const step = event.key === "j" || event.key === "ArrowDown" ? 1 : event.key === "k" || event.key === "ArrowUp" ? -1 : 0;
      if (!step) return;
      const index = neighbourInOrder(step);
      if (index !== null) { event.preventDefault(); location.hash = "feature=" + index; }
    });
  }

  async function main() {
    const node = document.getElementById("sae-data");
    try {
      ingest(await decodePayload(node));
    } catch (error) {
      const loading = document.getElementById("loading");
      loading.className = "load-error";
      loading.textContent = "Could not read the dashboard data: " + error.message;
      throw error;
    }
    buildSkeleton();
    refreshList();
    setupTooltip();
    setupKeys();
    window.addEventListener("hashchange", route);
    route();
    document.body.dataset.ready = "true";
  }

  main();
})();
