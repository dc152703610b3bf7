// lcmkit page: posts to the A1111 routes (they return infotexts and accept force_task_id), polls
// /sdapi/v1/progress?id_task=... for live steps and cancels with /sdapi/v1/interrupt?id_task=... .
// The gallery is kept in this browser's IndexedDB (the last GALLERY_MAX images with their parameters).
// Plain JS, no build step, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const GALLERY_MAX = 24; // images kept in the gallery (and in the browser's storage)
const DB_NAME = "lcmkit";
const DB_STORE = "gallery";

let gallery = []; // newest first: {id (storage key, absent if not stored), src (data: URL), info, params}
let shown = null; // the item in the result panel
let initImage = null; // data: URL of the img2img input
let controlImage = null; // data: URL of the ControlNet input (shown only when the server loaded ControlNets)
let current = null; // the job in flight: {id, cancelled, abort (AbortController)}
let polling = null;
let galleryReady = null; // resolves once the stored gallery is loaded

// ---------------------------------------------------------------------------------------------------------------
// Talking to the server

function apiHeaders(json = true) {
  const headers = json ? { "Content-Type": "application/json" } : {};
  const key = $("apikey").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  return headers;
}

function setStatus(text, isError = false) {
  $("status-text").textContent = text;
  $("status").classList.toggle("error", isError);
}

function intOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : parseInt(v, 10);
}

async function loadHealth() {
  try {
    const r = await fetch("/health");
    const h = await r.json();
    $("model").textContent = `${h.model} · ${h.status}`;
    const lim = h.limits || {};
    if (lim.max_steps) $("steps").max = lim.max_steps;
    if (lim.max_width) $("width").max = lim.max_width;
    if (lim.max_height) $("height").max = lim.max_height;
    if (lim.min_size) { $("width").min = lim.min_size; $("height").min = lim.min_size; }
    if (lim.max_batch) $("count").max = lim.max_batch;
    if (h.auth) {
      $("key-box").open = !$("apikey").value;
      $("key-box").querySelector("summary").textContent = "API key (required)";
    }
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

function taskId() {
  // crypto.randomUUID needs a secure context; this page is often served over plain http on a LAN
  return "task(" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10) + ")";
}

function startPolling(job) {
  const bar = $("progress");
  bar.hidden = false;
  bar.value = 0;
  let busy = false;
  polling = setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      const r = await fetch("/sdapi/v1/progress?id_task=" + encodeURIComponent(job.id), { headers: apiHeaders(false) });
      if (!r.ok || job.cancelled) return;
      const p = await r.json();
      if (job.cancelled) return; // "cancelling…" stays until the request answers
      if (p.queued) {
        setStatus(`queued: position ${p.queue_position}`);
      } else if (p.active) {
        bar.value = p.progress;
        setStatus(`step ${p.state.sampling_step} / ${p.state.sampling_steps}`);
      }
    } catch (e) {
      /* a missed poll is harmless */
    } finally {
      busy = false;
    }
  }, 250);
}

function stopPolling() {
  clearInterval(polling);
  polling = null;
  $("progress").hidden = true;
}

function errorText(body, status) {
  const d = body && (body.detail ?? (body.error && body.error.message));
  if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
  if (status === 401) return (d || "unauthorized") + " (set the API key below)";
  return d || `HTTP ${status}`;
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

async function generate(event) {
  event.preventDefault();
  if (current) return;
  const prompt = $("prompt").value.trim();
  if (!prompt) { setStatus("enter a prompt", true); return; }
  const body = {
    prompt,
    negative_prompt: $("negative").value.trim(),
    steps: intOrNull("steps") ?? 4,
    cfg_scale: parseFloat($("guidance").value || "8.5"),
    seed: intOrNull("seed") ?? -1,
    width: intOrNull("width"),
    height: intOrNull("height"),
    batch_size: intOrNull("count") ?? 1,
    force_task_id: taskId(),
  };
  let url = "/sdapi/v1/txt2img";
  if (initImage) {
    url = "/sdapi/v1/img2img";
    body.init_images = [initImage];
    body.denoising_strength = parseFloat($("strength").value);
  }
  if (controlImage && $("control-model").value) {
    const module = $("control-module").value;
    body.alwayson_scripts = { controlnet: { args: [{
      enabled: true, image: controlImage, module, model: $("control-model").value,
      weight: parseFloat($("control-weight").value), resize_mode: "Crop and Resize", control_mode: "Balanced",
    }] } };
  }
  const job = { id: body.force_task_id, cancelled: false, abort: new AbortController() };
  current = job;
  $("generate").disabled = true;
  $("cancel").hidden = false;
  $("cancel").disabled = false;
  setStatus("sending…");
  startPolling(job);
  try {
    const r = await fetch(url, {
      method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal: job.abort.signal,
    });
    const data = await r.json().catch(() => null);
    if (!r.ok) {
      if (job.cancelled && r.status === 409) setStatus("cancelled");
      else setStatus(errorText(data, r.status), true);
      return;
    }
    const info = JSON.parse(data.info);
    const items = data.images.map((b64, i) => ({
      src: "data:image/png;base64," + b64,
      info: info.infotexts[i],
      params: {
        prompt, negative_prompt: body.negative_prompt, steps: info.steps, cfg_scale: info.cfg_scale,
        seed: info.all_seeds[i], size: `${info.width}×${info.height}`,
      },
    }));
    await addToGallery(items);
    showResult(items[0], true);
    if (job.cancelled) setStatus(`cancelled: ${plural(items.length, "image")} finished before the cancel`);
    else setStatus(`done: ${plural(items.length, "image")}, seed ${info.seed}`);
  } catch (e) {
    if (job.cancelled && e.name === "AbortError") setStatus("cancelled");
    else setStatus("request failed: " + e.message, true);
  } finally {
    stopPolling();
    current = null;
    $("cancel").hidden = true;
    $("generate").disabled = false;
  }
}

async function cancelJob() {
  const job = current;
  if (!job || job.cancelled) return;
  job.cancelled = true;
  $("cancel").disabled = true;
  setStatus("cancelling…");
  try {
    const url = "/sdapi/v1/interrupt?id_task=" + encodeURIComponent(job.id);
    const r = await fetch(url, { method: "POST", headers: apiHeaders(false) });
    const data = await r.json().catch(() => null);
    if (r.ok && data && data.state === "finished") {
      job.cancelled = false; // too late: it finished, and its images are on their way
    } else if (!r.ok) {
      // 404: the server has not queued the job yet (its request is still uploading). Closing the request drops the
      // job there all the same (the server drops the work of a client that went away).
      job.abort.abort();
    }
  } catch (e) {
    job.abort.abort(); // the server is unreachable: at least stop waiting for it
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Result, gallery and img2img input

function showResult(item, reveal = false) {
  shown = item;
  $("result").hidden = false;
  $("result-image").src = item.src;
  $("result-info").textContent = item.info;
  $("result-download").href = item.src;
  $("result-download").download = `lcmkit-${item.params.seed}.png`;
  updateReuse();
  if (reveal) revealResult();
}

async function revealResult() {
  // On a phone the result sits below the form: bring it into view once its image has a height.
  const img = $("result-image");
  try { await img.decode(); } catch (e) { /* shown as a broken image; scroll all the same */ }
  const box = img.getBoundingClientRect();
  if (box.top >= 0 && box.bottom <= window.innerHeight) return;
  const smooth = !window.matchMedia("(prefers-reduced-motion: reduce)").matches;
  $("result").scrollIntoView({ behavior: smooth ? "smooth" : "auto", block: "start" });
}

function updateReuse() {
  const item = shown || gallery[0];
  const button = $("seed-reuse");
  button.disabled = !item;
  button.title = item ? `use the seed of the last image: ${item.params.seed}` : "no image yet";
}

function galleryElement(item) {
  const li = document.createElement("li");
  const img = document.createElement("img");
  img.src = item.src;
  img.alt = item.params.prompt;
  img.loading = "lazy";
  const seed = document.createElement("div");
  seed.className = "params seed";
  seed.textContent = `seed ${item.params.seed}`;
  const more = document.createElement("div");
  more.className = "params";
  more.textContent = `${item.params.size} · ${item.params.steps} steps`;
  const send = document.createElement("button");
  send.type = "button";
  send.className = "secondary to-img2img";
  send.textContent = "img2img";
  send.title = "send this image to image-to-image";
  send.addEventListener("click", (e) => { e.stopPropagation(); useAsInit(item.src); });
  li.title = item.info;
  li.tabIndex = 0;
  li.append(img, seed, more, send);
  const open = () => { showResult(item, true); restoreParams(item.params); };
  li.addEventListener("click", open);
  li.addEventListener("keydown", (e) => { if (e.key === "Enter" && e.target === li) open(); });
  return li;
}

function renderGallery() {
  $("gallery").replaceChildren(...gallery.map(galleryElement));
  $("gallery-clear").hidden = gallery.length === 0;
  updateReuse();
}

async function addToGallery(items) {
  // items in the server's order; the first ends up on top
  await galleryReady;
  let unsaved = 0;
  for (const item of items.slice().reverse()) {
    try {
      item.id = await galleryStore.add(item);
    } catch (e) {
      unsaved += 1;
    }
  }
  gallery = items.concat(gallery).slice(0, GALLERY_MAX);
  renderGallery();
  galleryStore.keepNewest(GALLERY_MAX).catch(() => {});
  if (unsaved && galleryStore.db) {
    $("gallery-note").textContent = `The browser's storage is full: ${plural(unsaved, "new image")} will not be ` +
      "kept after a reload (download the ones you want, or clear the gallery).";
  } else if (galleryStore.trimmed) {
    $("gallery-note").textContent = "The browser's storage was full: older images were removed from it to make " +
      "room; the newest are kept.";
  }
}

async function clearGallery() {
  if (!window.confirm(`Remove all ${plural(gallery.length, "image")} from the gallery in this browser?`)) return;
  try {
    await galleryStore.clear();
  } catch (e) {
    setStatus("could not clear the stored gallery: " + e.message, true);
    return;
  }
  gallery = [];
  renderGallery();
}

function restoreParams(p) {
  $("prompt").value = p.prompt;
  $("negative").value = p.negative_prompt;
  $("steps").value = p.steps;
  $("guidance").value = p.cfg_scale;
  $("seed").value = p.seed;
}

function setInit(src) {
  initImage = src; // a data: URL; the server accepts the prefix
  $("init-preview").src = src;
  $("init-options").hidden = false;
}

function useAsInit(src) {
  setInit(src);
  $("init").value = ""; // the preview, not a file, is the input now
  $("img2img").scrollIntoView({ block: "nearest" });
  setStatus("image sent to img2img: set the strength and generate");
}

function onInitChosen() {
  const file = $("init").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => setInit(reader.result);
  reader.readAsDataURL(file);
}

function clearInit() {
  initImage = null;
  $("init").value = "";
  $("init-preview").removeAttribute("src");
  $("init-options").hidden = true;
}

async function loadControlNets() {
  // the ControlNets this server loaded (lcmkit serve --controlnet KIND=PATH); the control input shows only with some
  try {
    const r = await fetch("/controlnet/model_list", { headers: apiHeaders(false) });
    if (!r.ok) return;
    const models = (await r.json()).model_list || [];
    const select = $("control-model");
    select.replaceChildren(...models.map((name) => {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      return option;
    }));
    if (models.some((m) => m.includes("canny"))) $("control-module").value = "canny";
    $("control").hidden = models.length === 0;
  } catch (e) {
    $("control").hidden = true;
  }
}

function onControlChosen() {
  const file = $("control-file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    controlImage = reader.result;
    $("control-preview").src = controlImage;
    $("control-options").hidden = false;
  };
  reader.readAsDataURL(file);
}

function clearControl() {
  controlImage = null;
  $("control-file").value = "";
  $("control-preview").removeAttribute("src");
  $("control-options").hidden = true;
}

// ---------------------------------------------------------------------------------------------------------------
// Browser storage: IndexedDB holds PNGs of several MB where localStorage (about 5 MB in all) would not

function idbRequest(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function idbDone(tx) {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = tx.onabort = () => reject(tx.error || new Error("storage transaction aborted"));
  });
}

const galleryStore = {
  db: null, // null: no storage (blocked, private mode): the gallery lasts for this page only
  trimmed: false, // older images were dropped to make room

  async open() {
    if (!window.indexedDB) throw new Error("this browser has no IndexedDB");
    const req = indexedDB.open(DB_NAME, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(DB_STORE, { keyPath: "id", autoIncrement: true });
    this.db = await idbRequest(req);
  },

  async all() {
    if (!this.db) return [];
    const items = await idbRequest(this.db.transaction(DB_STORE).objectStore(DB_STORE).getAll());
    return items.reverse(); // keys grow with time: newest first
  },

  async add(item) {
    if (!this.db) throw new Error("no storage");
    const record = { src: item.src, info: item.info, params: item.params, created: Date.now() };
    try {
      return await this.put(record);
    } catch (e) {
      if (e.name !== "QuotaExceededError") throw e;
      await this.keepNewest(Math.floor(GALLERY_MAX / 2)); // make room once, then give up
      this.trimmed = true;
      return await this.put(record);
    }
  },

  async put(record) {
    const tx = this.db.transaction(DB_STORE, "readwrite");
    const [key] = await Promise.all([idbRequest(tx.objectStore(DB_STORE).add(record)), idbDone(tx)]);
    return key;
  },

  async keepNewest(n) {
    if (!this.db) return;
    const tx = this.db.transaction(DB_STORE, "readwrite");
    const store = tx.objectStore(DB_STORE);
    const keys = await idbRequest(store.getAllKeys());
    for (const key of keys.slice(0, Math.max(0, keys.length - n))) store.delete(key);
    await idbDone(tx);
  },

  async clear() {
    if (!this.db) return;
    const tx = this.db.transaction(DB_STORE, "readwrite");
    tx.objectStore(DB_STORE).clear();
    await idbDone(tx);
  },
};

async function loadGallery() {
  try {
    await galleryStore.open();
    gallery = (await galleryStore.all()).slice(0, GALLERY_MAX);
    $("gallery-note").textContent = `Images you generate appear here; the last ${GALLERY_MAX} are kept in this browser.`;
  } catch (e) {
    galleryStore.db = null;
    $("gallery-note").textContent = "Images you generate appear here. This browser gives the page no storage " +
      `(${e.message || e.name}), so they are gone after a reload: download the ones you want.`;
  }
  renderGallery();
}

// ---------------------------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("apikey").value = localStorage.getItem("lcmkit-api-key") || "";
  $("apikey").addEventListener("change", () => localStorage.setItem("lcmkit-api-key", $("apikey").value.trim()));
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  $("init").addEventListener("change", onInitChosen);
  $("init-clear").addEventListener("click", clearInit);
  $("control-file").addEventListener("change", onControlChosen);
  $("control-clear").addEventListener("click", clearControl);
  $("control-weight").addEventListener("input", () => { $("control-weight-value").textContent = $("control-weight").value; });
  $("apikey").addEventListener("change", loadControlNets);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => {
    const item = shown || gallery[0];
    if (item) $("seed").value = item.params.seed;
  });
  $("result-to-img2img").addEventListener("click", () => { if (shown) useAsInit(shown.src); });
  $("gallery-clear").addEventListener("click", clearGallery);
  $("cancel").addEventListener("click", cancelJob);
  $("form").addEventListener("submit", generate);
  loadHealth();
  loadControlNets();
  galleryReady = loadGallery();
});
