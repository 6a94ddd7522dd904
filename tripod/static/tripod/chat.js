// AI Tripod chat page: a conversation kept in the page and sent whole on each turn, streamed back over a
// WebSocket (/ws/chat/, docs/websocket.md) or Server-Sent Events (POST /v1/streams, then an EventSource
// that resumes by itself after a dropped connection).
//
// State a test or a stylesheet may read lives in DOM attributes, not in globals: each assistant message
// has data-state (waiting | streaming | stopping | done | stopped | error), data-raw (its text as
// received), data-tokens, data-tps, data-ttft-ms, data-finish-reason and data-reconnects; #app has
// data-models (loading | ready | auth | error) and data-busy.
//
// The conversation is kept in localStorage (one entry per page path, capped) so a reload keeps it; the API key
// is kept in sessionStorage only (this tab, until it closes), never in localStorage.

import { renderMarkdown } from "./markdown.js";

const KEY_STORAGE = "tripod.apiKey";
const SETTINGS_STORAGE = "tripod.settings";
const CONVERSATION_STORAGE = `tripod.conversation:${location.pathname}`;
// What a reload keeps: the latest messages, at most this many and this many characters in all.
const KEEP_MESSAGES = 200;
const KEEP_CHARS = 200_000;
const STOP_GRACE_MS = 5000;

const $ = (selector) => document.querySelector(selector);
const app = $("#app");
const conversation = $("#conversation");
const composer = $("#composer");
const prompt = $("#prompt");
const sendButton = $("#send");
const stopButton = $("#stop");
const modelSelect = $("#model");
const temperature = $("#temperature");
const temperatureValue = $("#temperature-value");
const maxTokens = $("#max-tokens");
const systemPrompt = $("#system-prompt");
const seed = $("#seed");
const ignoreEos = $("#ignore-eos");

/** The conversation so far, as the API takes it: only turns that ended (done or stopped). */
const history = [];
/** The turn now streaming: { view, stop() }, or null. */
let current = null;
let turnCounter = 0;
/** Bumped by "New chat", so that a reply still ending then is not added to the new conversation. */
let epoch = 0;
const emptyState = $("#empty").cloneNode(true);

// ---------------------------------------------------------------------------------------------------
// API key

// Earlier versions kept the key in localStorage, where it outlived the tab: move it to this tab's session.
if (localStorage.getItem(KEY_STORAGE)) {
  sessionStorage.setItem(KEY_STORAGE, localStorage.getItem(KEY_STORAGE));
  localStorage.removeItem(KEY_STORAGE);
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showAuth(message) {
  $("#auth").hidden = false;
  if (message) $("#auth-message").textContent = message;
  $("#api-key").focus();
}

function refreshKeyStatus() {
  const key = apiKey();
  const hint = key.length >= 12 ? ` ending in …${key.slice(-4)}` : "";
  $("#key-status").textContent = key ? `Using a key${hint}.` : "None entered.";
  $("#api-key-forget").hidden = !key;
  $("#api-key-change").textContent = key ? "Change key" : "Enter a key";
}

function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  socket.reset(); // the key travels in the WebSocket handshake
  refreshKeyStatus();
  loadModels();
}

$("#auth-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#api-key").value.trim();
  if (!key) return;
  $("#api-key").value = "";
  setKey(key);
});
$("#api-key-change").addEventListener("click", () => {
  closeSettings();
  showAuth("Enter a key. It is kept in this tab only, until it closes.");
});
$("#api-key-forget").addEventListener("click", () => setKey(""));

// ---------------------------------------------------------------------------------------------------
// Models

async function errorOf(response) {
  // The API answers OpenAI-shaped errors; anything else (a proxy's HTML page) becomes a plain message.
  try {
    const body = await response.json();
    if (body && body.error) return body.error;
  } catch {
    /* not JSON */
  }
  return { message: `The server answered ${response.status} ${response.statusText}.`, code: null };
}

async function loadModels() {
  app.dataset.models = "loading";
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
  } catch {
    app.dataset.models = "error";
    setModelOptions([], "Server unreachable");
    return;
  }
  if (response.status === 401) {
    const error = await errorOf(response);
    app.dataset.models = "auth";
    setModelOptions([], "API key needed");
    showAuth(apiKey() ? `That key was refused: ${error.message}` : "Enter a key to load the models and chat.");
    return;
  }
  if (!response.ok) {
    app.dataset.models = "error";
    setModelOptions([], (await errorOf(response)).message);
    return;
  }
  const body = await response.json();
  setModelOptions(body.data.map((model) => model.id));
  $("#auth").hidden = true;
  app.dataset.models = "ready";
}

function setModelOptions(ids, placeholder) {
  const previous = modelSelect.value || loadSettings().model;
  modelSelect.replaceChildren();
  if (ids.length === 0) {
    modelSelect.append(new Option(placeholder || "No models", ""));
    modelSelect.disabled = true;
    return;
  }
  for (const id of ids) modelSelect.append(new Option(id, id));
  modelSelect.disabled = false;
  if (ids.includes(previous)) modelSelect.value = previous;
}

// ---------------------------------------------------------------------------------------------------
// Settings (kept in localStorage so a reload keeps them)

function loadSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_STORAGE)) || {};
  } catch {
    return {};
  }
}

function saveSettings() {
  localStorage.setItem(
    SETTINGS_STORAGE,
    JSON.stringify({
      model: modelSelect.value,
      transport: transport(),
      temperature: temperature.value,
      maxTokens: maxTokens.value,
    }),
  );
}

function restoreSettings() {
  const saved = loadSettings();
  if (saved.temperature !== undefined) temperature.value = saved.temperature;
  if (saved.maxTokens) maxTokens.value = saved.maxTokens;
  const radio = document.querySelector(`input[name="transport"][value="${saved.transport === "sse" ? "sse" : "ws"}"]`);
  radio.checked = true;
  temperatureValue.value = Number(temperature.value).toFixed(2);
}

function transport() {
  return document.querySelector('input[name="transport"]:checked').value;
}

temperature.addEventListener("input", () => {
  temperatureValue.value = Number(temperature.value).toFixed(2);
});
for (const input of [temperature, maxTokens, modelSelect, ...document.querySelectorAll('input[name="transport"]')]) {
  input.addEventListener("change", saveSettings);
}

function openSettings() {
  app.dataset.settings = "open";
  $("#settings-toggle").setAttribute("aria-expanded", "true");
}

function closeSettings() {
  app.dataset.settings = "closed";
  $("#settings-toggle").setAttribute("aria-expanded", "false");
}

$("#settings-toggle").addEventListener("click", () =>
  app.dataset.settings === "open" ? closeSettings() : openSettings(),
);
$("#settings-close").addEventListener("click", closeSettings);
// On a narrow screen the sheet covers the page with a scrim (the layout's ::before): a tap there closes it.
$(".layout").addEventListener("click", (event) => {
  if (event.target === event.currentTarget && app.dataset.settings === "open") closeSettings();
});

/** The request body for this turn, as POST /v1/chat/completions takes it (without `stream`). */
function requestBody() {
  const messages = [];
  if (systemPrompt.value.trim()) messages.push({ role: "system", content: systemPrompt.value.trim() });
  messages.push(...history.map(({ role, content }) => ({ role, content })));
  const body = { messages, temperature: Number(temperature.value) };
  if (modelSelect.value) body.model = modelSelect.value;
  const max = parseInt(maxTokens.value, 10);
  if (Number.isFinite(max)) body.max_tokens = max;
  const seedValue = parseInt(seed.value, 10);
  if (Number.isFinite(seedValue)) body.seed = seedValue;
  if (ignoreEos.checked) body.ignore_eos = true;
  return body;
}

// ---------------------------------------------------------------------------------------------------
// Messages

function scrollToEnd(force) {
  const nearEnd = conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 80;
  if (force || nearEnd) conversation.scrollTop = conversation.scrollHeight;
}

function addUserMessage(text) {
  $("#empty")?.remove();
  const article = document.createElement("article");
  article.className = "msg user";
  article.dataset.role = "user";
  const bubble = document.createElement("div");
  bubble.className = "bubble md";
  bubble.innerHTML = renderMarkdown(text);
  article.append(bubble);
  conversation.append(article);
  scrollToEnd(true);
}

/** One assistant reply on screen: its text, state and the numbers under it. */
class ReplyView {
  constructor(transportName) {
    this.raw = "";
    this.tokens = 0;
    this.sentAt = performance.now();
    this.firstAt = null;
    this.endAt = null;
    this.frame = null;
    this.model = null;

    this.article = document.createElement("article");
    this.article.className = "msg assistant";
    this.article.dataset.role = "assistant";
    this.article.dataset.transport = transportName;
    this.article.dataset.reconnects = "0";
    this.article.dataset.raw = "";
    const avatar = document.createElement("div");
    avatar.className = "avatar";
    avatar.textContent = "AI";
    avatar.setAttribute("aria-hidden", "true");
    const content = document.createElement("div");
    content.className = "content";
    this.body = document.createElement("div");
    this.body.className = "body md";
    this.meta = document.createElement("div");
    this.meta.className = "meta";
    const actions = document.createElement("div");
    actions.className = "actions";
    const copy = Object.assign(document.createElement("button"), {
      type: "button",
      className: "ghost small copy",
      textContent: "Copy",
      title: "Copy this reply",
    });
    copy.addEventListener("click", () => copyText(this.raw, copy));
    const again = Object.assign(document.createElement("button"), {
      type: "button",
      className: "ghost small regenerate",
      textContent: "Regenerate",
      title: "Write this reply again",
    });
    again.addEventListener("click", regenerate);
    actions.append(copy, again);
    content.append(this.body, this.meta, actions);
    this.article.append(avatar, content);
    conversation.append(this.article);
    this.setState("waiting");
    scrollToEnd(true);
  }

  get state() {
    return this.article.dataset.state;
  }

  get ended() {
    return ["done", "stopped", "error"].includes(this.state);
  }

  setState(state) {
    this.article.dataset.state = state;
  }

  started(model) {
    if (model) this.model = model;
    if (this.state === "waiting") this.setState("streaming");
  }

  /** New text; `tokens` is how many tokens produced it, when the transport says (the WebSocket does). */
  append(text, tokens) {
    if (this.ended) return;
    if (this.firstAt === null) this.firstAt = performance.now();
    if (this.state === "waiting") this.setState("streaming");
    this.raw += text;
    this.tokens += tokens || 0;
    // Re-render the whole reply at most once a frame, however many deltas arrive in between.
    if (this.frame === null) this.frame = requestAnimationFrame(() => this.render());
  }

  render() {
    if (this.frame !== null) cancelAnimationFrame(this.frame);
    this.frame = null;
    const follow =
      conversation.scrollHeight - conversation.scrollTop - conversation.clientHeight < 80;
    this.body.innerHTML = renderMarkdown(this.raw);
    this.article.dataset.raw = this.raw;
    this.renderMeta();
    if (follow) conversation.scrollTop = conversation.scrollHeight;
  }

  reconnecting() {
    this.article.dataset.reconnects = String(Number(this.article.dataset.reconnects) + 1);
    this.renderMeta("reconnecting…");
  }

  stopping() {
    if (!this.ended) this.setState("stopping");
  }

  finish(reason, usage) {
    if (this.ended) return;
    this.endAt = performance.now();
    if (usage && Number.isFinite(usage.completion_tokens)) this.tokens = usage.completion_tokens;
    this.article.dataset.finishReason = reason || "";
    this.setState(reason === "cancelled" ? "stopped" : "done");
    this.render();
  }

  fail(error) {
    if (this.ended) return;
    this.endAt = performance.now();
    this.setState("error");
    this.render();
    const box = document.createElement("div");
    box.className = "error";
    box.setAttribute("role", "alert");
    box.textContent = error?.message || "The request failed.";
    if (error?.code) {
      const code = document.createElement("code");
      code.textContent = ` ${error.code}`;
      box.append(" ", code);
    }
    this.article.querySelector(".content").append(box);
    scrollToEnd(false);
  }

  /** Show a reply saved before a reload, as it ended. */
  restore(message) {
    this.raw = message.content;
    this.model = message.model || null;
    this.tokens = Number(message.tokens) || 0;
    this.article.dataset.finishReason = message.finish_reason || "";
    this.setState(message.finish_reason === "cancelled" ? "stopped" : "done");
    this.render();
  }

  /** What a reload keeps of this reply. */
  saved() {
    return {
      role: "assistant",
      content: this.raw,
      model: this.model,
      tokens: this.tokens,
      finish_reason: this.article.dataset.finishReason || null,
      transport: this.article.dataset.transport,
    };
  }

  renderMeta(note) {
    const items = [];
    const ttft = this.firstAt === null ? null : Math.round(this.firstAt - this.sentAt);
    if (ttft !== null) this.article.dataset.ttftMs = String(ttft);
    if (this.model) items.push(this.model);
    if (this.tokens > 0) {
      items.push(`${this.tokens} tokens`);
      this.article.dataset.tokens = String(this.tokens);
    }
    // Decode speed: tokens over the time since the first one arrived.
    const until = this.endAt ?? performance.now();
    if (this.tokens > 1 && this.firstAt !== null && until - this.firstAt > 0) {
      const tps = this.tokens / ((until - this.firstAt) / 1000);
      this.article.dataset.tps = tps.toFixed(1);
      items.push(`${tps.toFixed(1)} tok/s`);
    }
    if (ttft !== null) items.push(`TTFT ${ttft} ms`);
    const reason = this.article.dataset.finishReason;
    const badges = [];
    if (note && !this.ended) badges.push([note, "warn"]);
    if (reason === "cancelled") badges.push(["stopped", ""]);
    if (reason === "length") badges.push(["max tokens reached", ""]);
    if (Number(this.article.dataset.reconnects) > 0 && this.ended) {
      badges.push([`resumed ×${this.article.dataset.reconnects}`, ""]);
    }
    this.meta.replaceChildren(
      ...items.map((text) => Object.assign(document.createElement("span"), { textContent: text })),
      ...badges.map(([text, extra]) =>
        Object.assign(document.createElement("span"), { textContent: text, className: `badge ${extra}`.trim() }),
      ),
    );
  }
}

/** Put `text` on the clipboard: the Clipboard API where the page may use it, else a selected textarea and
 * the older copy command. The button says whether it worked (data-copied: yes | no). */
async function copyText(text, button) {
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch {
    const area = Object.assign(document.createElement("textarea"), { value: text, readOnly: true });
    area.className = "copy-buffer";
    document.body.append(area);
    area.select();
    try {
      copied = document.execCommand("copy");
    } catch {
      copied = false;
    }
    area.remove();
  }
  button.dataset.copied = copied ? "yes" : "no";
  button.textContent = copied ? "Copied" : "Copy failed";
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
}

// ---------------------------------------------------------------------------------------------------
// The conversation across reloads

function saveConversation() {
  let kept = history.slice(-KEEP_MESSAGES);
  let chars = kept.reduce((sum, message) => sum + message.content.length, 0);
  while (kept.length > 1 && chars > KEEP_CHARS) {
    chars -= kept[0].content.length;
    kept = kept.slice(1);
  }
  while (kept.length && kept[0].role !== "user") kept = kept.slice(1); // start on a user turn
  try {
    if (kept.length) localStorage.setItem(CONVERSATION_STORAGE, JSON.stringify({ version: 1, messages: kept }));
    else localStorage.removeItem(CONVERSATION_STORAGE);
  } catch {
    /* storage full or off: the conversation still lives in the page */
  }
}

function restoreConversation() {
  let saved;
  try {
    saved = JSON.parse(localStorage.getItem(CONVERSATION_STORAGE));
  } catch {
    saved = null;
  }
  const valid = (m) => m && ["user", "assistant"].includes(m.role) && typeof m.content === "string";
  if (!saved || saved.version !== 1 || !Array.isArray(saved.messages)) return;
  for (const message of saved.messages.filter(valid)) {
    history.push(message);
    if (message.role === "user") addUserMessage(message.content);
    else {
      const view = new ReplyView(message.transport || transport());
      view.restore(message);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// WebSocket transport: one socket for the page, many requests on it, each with its own id.

class ChatSocket {
  constructor() {
    this.ws = null;
    this.opening = null;
    this.handlers = new Map();
  }

  url() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/ws/chat/`;
  }

  open() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) return Promise.resolve(this.ws);
    if (this.opening) return this.opening;
    // A browser cannot set headers on a WebSocket: the key travels as a subprotocol.
    const key = apiKey();
    const ws = key ? new WebSocket(this.url(), ["tripod", `bearer.${key}`]) : new WebSocket(this.url());
    this.ws = ws;
    this.opening = new Promise((resolve, reject) => {
      ws.addEventListener("open", () => {
        this.opening = null;
        resolve(ws);
      });
      ws.addEventListener("close", (event) => {
        if (this.opening) {
          this.opening = null;
          reject(new Error(`The WebSocket was refused (code ${event.code}); is the API key right?`));
        }
        if (this.ws === ws) this.ws = null;
        for (const handler of this.handlers.values()) handler({ type: "closed", code: event.code });
        this.handlers.clear();
      });
    });
    ws.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      // Frames for ids we no longer follow (a cancel that raced the end) are dropped.
      this.handlers.get(String(frame.id))?.(frame);
    });
    return this.opening;
  }

  send(frame) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(frame));
  }

  reset() {
    if (this.ws) this.ws.close();
    this.ws = null;
    this.opening = null;
  }
}

const socket = new ChatSocket();

function websocketTurn(body, view) {
  const id = `chat-${Date.now().toString(36)}-${++turnCounter}`;
  let end;
  const finished = new Promise((resolve) => (end = resolve));
  const close = () => {
    socket.handlers.delete(id);
    end();
  };
  socket.handlers.set(id, (frame) => {
    if (frame.type === "start") view.started(frame.model);
    else if (frame.type === "delta") view.append(frame.text, frame.tokens);
    else if (frame.type === "done") {
      view.finish(frame.finish_reason, frame.usage);
      close();
    } else if (frame.type === "error") {
      view.fail(frame.error);
      close();
    } else if (frame.type === "closed") {
      view.fail({ message: "The connection closed before the reply ended.", code: `close_${frame.code}` });
      close();
    }
  });
  socket
    .open()
    .then(() => socket.send({ type: "chat", id, ...body }))
    .catch((error) => {
      view.fail({ message: error.message, code: "websocket_refused" });
      close();
    });
  return {
    finished,
    stop() {
      view.stopping();
      socket.send({ type: "cancel", id });
    },
    abandon: close,
  };
}

// ---------------------------------------------------------------------------------------------------
// SSE transport: POST /v1/streams, then an EventSource on the signed URL it returns. After a dropped
// connection the EventSource reconnects with Last-Event-ID and the server resumes right after that
// frame, so whatever arrives is simply appended.

function sseTurn(body, view) {
  let end;
  const finished = new Promise((resolve) => (end = resolve));
  let streamUrl = null;
  let stopRequested = false;
  let source = null;
  let reason = null;
  let usage = null;

  const cancel = () => fetch(streamUrl, { method: "DELETE" }).catch(() => {});
  const close = () => {
    source?.close();
    end();
  };

  (async () => {
    let response;
    try {
      response = await fetch("/v1/streams", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify({ ...body, stream_options: { include_usage: true } }),
      });
    } catch {
      view.fail({ message: "The server could not be reached.", code: "network_error" });
      return close();
    }
    if (!response.ok) {
      const error = await errorOf(response);
      view.fail(error);
      if (response.status === 401) showAuth(error.message);
      return close();
    }
    const stream = await response.json();
    streamUrl = stream.url;
    view.started(stream.model);
    if (stopRequested) cancel();
    source = new EventSource(streamUrl);
    source.addEventListener("message", (event) => {
      if (event.data === "[DONE]") {
        // Close at once: an EventSource left open would reconnect to a finished stream.
        view.finish(reason, usage);
        return close();
      }
      let chunk;
      try {
        chunk = JSON.parse(event.data);
      } catch {
        return;
      }
      if (chunk.error) {
        view.fail(chunk.error);
        return;
      }
      if (chunk.model) view.started(chunk.model);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) view.append(choice.delta.content, 0);
        if (choice.finish_reason) reason = choice.finish_reason;
      }
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // The server will not resume this stream (it ended or expired while we were away).
        if (reason !== null) view.finish(reason, usage);
        else view.fail({ message: "The stream was lost and could not be resumed.", code: "stream_lost" });
        close();
      } else if (!view.ended) {
        view.reconnecting(); // the browser reconnects by itself
      }
    });
    source.addEventListener("open", () => {
      if (!view.ended && Number(view.article.dataset.reconnects) > 0) view.renderMeta();
    });
  })();

  return {
    finished,
    stop() {
      view.stopping();
      stopRequested = true;
      if (streamUrl) cancel();
    },
    abandon: close,
  };
}

// ---------------------------------------------------------------------------------------------------
// Turns

function setBusy(busy) {
  app.dataset.busy = String(busy);
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
}

function send(text) {
  history.push({ role: "user", content: text });
  addUserMessage(text);
  saveConversation();
  runTurn();
}

/** Ask again for the last reply: the conversation up to the last user message, the old reply replaced. */
function regenerate() {
  if (current) return;
  const replies = conversation.querySelectorAll(".msg.assistant");
  const last = replies[replies.length - 1];
  if (!last || last !== conversation.lastElementChild) return;
  if (history.length && history[history.length - 1].role === "assistant") history.pop();
  if (!history.length || history[history.length - 1].role !== "user") return;
  last.remove();
  saveConversation();
  runTurn();
}

/** Stream a reply to the conversation as it stands (its last message is the user's). */
function runTurn() {
  const name = transport();
  const view = new ReplyView(name);
  const body = requestBody();
  const turn = name === "sse" ? sseTurn(body, view) : websocketTurn(body, view);
  const started = epoch;
  current = { view, turn };
  setBusy(true);
  turn.finished.then(() => {
    if (started === epoch) {
      if (view.state === "error") history.pop(); // a failed turn is not part of the conversation
      else if (view.raw) history.push(view.saved());
      saveConversation();
    }
    current = null;
    setBusy(false);
    prompt.focus();
  });
}

function stop() {
  if (!current) return;
  const { view, turn } = current;
  turn.stop();
  // If the server never confirms, end the turn on our side so the page does not stay busy.
  setTimeout(() => {
    if (current && current.view === view && !view.ended) {
      view.finish("cancelled", null);
      turn.abandon();
    }
  }, STOP_GRACE_MS);
}

composer.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = prompt.value.trim();
  if (!text || current) return;
  prompt.value = "";
  send(text);
});

prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    composer.requestSubmit();
  }
});

stopButton.addEventListener("click", stop);

$("#new-chat").addEventListener("click", () => {
  if (current) stop();
  epoch += 1;
  history.length = 0;
  saveConversation();
  conversation.replaceChildren(emptyState.cloneNode(true));
  prompt.focus();
});

// ---------------------------------------------------------------------------------------------------

restoreSettings();
restoreConversation();
refreshKeyStatus();
loadModels();
prompt.focus();
