// textgen playground: streams /v1/completions (server-sent events) into #output, on a session that can be
// continued and forked. No framework, no build step, nothing from another origin. The token lives in this
// page's memory only (never stored).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { session: null, controller: null, busy: false };

function headers() {
  const h = { "content-type": "application/json" };
  const token = $("token").value.trim();
  if (token) h.authorization = "Bearer " + token;
  return h;
}

function setStatus(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "muted";
}

function setBusy(busy) {
  state.busy = busy;
  $("generate").disabled = busy;
  $("continue").disabled = busy || !state.session;
  $("fork").disabled = busy || !state.session;
  $("stop").disabled = !busy;
}

async function api(method, path, body) {
  const r = await fetch(path, { method, headers: headers(), body: body === undefined ? undefined : JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error((data.error && data.error.message) || r.status + " " + r.statusText);
  return data;
}

function appendPrompt(text) {
  if (!text) return;
  const span = document.createElement("span");
  span.className = "prompt";
  span.textContent = text;
  $("output").appendChild(span);
}

function appendText(text) {
  const out = $("output");
  const last = out.lastChild;
  if (last && last.nodeType === Node.TEXT_NODE) last.appendData(text);
  else out.appendChild(document.createTextNode(text));
}

async function refreshSession() {
  if (!state.session) return;
  try {
    const info = await api("GET", "/v1/sessions/" + encodeURIComponent(state.session));
    $("session-tokens").textContent = info.token_count;
  } catch (e) { /* expired or deleted: shown on the next call */ }
}

// Reads a fetch response of server-sent events; calls onEvent with each JSON payload until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      if (!block.startsWith("data: ")) continue;
      const data = block.slice(6);
      if (data === "[DONE]") return;
      onEvent(JSON.parse(data));
    }
  }
}

async function run(prompt) {
  const body = {
    prompt, session_id: state.session, stream: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
    stream_options: { include_usage: true },
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  state.controller = new AbortController();
  const start = performance.now();
  let first = null, tokens = 0, chars = 0, finish = null;
  setStatus("generating…");
  const r = await fetch("/v1/completions", { method: "POST", headers: headers(), body: JSON.stringify(body),
                                             signal: state.controller.signal });
  if (!r.ok) {
    const data = await r.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || r.status + " " + r.statusText);
  }
  appendPrompt(prompt);
  await readEvents(r, (ev) => {
    if (ev.error) throw new Error(ev.error.message);
    if (ev.usage) { tokens = ev.usage.completion_tokens; }
    for (const c of ev.choices || []) {
      if (c.text) {
        if (first === null) { first = performance.now(); $("ttft").textContent = Math.round(first - start) + " ms"; }
        appendText(c.text);
        chars += c.text.length;
        tokens = Math.max(tokens, chars);
      }
      if (c.finish_reason) finish = c.finish_reason;
    }
    $("tokens").textContent = tokens;
    if (first !== null) {
      const seconds = (performance.now() - first) / 1000;
      if (seconds > 0) $("rate").textContent = (chars / seconds).toFixed(0);
    }
  });
  setStatus("done (" + (finish || "?") + ")");
}

async function action(fn) {
  setBusy(true);
  try {
    await fn();
  } catch (e) {
    if (e.name === "AbortError") setStatus("stopped: the session keeps the text written");
    else setStatus(e.message, true);
  } finally {
    state.controller = null;
    setBusy(false);
    await refreshSession();
  }
}

$("generate").addEventListener("click", () => action(async () => {
  const created = await api("POST", "/v1/sessions", {});
  state.session = created.session.session_id;
  $("session").textContent = state.session.slice(0, 8) + "…";
  $("output").textContent = "";
  await run($("prompt").value);
  $("prompt").value = "";
}));

$("continue").addEventListener("click", () => action(async () => {
  await run($("prompt").value);
  $("prompt").value = "";
}));

$("fork").addEventListener("click", () => action(async () => {
  const fork = await api("POST", "/v1/sessions/" + encodeURIComponent(state.session) + "/fork", {});
  state.session = fork.session_id;
  $("session").textContent = state.session.slice(0, 8) + "… (fork)";
  setStatus("forked: Continue goes on from the same text in a new session");
}));

$("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });

$("clear").addEventListener("click", () => {
  state.session = null;
  $("output").textContent = "";
  $("session").textContent = "none";
  $("session-tokens").textContent = "0";
  setBusy(false);
});

function showModel() {
  api("GET", "/v1/models").then((m) => { $("model").textContent = "model: " + m.data[0].id; })
    .catch(() => { $("model").textContent = "model: (enter the token to use the API)"; });
}

$("token").addEventListener("change", showModel);
showModel();
setBusy(false);
