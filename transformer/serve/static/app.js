// The page: calls this server's JSON API (/models, /translate, /attention, /work) and shows the answers.
// It knows nothing of the model beyond what /models says, and requests nothing from anywhere else.
"use strict";

const LANGUAGES = { de: "German", en: "English", fr: "French", cs: "Czech", es: "Spanish", it: "Italian" };
// Rows (queries) and columns (keys) of each kind. A decoder row is named by the piece it chose; a decoder
// column by the piece fed in at that position (BOS first).
const KIND_AXES = { encoder: ["source", "source"], decoder: ["output", "target"], cross: ["output", "source"] };

const state = { models: [], model: null, maxBeam: 1, attention: null, chosenRow: null, busy: false };

const $ = (id) => document.getElementById(id);

function element(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  let answer;
  try {
    answer = await response.json();
  } catch (e) {
    throw new Error(`${path}: the server answered ${response.status} without JSON`);
  }
  if (!response.ok) throw new Error(answer.error || `${path}: the server answered ${response.status}`);
  return answer;
}

function languageName(code) {
  return LANGUAGES[code] || code;
}

function formatCount(n, unit) {
  // e.g. 12.34 MFLOPs, 7.60 M parameters (unit " parameters").
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} G${unit}`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M${unit}`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)} k${unit}`;
  return `${n} ${unit.trim()}`;
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

// The model.

function showModel() {
  const m = state.model;
  $("source-language").textContent = languageName(m.source_language);
  $("source").lang = m.source_language;
  $("translation").lang = m.target_language;
  const beam = m.decode.beam_size === 1 ? "greedy search" : `beam ${m.decode.beam_size}`;
  $("model-info").textContent = `${m.name}: ${languageName(m.source_language)} → ${languageName(m.target_language)}, ` +
    `${formatCount(m.parameters, " parameters")}, ${m.layers.encoder}+${m.layers.decoder} layers, ${m.heads} heads, ` +
    `${m.engine} in ${m.precision}, ${beam}, length penalty α ${m.decode.length_penalty}`;
  const heads = $("head");
  heads.replaceChildren(element("option", "mean of the heads"));
  heads.firstChild.value = "mean";
  for (let h = 0; h < m.heads; h++) {
    const option = element("option", `head ${h + 1}`);
    option.value = String(h);
    heads.append(option);
  }
}

async function loadModels() {
  const answer = await api("/models");
  state.models = answer.models;
  const select = $("model");
  for (const m of answer.models) {
    const option = element("option", `${m.name} (${m.source_language} → ${m.target_language})`);
    option.value = m.name;
    select.append(option);
  }
  select.value = answer.default;
  $("model-choice").hidden = answer.models.length < 2;
  $("source").maxLength = answer.limits.max_chars;
  state.maxBeam = answer.limits.max_beam;
  state.model = answer.models.find((m) => m.name === answer.default);
  showModel();
}

// Translation.

async function translate(event) {
  if (event) event.preventDefault();
  const text = $("source").value.trim();
  if (!text || state.busy) return;
  state.busy = true;
  $("translate-button").disabled = true;
  setStatus("Translating…");
  const m = state.model;
  try {
    const nBest = Math.min(m.decode.beam_size, state.maxBeam);
    const answer = await api("/translate", { text, model: m.name, n_best: nBest });
    showTranslation(answer);
    setStatus("");
    if (m.attention) {
      $("unavailable").hidden = true;
      await showAttention(text);
      await showWork(text);
    } else {
      $("attention-section").hidden = true;
      $("work-section").hidden = true;
      $("unavailable").hidden = false;
      $("unavailable-reason").textContent = `${m.name} runs on CTranslate2, whose attention weights and per-layer ` +
        "work this page cannot read; serve the checkpoint with --engine torch to see them.";
    }
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    state.busy = false;
    $("translate-button").disabled = false;
  }
}

function showTranslation(answer) {
  $("result").hidden = false;
  $("translation").textContent = answer.translations[0];
  const t = answer.timings;
  $("timing").textContent = `${t.total_ms.toFixed(0)} ms in the server, ${t.decode_ms.toFixed(0)} ms of it decoding ` +
    `(in a batch of ${t.batch_sentences} sentence${t.batch_sentences === 1 ? "" : "s"})`;
  const list = $("nbest");
  list.replaceChildren();
  for (const candidate of answer.n_best[0]) {
    const item = element("li", candidate.text);
    if (candidate.score !== null) {
      item.append(element("span", `score ${candidate.score.toFixed(3)}`, "score"));
    }
    list.append(item);
  }
  $("nbest-heading").hidden = list.children.length < 2;
  list.hidden = list.children.length < 2;
}

// Attention.

async function showAttention(text) {
  setStatus("Reading the attention…");
  state.attention = await api("/attention", { text, model: state.model.name });
  state.chosenRow = null;
  $("attention-section").hidden = false;
  fillLayers();
  drawHeatmap();
  setStatus("");
}

function fillLayers() {
  const kind = $("kind").value;
  const count = state.attention.attention[kind].length;
  const select = $("layer");
  const previous = select.value;
  select.replaceChildren();
  for (let l = 0; l < count; l++) {
    const option = element("option", `layer ${l + 1}`);
    option.value = String(l);
    select.append(option);
  }
  select.value = previous && Number(previous) < count ? previous : String(count - 1);
}

function currentWeights() {
  const a = state.attention.attention[$("kind").value][Number($("layer").value)];
  const head = $("head").value;
  if (head !== "mean") return a[Number(head)];
  return a[0].map((row, i) => row.map((_, j) => a.reduce((sum, h) => sum + h[i][j], 0) / a.length));
}

function axisPieces(kind) {
  const [rows, columns] = KIND_AXES[kind];
  const a = state.attention;
  const pieces = { source: a.source_pieces, target: a.target_pieces, output: a.output_pieces };
  return [pieces[rows], pieces[columns]];
}

function shade(value) {
  // White to deep blue; the text colour is irrelevant, cells carry no text.
  const v = Math.max(0, Math.min(1, value));
  const from = [247, 251, 255];
  const to = [8, 48, 107];
  const rgb = from.map((c, i) => Math.round(c + (to[i] - c) * Math.sqrt(v)));
  return `rgb(${rgb.join(", ")})`;
}

function drawHeatmap() {
  const kind = $("kind").value;
  const weights = currentWeights();
  const [rowPieces, columnPieces] = axisPieces(kind);
  const table = $("heatmap");
  table.replaceChildren();
  const head = element("thead");
  const top = element("tr");
  top.append(element("td"));
  for (const piece of columnPieces) {
    const th = element("th");
    th.scope = "col";
    th.append(element("span", piece));
    top.append(th);
  }
  head.append(top);
  const body = element("tbody");
  rowPieces.forEach((piece, i) => {
    const tr = element("tr");
    const th = element("th");
    th.scope = "row";
    const button = element("button", piece, "piece");
    button.type = "button";
    button.dataset.row = String(i);
    button.setAttribute("aria-pressed", String(state.chosenRow === i));
    button.addEventListener("click", () => chooseRow(i));
    th.append(button);
    tr.append(th);
    columnPieces.forEach((key, j) => {
      const value = weights[i][j];
      const td = element("td", undefined, "cell");
      td.style.backgroundColor = shade(value);
      td.dataset.value = String(value);
      td.title = `${piece} → ${key}: ${value.toFixed(4)}`;
      td.setAttribute("aria-label", td.title);
      td.addEventListener("mouseenter", () => { $("cell-readout").textContent = td.title; });
      tr.append(td);
    });
    if (state.chosenRow === i) tr.className = "chosen";
    body.append(tr);
  });
  table.append(head, body);
  showFocus();
}

function chooseRow(i) {
  state.chosenRow = state.chosenRow === i ? null : i;
  for (const tr of $("heatmap").tBodies[0].rows) {
    const chosen = Number(tr.querySelector("button").dataset.row) === state.chosenRow;
    tr.className = chosen ? "chosen" : "";
    tr.querySelector("button").setAttribute("aria-pressed", String(chosen));
  }
  showFocus();
}

function showFocus() {
  const strip = $("focus-strip");
  strip.replaceChildren();
  if (state.chosenRow === null) {
    strip.append(element("span", "Choose a piece on the left to see what it attended to.", "label"));
    return;
  }
  const kind = $("kind").value;
  const [rowPieces, columnPieces] = axisPieces(kind);
  const weights = currentWeights()[state.chosenRow];
  const who = kind === "encoder" ? rowPieces[state.chosenRow] : `choosing ${rowPieces[state.chosenRow]}, the decoder`;
  strip.append(element("span", `${who} attended to:`, "label"));
  columnPieces.forEach((piece, j) => {
    const span = element("span", piece, "piece");
    span.style.backgroundColor = shade(weights[j]);
    span.style.color = weights[j] > 0.35 ? "#fff" : "";
    span.title = `${weights[j].toFixed(4)}`;
    strip.append(span);
  });
}

// Where the work goes.

async function showWork(text) {
  setStatus("Measuring where the work goes…");
  const work = await api("/work", { text, model: state.model.name });
  const body = $("work-table").tBodies[0];
  body.replaceChildren();
  const totalMs = work.components.reduce((sum, c) => sum + c.ms, 0);
  const sides = { encoder: "Encoder", decoder: "Decoder", search: "Search, outside the model" };
  let side = null;
  for (const c of work.components) {
    if (c.side !== side) {
      side = c.side;
      const tr = element("tr", undefined, "side");
      const th = element("th", sides[side]);
      th.colSpan = 5;
      th.scope = "colgroup";
      tr.append(th);
      body.append(tr);
    }
    const tr = element("tr");
    const name = c.side === "encoder" && c.component === "embedding" ? "embedding" : c.label;
    tr.append(element("td", name));
    tr.append(element("td", c.flops ? formatCount(c.flops, "FLOPs") : "–", "number"));
    tr.append(barCell(work.flops ? c.flops / work.flops : 0, ""));
    tr.append(element("td", `${c.ms.toFixed(2)} ms`, "number"));
    tr.append(barCell(totalMs ? c.ms / totalMs : 0, "time"));
    body.append(tr);
  }
  const attention = work.components.filter((c) => c.component === "attention").reduce((s, c) => s + c.flops, 0);
  $("work-summary").textContent =
    `The encoder read the ${work.source_pieces} pieces of this sentence at once: each of its matrix products has ` +
    `${work.source_pieces} rows, one per position, computed in parallel (a recurrent encoder would take ` +
    `${work.source_pieces} steps one after another). The decoder then took ${work.steps} steps one after another, ` +
    `${work.beam === 1 ? "one hypothesis" : `${work.beam} hypotheses (the beam)`} per step, each feeding ` +
    `${work.use_cache ? "only its newest position, thanks to the key/value cache" : "its whole prefix"}. ` +
    `${formatCount(work.flops, "FLOPs")} in all; attention's scores and weighted sums are ` +
    `${(100 * attention / work.flops).toFixed(1)}% of them.`;
  $("work-notes").textContent =
    `FLOPs are counted from the model's sizes (two per multiply-add of a matrix product); without the cache the ` +
    `same search would need ${formatCount(work.flops_without_cache, "FLOPs")} ` +
    `(${(work.flops_without_cache / work.flops).toFixed(1)}×). Times are measured operation by operation ` +
    `(${totalMs.toFixed(1)} ms measured in ${work.wall_ms.toFixed(1)} ms under the clock): on a CPU, small ` +
    "matrices cost little arithmetic next to each operation's fixed overhead, so the shares of time and of FLOPs differ.";
  $("work-section").hidden = false;
  setStatus("");
}

function barCell(share, className) {
  const td = element("td");
  const bar = element("span", undefined, `bar ${className}`.trim());
  bar.style.width = `${(share * 8).toFixed(2)}rem`;
  td.append(bar, element("span", ` ${(100 * share).toFixed(1)}%`));
  return td;
}

// Wiring.

function onModelChange() {
  state.model = state.models.find((m) => m.name === $("model").value);
  showModel();
  $("result").hidden = true;
  $("attention-section").hidden = true;
  $("work-section").hidden = true;
  $("unavailable").hidden = true;
}

function start() {
  $("translate-form").addEventListener("submit", translate);
  $("source").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) translate(event);
  });
  $("model").addEventListener("change", onModelChange);
  $("kind").addEventListener("change", () => { state.chosenRow = null; fillLayers(); drawHeatmap(); });
  $("layer").addEventListener("change", drawHeatmap);
  $("head").addEventListener("change", drawHeatmap);
  $("attention-controls").addEventListener("submit", (event) => event.preventDefault());
  loadModels().catch((e) => {
    $("model-info").textContent = `The server did not describe its models: ${e.message}`;
    $("model-info").className = "error";
  });
}

document.addEventListener("DOMContentLoaded", start);
