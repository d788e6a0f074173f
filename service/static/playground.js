// varserve playground: plain JavaScript, no build step, no third-party code.
// It reads the model cards (GET v1/models), sends POST v1/generate with stream: true and draws the
// server-sent `preview` events as they come, then the `result` (images and usage) or the `error`.
// Paths are relative, so the page also works behind a proxy that mounts the server under a prefix.
"use strict";

(() => {
  const KEY_STORAGE = "varserve.apiKey";
  const MODEL_STORAGE = "varserve.model";
  const SAMPLING = ["cfg_scale", "top_k", "top_p", "temperature"];
  const CUSTOM_CLASS = "__custom__";
  const LOADING_RETRY_MS = 2000;
  const FAMILIES = {
    var: { label: "VAR · next-scale", unit: "scale" },
    llamagen: { label: "LlamaGen · next-token", unit: "row" },
  };
  const USAGE = [
    ["latency_ms", "Latency", ms],
    ["queue_ms", "Queue", ms],
    ["inference_ms", "Inference", ms],
    ["forward_passes", "Forward passes", integer],
    ["kv_bytes", "KV cache, stored", bytes],
    ["kv_bytes_full", "KV cache, uncompressed", bytes],
    ["kv_bytes_working", "KV cache, working", bytes],
    ["batch_images", "Images in the batch", integer],
  ];

  // ===== KV-policy and speculative options =====
  // Extra request fields, each rendered only when the selected model's card carries the named
  // card field (VAR cards carry kv_policies and kv_budget, LlamaGen cards the speculative
  // options). A card value that is a list gives the choices of a select; a number or string gives
  // an input with that default; true gives a checkbox. Left empty, the field is not sent and the
  // server's default applies. A dotted param is a key of an object field ("speculative.window").
  const EXTRA_OPTIONS = [
    { card: "kv_policies", param: "kv_policy", label: "KV policy" },
    { card: "kv_budget", param: "kv_budget", label: "KV budget" },
    { card: "speculative_methods", param: "speculative.method", label: "Speculative decoding" },
    { card: "speculative_window", param: "speculative.window", label: "Window (tokens per pass, or auto)" },
    { card: "speculative_group", param: "speculative.group", label: "GSD group" },
    { card: "speculative_p_threshold", param: "speculative.p_threshold", label: "GSD p threshold" },
    { card: "speculative_distance", param: "speculative.distance", label: "GSD distance" },
  ];

  // What the page has done, for people and tests: timestamps are performance.now() milliseconds.
  const state = {
    status: "loading", // loading | auth | ready | running | done | error | stopped
    models: [],
    runs: 0,
    run: null, // the latest generation: {id, model, startedAt, firstPreviewAt, resultReceivedAt, resultShownAt, previews, step, total}
    lastError: null,
  };
  window.varservePlayground = state;
  Object.defineProperty(state, "sseParser", { value: () => sseParser() }); // for tests; not enumerable
  Object.defineProperty(state, "requestBody", { value: (card) => requestBody(card) }); // for tests

  const $ = (id) => document.getElementById(id);
  const el = {};
  let controller = null;
  let reloadTimer = null;

  // ---------------------------------------------------------------- formatting

  function ms(v) {
    return `${v >= 100 ? Math.round(v).toLocaleString("en") : v.toFixed(1)} ms`;
  }

  function integer(v) {
    return Math.round(v).toLocaleString("en");
  }

  function bytes(v) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    let x = v;
    while (x >= 1024 && i < units.length - 1) {
      x /= 1024;
      i += 1;
    }
    return `${i === 0 ? x : x.toFixed(x >= 100 ? 0 : 1)} ${units[i]}`;
  }

  function resolutionOf(card) {
    const m = /^(\d+)x(\d+)$/.exec(card.resolution || "");
    return m ? { width: Number(m[1]), height: Number(m[2]) } : null;
  }

  function unitOf(card) {
    return (FAMILIES[card.family] || { unit: "step" }).unit;
  }

  // ---------------------------------------------------------------- server-sent events

  // A parser for server-sent events (the WHATWG format), fed text as it arrives: events end at
  // a blank line; each line is "field: value", "data" lines join with "\n", lines starting with
  // ":" are comments (the server's pings). Lines end in \r\n, \n or \r; a \r at the very end of
  // a chunk waits for the next one, which may start with its \n.
  function sseParser() {
    let buffer = "";
    let name = "";
    let data = [];
    return function push(text, end = false) {
      buffer += text;
      const lines = buffer.split(/\r\n|\r(?!$)|\n/);
      buffer = end ? "" : lines.pop();
      const events = [];
      for (const raw of lines) {
        const line = raw.replace(/\r$/, "");
        if (line === "") {
          if (data.length) events.push({ event: name || "message", data: data.join("\n") });
          name = "";
          data = [];
          continue;
        }
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "event") name = value;
        else if (field === "data") data.push(value);
      }
      return events; // an event the stream ends in the middle of is dropped, as the standard says
    };
  }

  // The events of a fetch() body; each carries receivedAt, when its bytes were read.
  async function* readEvents(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    const push = sseParser();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        const receivedAt = performance.now();
        const text = done ? decoder.decode() : decoder.decode(value, { stream: true });
        for (const event of push(text, done)) yield { ...event, receivedAt };
        if (done) return;
      }
    } finally {
      reader.releaseLock();
    }
  }

  // ---------------------------------------------------------------- API calls

  function apiKey() {
    return localStorage.getItem(KEY_STORAGE) || "";
  }

  function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = apiKey();
    if (key) headers.set("Authorization", `Bearer ${key}`);
    return fetch(path, { ...options, headers });
  }

  // The error of a non-2xx answer: OpenAI's envelope when the server sent one.
  async function errorOf(response) {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return { code: response.status, ...body.error };
    } catch {
      // not JSON: fall through
    }
    return { code: response.status, message: text.trim() || response.statusText || "request failed" };
  }

  // ---------------------------------------------------------------- models

  async function loadModels() {
    clearTimeout(reloadTimer);
    let response;
    try {
      response = await api("v1/models");
    } catch (e) {
      setServerStatus("down", "the server does not answer");
      showError({ message: `Could not reach the server (${e.message}).`, source: "models" });
      reloadTimer = setTimeout(loadModels, LOADING_RETRY_MS * 2);
      return;
    }
    if (response.status === 401) {
      state.status = "auth";
      setServerStatus("auth", "an API key is needed");
      showKeyForm(true);
      const error = await errorOf(response);
      showError({ ...error, message: `This server needs an API key: enter it above. (${error.message})`, source: "models" });
      setProgress(null, "Waiting for the API key.");
      return;
    }
    if (!response.ok) {
      setServerStatus("down", `GET v1/models answered ${response.status}`);
      showError({ ...(await errorOf(response)), source: "models" });
      return;
    }
    const list = await response.json();
    state.models = list.data;
    if (state.lastError && state.lastError.source === "models") clearError();
    if (apiKey()) showKeyForm(true); // keep the key visible, so it can be changed
    renderModels();
    const loading = state.models.some((m) => !m.loaded);
    setServerStatus(loading ? "loading" : "ready", loading ? "models loading" : "ready");
    if (loading) reloadTimer = setTimeout(loadModels, LOADING_RETRY_MS);
    if (state.status === "loading" || state.status === "auth") state.status = "ready";
  }

  function renderModels() {
    const previous = el.model.value || localStorage.getItem(MODEL_STORAGE);
    el.model.replaceChildren(
      ...state.models.map((card) => {
        const option = new Option(`${card.id}${card.loaded ? "" : " (loading)"}`, card.id);
        return option;
      }),
    );
    if (!state.models.length) el.model.append(new Option("no models served", ""));
    if (state.models.some((m) => m.id === previous)) el.model.value = previous;
    el.model.disabled = !state.models.length;
    applyCard(currentCard(), previous !== el.model.value || !el.model.dataset.applied);
    el.model.dataset.applied = el.model.value;
  }

  function currentCard() {
    return state.models.find((m) => m.id === el.model.value) || null;
  }

  // Show the card's facts and fit the form to it; with resetValues, also its sampling defaults.
  function applyCard(card, resetValues) {
    el.generate.disabled = !card || state.status === "running";
    if (!card) {
      el.modelInfo.textContent = "";
      return;
    }
    const family = FAMILIES[card.family];
    const facts = [family ? family.label : card.family];
    if (!card.loaded) {
      facts.push("loading…");
    } else {
      facts.push(card.conditioning === "text" ? "text prompt" : `${card.num_classes} classes`);
      const res = resolutionOf(card);
      if (res) facts.push(`${res.width}×${res.height}`);
      if (card.steps) facts.push(`${card.steps} ${unitOf(card)}s`);
    }
    el.modelInfo.replaceChildren(...facts.map((f) => Object.assign(document.createElement("span"), { textContent: f })));

    el.promptGroup.hidden = card.conditioning !== "text";
    // guidance over a token interval is the next-token sampler's knob
    $("cfg-interval-group").hidden = card.family !== "llamagen";
    el.classGroup.hidden = card.conditioning !== "class";
    if (card.conditioning === "class") renderClasses(card, resetValues);
    if (resetValues) setDefaults(card);
    renderExtraOptions(card);
  }

  function renderClasses(card, reset) {
    const key = `${card.id}:${card.num_classes}`;
    if (el.classSelect.dataset.key === key && !reset) return;
    const names = Array.isArray(card.class_names) ? card.class_names : null; // not in the card yet
    const options = [];
    for (let i = 0; i < (card.num_classes || 0); i++) {
      options.push(new Option(names && names[i] ? `${i} · ${names[i]}` : `class ${i}`, String(i)));
    }
    options.push(new Option("by name or index…", CUSTOM_CLASS));
    el.classSelect.replaceChildren(...options);
    el.classSelect.dataset.key = key;
    el.className.hidden = true;
  }

  function setDefaults(card) {
    for (const param of SAMPLING) {
      const value = card.defaults[param];
      const range = $(`${param}-range`);
      if (param === "cfg_scale") range.max = String(Math.max(10, Math.ceil(value * 2)));
      if (param === "top_k") range.max = String(Math.max(4096, value));
      $(param).value = String(value);
      range.value = String(value);
      $(param).closest(".slider").dataset.default = String(value);
    }
  }

  function renderExtraOptions(card) {
    const controls = [];
    for (const option of EXTRA_OPTIONS) {
      const offered = card[option.card];
      if (offered === undefined || offered === null || offered === false) continue;
      const id = `extra-${option.param}`;
      const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: option.label });
      let input;
      if (Array.isArray(offered)) {
        input = document.createElement("select");
        input.append(new Option("server default", ""), ...offered.map((c) => new Option(String(c), String(c))));
      } else if (offered === true) {
        input = Object.assign(document.createElement("input"), { type: "checkbox" });
      } else {
        input = Object.assign(document.createElement("input"), {
          type: typeof offered === "number" ? "number" : "text",
          placeholder: String(offered),
        });
      }
      input.id = id;
      input.dataset.param = option.param;
      const row = document.createElement("div");
      row.className = "extra";
      row.append(label, input);
      controls.push(row);
    }
    el.extraBody.replaceChildren(...controls);
    el.extra.hidden = !controls.length;
  }

  // ---------------------------------------------------------------- the request

  // The request body as the form says, checked by the server, not here: a bad value comes back
  // as the server's error message, naming its field.
  function requestBody(card) {
    const body = { model: card.id, stream: true };
    const raw = {}; // integers JSON numbers cannot hold exactly, spliced into the text as written
    if (card.conditioning === "text") {
      body.prompt = el.prompt.value;
      const negative = $("negative_prompt").value;
      if (negative !== "") body.negative_prompt = negative;
    } else {
      const chosen = el.classSelect.value === CUSTOM_CLASS ? el.className.value.trim() : el.classSelect.value;
      body.class_label = /^\d+$/.test(chosen) && chosen.length < 16 ? Number(chosen) : chosen;
    }
    const n = el.n.value.trim();
    if (n !== "") body.n = numberOrText(n);
    const seed = el.seed.value.trim();
    if (seed !== "") {
      if (/^-?\d{16,}$/.test(seed)) raw.seed = seed;
      else body.seed = numberOrText(seed);
    }
    for (const param of SAMPLING) {
      const value = $(param).value.trim();
      if (value !== "") body[param] = numberOrText(value);
    }
    const interval = $("cfg_interval").value.trim();
    if (card.family === "llamagen" && interval !== "") body.cfg_interval = numberOrText(interval);
    for (const input of el.extraBody.querySelectorAll("[data-param]")) {
      let value;
      if (input.type === "checkbox") {
        if (input.checked) value = true;
      } else if (input.value.trim() !== "") {
        value = input.type === "number" ? Number(input.value) : numberOrText(input.value.trim());
      }
      if (value === undefined) continue;
      const [field, key] = input.dataset.param.split(".");
      if (key === undefined) body[field] = value;
      else body[field] = { ...(body[field] || {}), [key]: value };
    }
    let text = JSON.stringify(body);
    for (const [k, v] of Object.entries(raw)) text = `${text.slice(0, -1)},${JSON.stringify(k)}:${v}}`;
    return { text, n: typeof body.n === "number" && body.n >= 1 && body.n <= 64 ? Math.floor(body.n) : 1 };
  }

  function numberOrText(value) {
    const x = Number(value);
    return Number.isFinite(x) ? x : value;
  }

  async function generate(event) {
    event.preventDefault();
    const card = currentCard();
    if (!card || state.status === "running") return;
    clearError();
    const { text, n } = requestBody(card);
    const run = {
      id: ++state.runs,
      model: card.id,
      startedAt: performance.now(),
      firstPreviewAt: null,
      resultReceivedAt: null,
      resultShownAt: null,
      previews: 0,
      step: null,
      total: card.steps,
    };
    state.run = run;
    setRunning(true);
    setProgress(0, "Sending…");
    controller = new AbortController();
    let outcome = "error";
    let tiles = [];
    try {
      const response = await api("v1/generate", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: text,
        signal: controller.signal,
      });
      if (!response.ok) {
        if (response.status === 401) showKeyForm(true);
        showError(await errorOf(response));
      } else {
        // accepted: the images to come replace the last ones
        tiles = prepareGallery(card, n);
        setProgress(0, `Queued · waiting for the first ${unitOf(card)}…`);
        for await (const sse of readEvents(response.body)) {
          if (sse.event === "preview") {
            await showPreview(card, run, tiles, JSON.parse(sse.data));
          } else if (sse.event === "result") {
            run.resultReceivedAt = sse.receivedAt;
            await showResult(card, run, tiles, sse.data);
            outcome = "done";
          } else if (sse.event === "error") {
            showError(JSON.parse(sse.data).error);
          }
        }
        if (outcome !== "done" && !state.lastError) showError({ message: "The stream ended without a result." });
      }
    } catch (e) {
      if (e.name === "AbortError") {
        outcome = "stopped";
        setProgress(null, "Stopped.");
      } else {
        showError({ message: `The request failed: ${e.message}` });
      }
    } finally {
      controller = null;
      for (const tile of tiles) tile.frame.classList.remove("pending");
      if (outcome === "error") setProgress(null, "Failed.");
      setRunning(false, outcome);
    }
  }

  function setRunning(running, outcome) {
    state.status = running ? "running" : outcome;
    el.output.dataset.state = state.status;
    el.generate.disabled = running || !currentCard();
    el.generate.textContent = running ? "Generating…" : "Generate";
    el.stop.hidden = !running;
  }

  function prepareGallery(card, n) {
    const res = resolutionOf(card);
    el.gallery.replaceChildren();
    el.gallery.dataset.count = String(n);
    el.gallery.classList.toggle("pixelated", !!res && res.width <= 128);
    el.usage.hidden = true;
    const tiles = [];
    for (let i = 0; i < n; i++) {
      const figure = document.createElement("figure");
      figure.className = "tile";
      const frame = document.createElement("div");
      frame.className = "frame pending";
      if (res) frame.style.aspectRatio = `${res.width} / ${res.height}`;
      const img = document.createElement("img");
      img.alt = `image ${i + 1}`;
      img.decoding = "sync";
      frame.append(img);
      const caption = document.createElement("figcaption");
      const label = Object.assign(document.createElement("span"), { className: "seed", textContent: `image ${i + 1}` });
      const download = Object.assign(document.createElement("a"), { className: "button download", textContent: "Download" });
      download.hidden = true;
      caption.append(label, download);
      figure.append(frame, caption);
      el.gallery.append(figure);
      tiles.push({ figure, frame, img, label, download });
    }
    return tiles;
  }

  async function drawn(images) {
    await Promise.all(images.map((img) => img.decode().catch(() => {})));
  }

  async function showPreview(card, run, tiles, preview) {
    run.previews += 1;
    run.step = preview.step;
    run.total = preview.total;
    preview.images.forEach((b64, i) => {
      if (tiles[i]) tiles[i].img.src = `data:image/png;base64,${b64}`;
    });
    await drawn(tiles.map((t) => t.img));
    for (const tile of tiles) tile.frame.classList.remove("pending");
    if (run.firstPreviewAt === null) {
      run.firstPreviewAt = performance.now();
      el.output.dataset.firstPreviewAt = String(run.firstPreviewAt);
    }
    const done = preview.step + 1;
    setProgress(done / preview.total, `${capitalise(unitOf(card))} ${done} of ${preview.total}`);
  }

  async function showResult(card, run, tiles, raw) {
    const result = JSON.parse(raw);
    // seeds as the server wrote them (JSON numbers above 2^53 lose digits in JavaScript)
    const seeds = [...raw.matchAll(/"seed"\s*:\s*(\d+)/g)].map((m) => m[1]);
    result.data.forEach((item, i) => {
      const tile = tiles[i];
      if (!tile) return;
      const url = `data:image/png;base64,${item.b64_json}`;
      const seed = seeds[i] ?? String(item.seed);
      tile.img.src = url;
      tile.img.dataset.final = "true";
      tile.img.alt = `${result.model}, seed ${seed}`;
      tile.label.textContent = `seed ${seed}`;
      tile.download.href = url;
      tile.download.download = `${result.model}-seed${seed}.png`;
      tile.download.hidden = false;
    });
    await drawn(tiles.map((t) => t.img));
    run.resultShownAt = performance.now();
    el.output.dataset.resultShownAt = String(run.resultShownAt);
    renderUsage(result.usage);
    const seconds = ((run.resultShownAt - run.startedAt) / 1000).toFixed(2);
    const first = run.firstPreviewAt === null ? "" : ` · first after ${ms(run.firstPreviewAt - run.startedAt)}`;
    setProgress(1, `Done in ${seconds} s · ${run.previews} preview${run.previews === 1 ? "" : "s"}${first}`);
  }

  function renderUsage(usage) {
    const rows = [];
    for (const [field, label, format] of USAGE) {
      if (usage[field] !== undefined) rows.push(usageRow(field, label, format(usage[field]), usage[field]));
    }
    el.usageList.replaceChildren(...rows);
    el.usage.hidden = false;
  }

  function usageRow(field, label, text, value) {
    const dt = Object.assign(document.createElement("dt"), { textContent: label });
    const dd = Object.assign(document.createElement("dd"), { textContent: text, title: `${field} = ${value}` });
    dd.dataset.field = field;
    dd.dataset.value = String(value);
    const pair = document.createElement("div");
    pair.append(dt, dd);
    return pair;
  }

  function capitalise(s) {
    return s.charAt(0).toUpperCase() + s.slice(1);
  }

  function setProgress(fraction, label) {
    if (fraction !== null) el.progressBar.style.width = `${Math.round(fraction * 100)}%`;
    el.progressLabel.textContent = label;
  }

  // ---------------------------------------------------------------- errors, key, status

  function showError(error) {
    state.lastError = error;
    const head = [error.code ? `Error ${error.code}` : "Error", error.type].filter(Boolean).join(" · ");
    el.errorTitle.textContent = head;
    el.errorMessage.textContent = error.message;
    el.error.dataset.param = error.param || "";
    el.error.hidden = false;
    markInvalid(error.param);
  }

  function clearError() {
    state.lastError = null;
    el.error.hidden = true;
    el.errorMessage.textContent = "";
    markInvalid(null);
  }

  function markInvalid(param) {
    for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
    if (!param) return;
    const target =
      param === "class_label" || (param === "prompt" && !el.classGroup.hidden)
        ? el.classSelect.value === CUSTOM_CLASS
          ? el.className
          : el.classSelect
        : $(param) || document.querySelector(`[data-param="${CSS.escape(param)}"]`);
    if (target) target.setAttribute("aria-invalid", "true");
  }

  function showKeyForm(show) {
    el.keyForm.hidden = !show;
    if (show && !el.apiKey.value) el.apiKey.value = apiKey();
  }

  function setServerStatus(kind, text) {
    el.serverStatus.className = `status-dot ${kind}`;
    el.serverStatus.title = `server: ${text}`;
    el.serverStatus.textContent = text;
  }

  // ---------------------------------------------------------------- wiring

  function wire() {
    Object.assign(el, {
      model: $("model"),
      modelInfo: $("model-info"),
      promptGroup: $("prompt-group"),
      prompt: $("prompt"),
      classGroup: $("class-group"),
      classSelect: $("class-select"),
      className: $("class-name"),
      seed: $("seed"),
      n: $("n"),
      extra: $("extra-options"),
      extraBody: $("extra-options-body"),
      generate: $("generate"),
      stop: $("stop"),
      output: $("output"),
      error: $("error"),
      errorTitle: $("error-title"),
      errorMessage: $("error-message"),
      progressBar: $("progress-bar"),
      progressLabel: $("progress-label"),
      gallery: $("gallery"),
      usage: $("usage"),
      usageList: $("usage-list"),
      keyForm: $("key-form"),
      apiKey: $("api-key"),
      serverStatus: $("server-status"),
    });

    $("controls").addEventListener("submit", generate);
    el.stop.addEventListener("click", () => controller && controller.abort());
    el.model.addEventListener("change", () => {
      localStorage.setItem(MODEL_STORAGE, el.model.value);
      el.model.dataset.applied = el.model.value;
      applyCard(currentCard(), true);
    });
    el.classSelect.addEventListener("change", () => {
      el.className.hidden = el.classSelect.value !== CUSTOM_CLASS;
      if (!el.className.hidden) el.className.focus();
    });
    el.prompt.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("controls").requestSubmit();
    });
    $("seed-dice").addEventListener("click", () => {
      el.seed.value = String(Math.floor(Math.random() * 2 ** 31));
    });
    $("reset-defaults").addEventListener("click", () => {
      const card = currentCard();
      if (card) setDefaults(card);
    });
    for (const param of SAMPLING) {
      const number = $(param);
      const range = $(`${param}-range`);
      range.addEventListener("input", () => {
        number.value = range.value;
        number.removeAttribute("aria-invalid");
      });
      number.addEventListener("input", () => {
        if (number.value !== "") range.value = number.value;
      });
    }
    document.addEventListener("input", (e) => e.target.removeAttribute && e.target.removeAttribute("aria-invalid"));
    el.keyForm.addEventListener("submit", (e) => {
      e.preventDefault();
      const key = el.apiKey.value.trim();
      if (key) localStorage.setItem(KEY_STORAGE, key);
      else localStorage.removeItem(KEY_STORAGE);
      clearError();
      loadModels();
    });
    $("forget-key").addEventListener("click", () => {
      localStorage.removeItem(KEY_STORAGE);
      el.apiKey.value = "";
      loadModels();
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire();
    loadModels();
  });
})();
