// lcmkit page: posts to the A1111 routes (they return infotexts and accept force_task_id) and polls
// /sdapi/v1/progress?id_task=... for live steps. Plain JS, no build step, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const gallery = []; // {src, info, params}
let initImage = null; // data: URL of the uploaded image
let polling = null;

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
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

function startPolling(id) {
  const bar = $("progress");
  bar.hidden = false;
  bar.value = 0;
  let busy = false;
  polling = setInterval(async () => {
    if (busy) return;
    busy = true;
    try {
      const r = await fetch("/sdapi/v1/progress?id_task=" + encodeURIComponent(id), { headers: apiHeaders() });
      if (!r.ok) return;
      const p = await r.json();
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

function showResult(item) {
  $("result").hidden = false;
  $("result-image").src = item.src;
  $("result-info").textContent = item.info;
  $("result-download").href = item.src;
  $("result-download").download = `lcmkit-${item.params.seed}.png`;
}

function addToGallery(item) {
  gallery.unshift(item);
  $("gallery-empty").hidden = true;
  const li = document.createElement("li");
  const img = document.createElement("img");
  img.src = item.src;
  img.alt = item.params.prompt;
  const p = document.createElement("div");
  p.className = "params";
  p.textContent = `${item.params.size} · ${item.params.steps} steps · seed ${item.params.seed}`;
  li.title = item.info;
  li.append(img, p);
  li.addEventListener("click", () => { showResult(item); restoreParams(item.params); });
  $("gallery").prepend(li);
  while ($("gallery").children.length > 24) $("gallery").lastChild.remove();
}

function restoreParams(p) {
  $("prompt").value = p.prompt;
  $("negative").value = p.negative_prompt;
  $("steps").value = p.steps;
  $("guidance").value = p.cfg_scale;
  $("seed").value = p.seed;
}

async function generate(event) {
  event.preventDefault();
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
  $("generate").disabled = true;
  setStatus("sending…");
  startPolling(body.force_task_id);
  try {
    const r = await fetch(url, { method: "POST", headers: apiHeaders(), body: JSON.stringify(body) });
    const data = await r.json().catch(() => null);
    if (!r.ok) { setStatus(errorText(data, r.status), true); return; }
    const info = JSON.parse(data.info);
    const items = data.images.map((b64, i) => ({
      src: "data:image/png;base64," + b64,
      info: info.infotexts[i],
      params: {
        prompt, negative_prompt: body.negative_prompt, steps: info.steps, cfg_scale: info.cfg_scale,
        seed: info.all_seeds[i], size: `${info.width}×${info.height}`,
      },
    }));
    items.slice().reverse().forEach(addToGallery);
    showResult(items[0]);
    setStatus(`done: ${items.length} image${items.length > 1 ? "s" : ""}, seed ${info.seed}`);
  } catch (e) {
    setStatus("request failed: " + e.message, true);
  } finally {
    stopPolling();
    $("generate").disabled = false;
  }
}

function onInitChosen() {
  const file = $("init").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    initImage = reader.result; // a data: URL; the server accepts the prefix
    $("init-preview").src = initImage;
    $("init-options").hidden = false;
  };
  reader.readAsDataURL(file);
}

function clearInit() {
  initImage = null;
  $("init").value = "";
  $("init-options").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("apikey").value = localStorage.getItem("lcmkit-api-key") || "";
  $("apikey").addEventListener("change", () => localStorage.setItem("lcmkit-api-key", $("apikey").value.trim()));
  $("strength").addEventListener("input", () => { $("strength-value").textContent = $("strength").value; });
  $("init").addEventListener("change", onInitChosen);
  $("init-clear").addEventListener("click", clearInit);
  $("form").addEventListener("submit", generate);
  loadHealth();
});
