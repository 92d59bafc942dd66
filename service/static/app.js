// The demo page's wiring: the image and the settings in, two segment calls out (refined and
// coarse, the same detections), the chosen one drawn with its instance list, timings and downloads.

import { ApiError, getModels, segment, setApiKey } from "./api.js";
import { Overlay, colourOf, hex } from "./overlay.js";

const $ = (selector) => document.querySelector(selector);
const form = $("#controls");
const result = $("#result");
const rows = $("#instances tbody");
const overlay = new Overlay($("#overlay"));

const state = {
  file: null,
  bitmap: null, // Promise of the decoded image (null where the browser cannot decode it)
  responses: null, // {refined, coarse} for the current file and settings
  view: "refined",
  highlight: -1,
  controller: null, // aborts the calls of a run that a newer one replaces
  models: [], // the cards of the models that have a version ready
  model: null, // the chosen model's name (null: the server's default, /v1/segment)
};

// ---------------------------------------------------------------- status and errors

function setStatus(text) {
  $("#status").textContent = text;
}

function showError(error) {
  $("#error-code").textContent = error.code || "error";
  $("#error-message").textContent = error.message;
  $("#error").hidden = false;
  if (error.status === 401) askForKey();
}

function hideError() {
  $("#error").hidden = true;
}

function askForKey() {
  $("#key-field").hidden = false;
  $("#api-key").focus();
}

// ---------------------------------------------------------------- the model and its classes

async function loadModel() {
  try {
    const models = (await getModels()).filter((card) => card.ready);
    if (!models.length) throw new ApiError(503, "not_ready", "no model is ready yet");
    state.models = models;
    renderModels(models);
    showModel();
    hideError();
  } catch (error) {
    if (error.status === 503) {
      // Still loading or warming up: the page was opened right after `make serve`.
      $("#model-info").textContent = `${error.message}; retrying…`;
      setTimeout(loadModel, 2000);
    } else {
      $("#model-info").textContent = "The model's card is unavailable.";
      showError(error);
    }
  }
}

/** The picker, shown when the server has more than one model; the default model first chosen. */
function renderModels(models) {
  const select = $("#model");
  const known = state.models.find((card) => card.name === state.model);
  if (!known) state.model = (models.find((card) => card.default) || models[0]).name;
  select.replaceChildren(
    ...models.map((card) => new Option(`${card.name} (version ${card.version})`, card.name, false, card.name === state.model)),
  );
  $("#model-field").hidden = models.length < 2;
}

function showModel() {
  const model = state.models.find((card) => card.name === state.model);
  $("#model-info").textContent =
    `${model.name} ${model.version} · ${model.backend} · ${model.precision} · ${model.device.join(", ")}`;
  renderClasses(model);
}

function renderClasses(model) {
  const fieldset = $("#classes");
  // Keep the user's choice across reloads of the same model's card; another model has other classes.
  if (fieldset.dataset.model === model.name) return;
  fieldset.dataset.model = model.name;
  fieldset.querySelectorAll("label").forEach((label) => label.remove());
  for (const { id, name } of model.classes) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.name = "class";
    box.value = String(id);
    box.checked = true;
    label.append(box, ` ${name}`);
    fieldset.append(label);
  }
}

// ---------------------------------------------------------------- settings

function showSliderValues() {
  for (const id of ["score-threshold", "mask-threshold"]) {
    $(`#${id}-value`).textContent = Number($(`#${id}`).value).toFixed(2);
  }
}

/** The query parameters of /v1/segment; ``classes`` only when some are left out. */
function params() {
  const boxes = [...form.querySelectorAll('input[name="class"]')];
  const chosen = boxes.filter((box) => box.checked).map((box) => box.value);
  return {
    score_threshold: $("#score-threshold").value,
    mask_threshold: $("#mask-threshold").value,
    max_detections: $("#max-detections").value,
    classes: chosen.length < boxes.length ? chosen.join(",") : null,
  };
}

// ---------------------------------------------------------------- running

function setImage(file) {
  if (!file) return;
  state.file = file;
  // The server decodes the same bytes; EXIF orientation is applied by both.
  state.bitmap = createImageBitmap(file).catch(() => null);
  run();
}

async function run() {
  if (!state.file) return;
  const query = params();
  if (query.classes === "") {
    showError({ code: "no_classes", message: "Pick at least one class." });
    return;
  }
  if (state.controller) state.controller.abort();
  const controller = new AbortController();
  state.controller = controller;
  state.responses = null; // a view switch now waits for this run's answers
  hideError();
  result.dataset.state = "loading";
  setStatus(`Segmenting ${state.file.name || "the pasted image"}…`);
  try {
    // Both views at once: the server batches them and runs the detector once.
    const [refined, coarse, bitmap] = await Promise.all([
      segment(state.file, { ...query, refine: true }, controller.signal, state.model),
      segment(state.file, { ...query, refine: false }, controller.signal, state.model),
      state.bitmap,
    ]);
    if (controller !== state.controller) return;
    state.responses = { refined, coarse };
    overlay.setImage(bitmap, refined.image.width, refined.image.height);
    $("#overlay").style.setProperty("--aspect", String(refined.image.width / refined.image.height));
    show();
    if (!bitmap) setStatus("This browser cannot display the image's format: masks are drawn on grey.");
  } catch (error) {
    if (error.name === "AbortError" || controller !== state.controller) return;
    state.responses = null;
    result.dataset.state = "error";
    setStatus("");
    rows.replaceChildren();
    $("#timing").replaceChildren();
    setDownloads(false);
    showError(error instanceof ApiError ? error : { code: "error", message: String(error.message || error) });
  }
}

/** Draws the chosen view of the current responses. */
function show() {
  const response = state.responses && state.responses[state.view];
  if (!response) return;
  state.highlight = -1;
  overlay.setInstances(response.instances);
  overlay.render();
  renderRows(response.instances);
  renderTiming(response.timing);
  const count = response.instances.length;
  setStatus(`${count} instance${count === 1 ? "" : "s"}, ${state.view} masks.`);
  $("#overlay").setAttribute("aria-label", `The image with ${count} ${state.view} instance masks`);
  setDownloads(true);
  result.dataset.view = state.view;
  result.dataset.state = "ready";
}

function renderRows(instances) {
  rows.replaceChildren(...instances.map((instance, i) => {
    const row = document.createElement("tr");
    row.tabIndex = 0;
    row.dataset.index = String(i);
    row.dataset.colour = hex(colourOf(i));
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = row.dataset.colour;
    const cells = [String(i + 1), instance.category_name, instance.score.toFixed(3), String(Math.round(instance.area))];
    for (const text of cells) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    row.firstChild.prepend(swatch);
    return row;
  }));
}

function renderTiming(timing) {
  const names = { queue_ms: "queue", inference_ms: "inference", postprocess_ms: "post-processing", total_ms: "server total" };
  $("#timing").replaceChildren(...Object.entries(names).map(([key, name]) => {
    const item = document.createElement("div");
    const term = document.createElement("dt");
    const value = document.createElement("dd");
    term.textContent = name;
    value.textContent = `${timing[key].toFixed(1)} ms`;
    value.dataset.key = key;
    item.append(term, value);
    return item;
  }));
}

// ---------------------------------------------------------------- highlighting

function highlight(index) {
  if (index === state.highlight || !state.responses) return;
  state.highlight = index;
  overlay.render(index);
  for (const row of rows.children) row.classList.toggle("active", Number(row.dataset.index) === index);
}

function canvasPixel(event) {
  const canvas = $("#overlay");
  const box = canvas.getBoundingClientRect();
  return [
    ((event.clientX - box.left) * canvas.width) / box.width,
    ((event.clientY - box.top) * canvas.height) / box.height,
  ];
}

// ---------------------------------------------------------------- downloads

function stem() {
  const name = (state.file && state.file.name) || "image";
  return `${name.replace(/\.[^.]*$/, "")}.${state.view}`;
}

function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function setDownloads(enabled) {
  $("#download-json").disabled = !enabled;
  $("#download-png").disabled = !enabled;
}

// ---------------------------------------------------------------- events

$("#file").addEventListener("change", (event) => setImage(event.target.files[0]));
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) document.body.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  document.body.classList.remove("dragging");
  setImage(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const item = [...event.clipboardData.items].find((entry) => entry.kind === "file");
  if (item) setImage(item.getAsFile());
});

form.addEventListener("submit", (event) => event.preventDefault());
form.addEventListener("input", showSliderValues);
form.addEventListener("change", (event) => {
  const target = event.target;
  if (target.name === "view") {
    state.view = target.value;
    show();
  } else if (target.id === "model") {
    state.model = target.value;
    showModel();
    run();
  } else if (target.id === "api-key") {
    setApiKey(target.value.trim());
    loadModel();
    run();
  } else if (target.id !== "file") {
    run();
  }
});

$("#overlay").addEventListener("mousemove", (event) => highlight(overlay.instanceAt(...canvasPixel(event))));
$("#overlay").addEventListener("mouseleave", () => highlight(-1));
for (const type of ["mouseover", "focusin"]) {
  rows.addEventListener(type, (event) => {
    const row = event.target.closest("tr");
    if (row) highlight(Number(row.dataset.index));
  });
}
for (const type of ["mouseleave", "focusout"]) rows.addEventListener(type, () => highlight(-1));

$("#download-json").addEventListener("click", () => {
  // The instances are COCO result records: pycocotools' COCO.loadRes takes this file as it is.
  const { instances } = state.responses[state.view];
  download(new Blob([JSON.stringify(instances)], { type: "application/json" }), `${stem()}.json`);
});
$("#download-png").addEventListener("click", () => {
  overlay.render(); // without the hover highlight
  $("#overlay").toBlob((blob) => {
    download(blob, `${stem()}.png`);
    overlay.render(state.highlight);
  }, "image/png");
});

showSliderValues();
loadModel();
