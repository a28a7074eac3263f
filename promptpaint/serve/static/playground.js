// promptpaint playground: one image, interactive SAM prompts, and the /v1 API of the same server.
// Plain browser JavaScript, no build step. Every coordinate kept here is in image pixels.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "promptpaint.token";
const DRAG_PX = 5; // a pointer that moves less than this (screen px) between down and up is a click
const MASK_COLORS = [[30, 144, 255], [255, 140, 0], [50, 205, 50], [220, 20, 60], [148, 0, 211]];

const state = {
  file: null, // the uploaded Blob, sent as-is so the server sees the original bytes
  bitmap: null, // the decoded image, drawn under the overlays
  beforeUrl: null, // object URL of the upload, the "before" of the comparison
  points: [], // [[x, y, label]], label 1 = positive, 0 = negative
  boxes: [], // [[x0, y0, x1, y1]] drawn by the user
  detections: [], // [{box, score, label}] from /v1/detect or /v1/edit
  masks: [], // offscreen canvases, tinted masks to draw over the image
  drag: null, // {x, y, sx, sy, current: [x, y] | null} while the pointer is down
  models: null, // the /v1/models answer
  defaultsApplied: false,
  busy: false,
};

// ---------------------------------------------------------------- status line

function setStatus(message, kind = "info") {
  const el = $("status");
  el.textContent = message;
  el.className = kind; // info | busy | ok | error (styled in playground.css)
}

class ApiError extends Error {} // the server said no
class InputError extends Error {} // the page's own inputs are not usable

// Turns an error response into one readable line: FastAPI's {"detail": [...]} or {"detail": "..."}, or the body.
async function describeError(resp) {
  let detail = "";
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    const d = body && body.detail !== undefined ? body.detail : body;
    if (Array.isArray(d)) {
      detail = d
        .map((e) => (e && typeof e === "object" ? `${(e.loc || []).join(".")}: ${e.msg}` : String(e)))
        .join("; ");
    } else {
      detail = typeof d === "string" ? d : JSON.stringify(d);
    }
  } catch {
    detail = text.trim().slice(0, 300);
  }
  let line = `${resp.status} ${resp.statusText}`.trim() + (detail ? `: ${detail}` : "");
  const retry = resp.headers.get("Retry-After");
  if (retry) line += ` (retry after ${retry} s)`;
  return line;
}

// Lineage seeds are 63-bit integers: JSON.parse would round them to the nearest double. Integer literals of 16+
// digits are read as BigInt when a double cannot hold them, and written back digit for digit by prettyJson().
const BIG_INT = /"(?:[^"\\]|\\.)*"|(?<![\d.eE+-])-?\d{16,}(?![\d.eE])/g;
const BIG_MARK = "__promptpaint_bigint__:";

function parseJson(text) {
  const marked = text.replace(BIG_INT, (m) => (m[0] === '"' ? m : `"${BIG_MARK}${m}"`));
  return JSON.parse(marked, (_, v) => {
    if (typeof v !== "string" || !v.startsWith(BIG_MARK)) return v;
    const digits = v.slice(BIG_MARK.length);
    return Number.isSafeInteger(Number(digits)) ? Number(digits) : BigInt(digits);
  });
}

function prettyJson(value) {
  const text = JSON.stringify(value, (_, v) => (typeof v === "bigint" ? `${BIG_MARK}${v}` : v), 2);
  return text.replace(new RegExp(`"${BIG_MARK}(-?\\d+)"`, "g"), "$1");
}

async function api(path, form) {
  const headers = {};
  const token = $("token").value.trim();
  if (token) headers.Authorization = `Bearer ${token}`;
  let resp;
  try {
    resp = await fetch(path, form ? { method: "POST", headers, body: form } : { headers });
  } catch (e) {
    throw new ApiError(`${path}: the server did not answer (${e.message})`);
  }
  if (!resp.ok) throw new ApiError(`${path}: ${await describeError(resp)}`);
  const text = await resp.text();
  try {
    return parseJson(text);
  } catch (e) {
    throw new ApiError(`${path}: the answer is not JSON (${e.message}): ${text.slice(0, 200)}`);
  }
}

// Runs one action; any failure ends up in the status line. An exclusive action (the default) disables the
// buttons while it runs; a background one (loading the models) leaves them alone and, when it succeeds, does
// not overwrite the status of an exclusive action in flight.
async function action(busyMessage, fn, { exclusive = true } = {}) {
  if (exclusive && state.busy) return;
  const buttons = document.querySelectorAll(".buttons button");
  if (exclusive) {
    state.busy = true;
    buttons.forEach((b) => (b.disabled = true));
  }
  if (exclusive || !state.busy) setStatus(busyMessage, "busy");
  try {
    const done = await fn();
    if (exclusive || !state.busy) setStatus(done || "Done.", "ok");
  } catch (e) {
    setStatus(e instanceof ApiError || e instanceof InputError ? e.message : `Error: ${e.message || e}`, "error");
  } finally {
    if (exclusive) {
      state.busy = false;
      buttons.forEach((b) => (b.disabled = false));
    }
  }
}

// ---------------------------------------------------------------- settings

function queries() {
  return $("queries").value.split(",").map((q) => q.trim()).filter(Boolean);
}

// The number in an input, or null when it is empty; a malformed one is an InputError naming the field.
function numberField(id, label, { integer = false } = {}) {
  const raw = $(id).value.trim();
  if (raw === "") return null;
  const v = Number(raw);
  if (!Number.isFinite(v) || (integer && !Number.isInteger(v))) {
    throw new InputError(`${label} must be ${integer ? "a whole number" : "a number"}, got ${JSON.stringify(raw)}`);
  }
  return v;
}

function settings() {
  return {
    queries: queries(),
    threshold: numberField("threshold", "Threshold"),
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    seed: numberField("seed", "Seed", { integer: true }),
    steps: numberField("steps", "Steps", { integer: true }),
    guidance_scale: numberField("guidance", "Guidance"),
    strength: numberField("strength", "Strength"),
    width: numberField("width", "Width", { integer: true }),
    height: numberField("height", "Height", { integer: true }),
    lora: $("lora").value,
    lora_scale: numberField("lora-scale", "LoRA scale"),
  };
}

function addFields(form, fields) {
  for (const [k, v] of Object.entries(fields)) {
    if (v !== null && v !== undefined && v !== "") form.append(k, String(v));
  }
  return form;
}

// The LoRA id and its scale; no LoRA, no scale (a scale alone would mean nothing).
function loraFields(s) {
  return s.lora ? { lora: s.lora, lora_scale: s.lora_scale } : {};
}

function requireImage() {
  if (!state.file) throw new InputError("Choose an image first (file input or drag and drop).");
}

// ---------------------------------------------------------------- models and token

async function loadModels() {
  const models = await api("/v1/models");
  state.models = models;
  const select = $("lora");
  const chosen = select.value;
  select.replaceChildren(new Option("none", ""));
  for (const l of models.loras || []) {
    const id = typeof l === "string" ? l : l.id || l.name;
    select.append(new Option(id, id));
  }
  select.value = [...select.options].some((o) => o.value === chosen) ? chosen : "";
  const d = models.defaults || {};
  if (!state.defaultsApplied) {
    const fill = { threshold: d.threshold, prompt: d.prompt, "negative-prompt": d.negative_prompt, seed: d.seed,
      steps: d.steps, guidance: d.guidance_scale, strength: d.strength };
    for (const [id, v] of Object.entries(fill)) if (v !== undefined && v !== null) $(id).value = v;
    if (Array.isArray(d.queries) && !$("queries").value.trim()) $("queries").value = d.queries.join(", ");
    const g = d.generate || {};
    if (g.width) $("width").placeholder = g.width;
    if (g.height) $("height").placeholder = g.height;
    state.defaultsApplied = true;
  }
  const names = ["detect", "segment", "inpaint"].map((t) => (models[t] && models[t].name) || "?").join(" → ");
  return `Connected: ${names}; ${(models.loras || []).length} LoRA(s).`;
}

function onTokenChange() {
  const token = $("token").value.trim();
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  if (token) action("Loading models…", loadModels, { exclusive: false });
}

// ---------------------------------------------------------------- image and canvas

async function loadImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(`${file.name} is not an image (${file.type}).`, "error");
    return;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch (e) {
    setStatus(`Cannot decode ${file.name || "the image"}: ${e.message}`, "error");
    return;
  }
  if (state.beforeUrl) URL.revokeObjectURL(state.beforeUrl);
  Object.assign(state, { file, bitmap, beforeUrl: URL.createObjectURL(file), points: [], boxes: [],
    detections: [], masks: [] });
  const canvas = $("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  $("drop-hint").hidden = true;
  $("result").hidden = true;
  fitCanvas();
  draw();
  setStatus(`Loaded ${file.name || "image"} (${bitmap.width}×${bitmap.height}).`, "ok");
}

// Shows the whole image as large as the panel and 70% of the window allow (small images scale up too).
function fitCanvas() {
  const c = $("canvas");
  if (!state.bitmap) return;
  const k = Math.min(($("dropzone").clientWidth - 4) / c.width, (window.innerHeight * 0.7) / c.height);
  c.style.width = `${Math.max(1, Math.floor(c.width * k))}px`;
  c.style.height = `${Math.max(1, Math.floor(c.height * k))}px`;
}

// Image-pixel position of a pointer event on the canvas (the canvas is scaled by CSS).
function imagePos(e) {
  const canvas = $("canvas");
  const r = canvas.getBoundingClientRect();
  const x = ((e.clientX - r.left) * canvas.width) / r.width;
  const y = ((e.clientY - r.top) * canvas.height) / r.height;
  return [Math.round(Math.min(Math.max(x, 0), canvas.width - 1)), Math.round(Math.min(Math.max(y, 0), canvas.height - 1))];
}

function onPointerDown(e) {
  if (!state.bitmap || e.button !== 0) return;
  const [x, y] = imagePos(e);
  state.drag = { x, y, sx: e.clientX, sy: e.clientY, current: null };
  $("canvas").setPointerCapture(e.pointerId);
}

function onPointerMove(e) {
  const d = state.drag;
  if (!d) return;
  if (Math.hypot(e.clientX - d.sx, e.clientY - d.sy) >= DRAG_PX) {
    d.current = imagePos(e);
    draw();
  }
}

function onPointerUp(e) {
  const d = state.drag;
  if (!d) return;
  state.drag = null;
  if (Math.hypot(e.clientX - d.sx, e.clientY - d.sy) >= DRAG_PX) {
    const [x, y] = imagePos(e);
    state.boxes.push([Math.min(d.x, x), Math.min(d.y, y), Math.max(d.x, x), Math.max(d.y, y)]);
  } else {
    const negative = e.shiftKey || $("negative-mode").checked;
    state.points.push([d.x, d.y, negative ? 0 : 1]);
  }
  draw();
}

function draw() {
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.bitmap) return;
  ctx.drawImage(state.bitmap, 0, 0);
  for (const m of state.masks) ctx.drawImage(m, 0, 0);
  // Overlay sizes follow the displayed size, so marks look the same on small and huge images.
  const s = canvas.width / Math.max(1, canvas.getBoundingClientRect().width || canvas.width);
  ctx.lineWidth = 2 * s;
  ctx.font = `${Math.round(13 * s)}px sans-serif`;
  for (const det of state.detections) {
    const [x0, y0, x1, y1] = det.box;
    ctx.strokeStyle = "#ffd400";
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    const text = `${det.label ?? ""} ${det.score !== undefined ? det.score.toFixed(2) : ""}`.trim();
    ctx.fillStyle = "#ffd400";
    ctx.fillRect(x0, Math.max(0, y0 - 16 * s), ctx.measureText(text).width + 6 * s, 16 * s);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x0 + 3 * s, Math.max(12 * s, y0 - 4 * s));
  }
  ctx.setLineDash([6 * s, 4 * s]);
  ctx.strokeStyle = "#00e5ff";
  for (const [x0, y0, x1, y1] of state.boxes) ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  if (state.drag && state.drag.current) {
    const [x, y] = state.drag.current;
    ctx.strokeRect(state.drag.x, state.drag.y, x - state.drag.x, y - state.drag.y);
  }
  ctx.setLineDash([]);
  for (const [x, y, label] of state.points) {
    ctx.beginPath();
    ctx.arc(x, y, 6 * s, 0, 2 * Math.PI);
    ctx.fillStyle = label ? "#22c55e" : "#ef4444";
    ctx.fill();
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
  const n = state.points.length;
  const neg = state.points.filter((p) => !p[2]).length;
  $("prompt-count").textContent = `${n - neg} positive, ${neg} negative point(s), ${state.boxes.length} box(es)`;
}

function clearPrompts() {
  Object.assign(state, { points: [], boxes: [], detections: [], masks: [] });
  draw();
}

function loadPng(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the server sent a mask that is not a PNG"));
    img.src = `data:image/png;base64,${b64}`;
  });
}

// A 0/255 mask PNG -> a canvas of the image's size, the mask in a translucent colour, transparent elsewhere.
async function tintedMask(b64, color) {
  const img = await loadPng(b64);
  const c = document.createElement("canvas");
  c.width = state.bitmap.width;
  c.height = state.bitmap.height;
  const ctx = c.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(img, 0, 0, c.width, c.height);
  const data = ctx.getImageData(0, 0, c.width, c.height);
  const px = data.data;
  for (let i = 0; i < px.length; i += 4) {
    const on = px[i] > 127;
    px[i] = color[0];
    px[i + 1] = color[1];
    px[i + 2] = color[2];
    px[i + 3] = on ? 110 : 0;
  }
  ctx.putImageData(data, 0, 0);
  return c;
}

// ---------------------------------------------------------------- actions

function samPrompts(form) {
  if (state.points.length) form.append("points", JSON.stringify(state.points));
  if (state.boxes.length) form.append("boxes", JSON.stringify(state.boxes));
  return form;
}

async function detect() {
  requireImage();
  const s = settings();
  if (!s.queries.length) throw new InputError("Enter at least one query (comma-separated), e.g. \"a dog\".");
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image.png");
  addFields(form, { queries: s.queries.join(","), threshold: s.threshold });
  const out = await api("/v1/detect", form);
  state.detections = out.boxes || [];
  draw();
  return `Detect: ${state.detections.length} box(es) for ${s.queries.join(", ")}.`;
}

async function segment() {
  requireImage();
  // Without drawn prompts, the detected boxes are the prompts: Detect then Segment = the bulk pipeline.
  const userPrompts = state.points.length || state.boxes.length;
  if (!userPrompts && !state.detections.length) {
    throw new InputError("Click points or drag boxes on the image (or run Detect) before Segment.");
  }
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image.png");
  if (userPrompts) samPrompts(form);
  else form.append("boxes", JSON.stringify(state.detections.map((d) => d.box)));
  const out = await api("/v1/segment", form);
  const masks = out.masks || [];
  state.masks = await Promise.all(masks.map((m, i) => tintedMask(m.png_b64, MASK_COLORS[i % MASK_COLORS.length])));
  draw();
  const scores = masks.map((m) => (m.score !== undefined ? m.score.toFixed(2) : "?")).join(", ");
  return `Segment: ${masks.length} mask(s)${masks.length ? ` (scores ${scores})` : ""}.`;
}

function showResult(imageB64, lineage, withBefore) {
  $("result").hidden = false;
  $("result-img").src = `data:image/png;base64,${imageB64}`;
  $("before-img").hidden = !withBefore;
  $("compare-label").hidden = !withBefore;
  $("compare").classList.toggle("single", !withBefore);
  if (withBefore) $("before-img").src = state.beforeUrl;
  updateSlider();
  $("lineage").textContent = prettyJson(lineage ?? {});
}

async function runEdit() {
  requireImage();
  const s = settings();
  const userPrompts = state.points.length || state.boxes.length;
  if (!s.queries.length && !userPrompts) {
    throw new InputError("Enter a query or click points / drag boxes on the image to say what to edit.");
  }
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image.png");
  addFields(form, { queries: s.queries.join(","), prompt: s.prompt, negative_prompt: s.negative_prompt, seed: s.seed,
    steps: s.steps, guidance_scale: s.guidance_scale, strength: s.strength, threshold: s.threshold, ...loraFields(s),
    format: "json" });
  samPrompts(form);
  const out = await api("/v1/edit", form);
  if (!out.image_b64) throw new ApiError("/v1/edit: the answer has no image_b64");
  showResult(out.image_b64, out.lineage, true);
  state.detections = out.boxes || [];
  state.masks = out.mask_b64 ? [await tintedMask(out.mask_b64, MASK_COLORS[0])] : [];
  draw();
  if (out.status === "no_detection") {
    return `Nothing found for ${s.queries.join(", ") || "the default queries"}: the image is unchanged.`;
  }
  return `Edit done${state.detections.length ? ` (${state.detections.length} box(es))` : ""}.`;
}

async function generate() {
  const s = settings();
  const form = new FormData();
  addFields(form, { prompt: s.prompt, negative_prompt: s.negative_prompt, seed: s.seed, steps: s.steps,
    guidance_scale: s.guidance_scale, width: s.width, height: s.height, ...loraFields(s), format: "json" });
  const out = await api("/v1/generate", form);
  if (!out.image_b64) throw new ApiError("/v1/generate: the answer has no image_b64");
  showResult(out.image_b64, out.lineage, false);
  return "Generated.";
}

function updateSlider() {
  // The edited image lies on top of the original; the slider uncovers the original from the right.
  const v = Number($("compare-slider").value);
  $("result-img").style.clipPath = $("before-img").hidden ? "" : `inset(0 ${100 - v}% 0 0)`;
}

// ---------------------------------------------------------------- EditSpec YAML

// JSON strings are valid YAML double-quoted scalars, so quoting through JSON is always safe.
const q = (v) => JSON.stringify(String(v));
const num = (v) => (Number.isInteger(v) ? v.toFixed(1) : String(v)); // floats keep a decimal point

function specYaml() {
  const s = settings();
  if (!s.queries.length) throw new InputError("Enter at least one query: a bulk job finds its objects by text.");
  const d = (state.models && state.models.defaults) || {};
  const pick = (v, fallback) => (v === null ? fallback : v);
  const lines = [
    "# EditSpec from the promptpaint playground: promptpaint run spec.yaml",
    "input: photos/",
    "output: out/",
    "mode: edit",
    "detect:",
    `  queries: [${s.queries.map(q).join(", ")}]`,
    `  threshold: ${num(pick(s.threshold, d.threshold ?? 0.1))}`,
    "inpaint:",
    `  prompt: ${q(s.prompt)}`,
    `  negative_prompt: ${q(s.negative_prompt)}`,
    `  seed: ${pick(s.seed, d.seed ?? 0)}`,
    `  steps: ${pick(s.steps, d.steps ?? 30)}`,
    `  guidance_scale: ${num(pick(s.guidance_scale, d.guidance_scale ?? 7.5))}`,
    `  strength: ${num(pick(s.strength, d.strength ?? 1.0))}`,
  ];
  if (s.lora) {
    // A LoRA id names a folder of the server's LoRA store; the bulk job needs the store's path.
    const known = state.models && state.models.lora_store;
    const store = (known || "runs").replace(/\/+$/, "");
    lines.push("  lora:");
    if (!known) lines.push("    # the server did not say where its LoRA store is: check this path");
    lines.push(`    - {path: ${q(`${store}/${s.lora}`)}, scale: ${num(pick(s.lora_scale, 1.0))}}`);
  }
  return lines.join("\n") + "\n";
}

async function copySpec() {
  const yaml = specYaml();
  $("spec").hidden = false;
  $("spec-yaml").textContent = yaml;
  try {
    await navigator.clipboard.writeText(yaml);
    return "Spec copied to the clipboard (also shown below).";
  } catch (e) {
    return `Spec shown below; the clipboard refused it (${e.message}): select and copy it by hand.`;
  }
}

// ---------------------------------------------------------------- wiring

function init() {
  const canvas = $("canvas");
  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", onTokenChange);
  $("file").addEventListener("change", (e) => loadImage(e.target.files[0]));
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", () => {
    state.drag = null;
    draw();
  });
  $("clear-prompts").addEventListener("click", clearPrompts);
  $("compare-slider").addEventListener("input", updateSlider);
  window.addEventListener("resize", () => {
    fitCanvas();
    draw();
  });

  const zone = $("dropzone");
  // Dropping a file anywhere else must not navigate away from the page.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    loadImage(e.dataTransfer.files[0]);
  });

  $("detect").addEventListener("click", () => action("Detecting…", detect));
  $("segment").addEventListener("click", () => action("Segmenting…", segment));
  $("run-edit").addEventListener("click", () => action("Editing… (this runs the whole pipeline)", runEdit));
  $("generate").addEventListener("click", () => action("Generating…", generate));
  $("copy-spec").addEventListener("click", () => action("Writing the spec…", copySpec));

  draw();
  // Models need the token; without one, say so instead of sending a request bound to fail.
  if ($("token").value) action("Loading models…", loadModels, { exclusive: false });
  else setStatus("Enter the API token (any text when the server runs with --insecure).", "info");
}

init();
