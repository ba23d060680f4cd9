// llmrelay's web chat: plain JavaScript, no build step, no external files.
// Talks to this server's OpenAI API (/v1/models, /v1/chat/completions, streamed) and, for the
// operator view, /api/workers. Model and user text is always escaped before any markup is added.
// compare.js (side by side, votes, leaderboard) and ops.js (live charts) use its functions.
"use strict";

// ---- safe markdown: escape everything first, then add a small fixed set of tags ----------
const Markdown = (() => {
  function escapeHtml(s) {
    return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
  }
  // `escaped` is already escaped: the patterns only wrap it in our own tags.
  function inline(escaped) {
    return escaped.split(/(`[^`\n]+`)/).map((part) => {
      if (part.length > 1 && part.startsWith("`") && part.endsWith("`")) {
        return "<code>" + part.slice(1, -1) + "</code>";
      }
      return part
        .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
        .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
        .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()<>"']+)\)/g,
          '<a href="$2" target="_blank" rel="noopener noreferrer nofollow">$1</a>');
    }).join("");
  }
  function render(text) {
    const lines = escapeHtml(text).split("\n");
    const out = [];
    let para = [];
    let list = null; // "ul" | "ol"
    const flushPara = () => {
      if (para.length) out.push("<p>" + para.map(inline).join("<br>") + "</p>");
      para = [];
    };
    const closeList = () => {
      if (list) out.push("</" + list + ">");
      list = null;
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
      if (fence) {
        flushPara(); closeList();
        const code = [];
        i++;
        while (i < lines.length && !/^\s*```\s*$/.test(lines[i])) code.push(lines[i++]);
        const lang = fence[1] ? ' data-lang="' + fence[1] + '"' : "";
        out.push("<pre><code" + lang + ">" + code.join("\n") + "</code></pre>");
        continue;
      }
      const heading = line.match(/^(#{1,6})\s+(.*)$/);
      const bullet = line.match(/^\s*[-*+]\s+(.*)$/);
      const numbered = line.match(/^\s*\d+[.)]\s+(.*)$/);
      if (heading) {
        flushPara(); closeList();
        const level = Math.min(6, heading[1].length + 2);
        out.push("<h" + level + ">" + inline(heading[2]) + "</h" + level + ">");
      } else if (bullet || numbered) {
        flushPara();
        const kind = bullet ? "ul" : "ol";
        if (list !== kind) { closeList(); out.push("<" + kind + ">"); list = kind; }
        out.push("<li>" + inline((bullet || numbered)[1]) + "</li>");
      } else if (!line.trim()) {
        flushPara(); closeList();
      } else {
        closeList();
        para.push(line);
      }
    }
    flushPara(); closeList();
    return out.join("");
  }
  return { render, escapeHtml };
})();
window.LLMRelayMarkdown = Markdown;

// ---- state -------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
const chat = {
  messages: [],      // {role, content} of this conversation, without the system prompt
  abort: null,       // AbortController of the running answer
  apiKey: sessionStorage.getItem("llmrelay.apiKey") || "",
  afterKey: null,    // what to retry once a key is entered
  models: [],        // the last /v1/models list
};

function authHeaders() {
  const h = { "Content-Type": "application/json" };
  if (chat.apiKey) h.Authorization = "Bearer " + chat.apiKey;
  return h;
}

function setStatus(text) { $("status-line").textContent = text; }

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + resp.status;
}

function askForKey(reason, retry) {
  chat.afterKey = retry;
  $("api-key-reason").textContent = reason;
  $("api-key").value = "";
  const dialog = $("api-key-dialog");
  if (!dialog.open) dialog.showModal();
  $("api-key").focus();
}

// ---- models ------------------------------------------------------------------------------
async function loadModels() {
  setStatus("loading models…");
  let resp;
  try {
    resp = await fetch("/v1/models", { headers: authHeaders() });
  } catch (e) {
    setStatus("server not reachable: " + e.message);
    return;
  }
  if (resp.status === 401) {
    setStatus("API key needed");
    askForKey(await errorMessage(resp), loadModels);
    return;
  }
  if (!resp.ok) { setStatus("could not list models: " + await errorMessage(resp)); return; }
  const data = await resp.json();
  const select = $("model");
  const previous = select.value || sessionStorage.getItem("llmrelay.model");
  select.replaceChildren();
  for (const m of data.data) {
    const opt = document.createElement("option");
    opt.value = m.id;
    // A model loaded on demand says its state; choosing an unloaded one loads it on the
    // first message (the answer then waits for the load).
    opt.textContent = m.state && m.state !== "loaded" ? m.id + " (" + m.state + ")" : m.id;
    opt.title = m.state === "unloaded" ? "loaded when you send a message" : "";
    select.append(opt);
  }
  if (previous && data.data.some((m) => m.id === previous)) select.value = previous;
  chat.models = data.data;
  if (typeof modelsChanged === "function") modelsChanged();  // compare.js
  setStatus(data.data.length ? data.data.length + " model(s)" : "no models served right now");
}

// ---- messages ----------------------------------------------------------------------------
function addBubble(role, text, model, container) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = role === "user" ? "you" : (model || role);
  const body = document.createElement("div");
  body.className = "body";
  div.append(meta, body);
  setBody(div, text, role);
  (container || $("messages")).append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBody(div, text, role) {
  const body = div.querySelector(".body");
  if (role === "user") body.textContent = text;          // the user's words, as typed
  else body.innerHTML = Markdown.render(text);           // escaped first, then markdown
}

// A reasoning model's reasoning: a collapsed, greyed block above the answer (<details>), filled
// as it streams; never sent back as part of the conversation.
function setReasoning(div, text) {
  let box = div.querySelector("details.reasoning");
  if (!box) {
    box = document.createElement("details");
    box.className = "reasoning";
    const summary = document.createElement("summary");
    summary.textContent = "reasoning";
    const pre = document.createElement("div");
    pre.className = "reasoning-text";
    box.append(summary, pre);
    div.querySelector(".body").before(box);
  }
  box.querySelector(".reasoning-text").textContent = text;
}

function note(div, text) {
  let n = div.querySelector(".note");
  if (!n) { n = document.createElement("div"); n.className = "note"; div.append(n); }
  n.textContent = text;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("model").disabled = on;
}

// ---- images attached to the next message (picked, pasted or dropped) ------------------------
const IMAGE_TYPES = ["image/png", "image/jpeg", "image/gif", "image/webp"];

// The images waiting for a composer's next message (data URLs), drawn as removable thumbnails
// in the element `shelfId`; fed by the file picker `pickerId` (opened by `buttonId`), a paste
// into `inputId` and a drop on `formId`.
function attachments(shelfId, pickerId, buttonId, inputId, formId) {
  const list = [];
  function draw() {
    $(shelfId).replaceChildren(...list.map((url, i) => {
      const box = document.createElement("div");
      box.className = "thumb";
      const img = document.createElement("img");
      img.src = url;
      img.alt = "image " + (i + 1);
      const drop = document.createElement("button");
      drop.type = "button";
      drop.textContent = "×";
      drop.title = "remove this image";
      drop.addEventListener("click", () => { list.splice(i, 1); draw(); });
      box.append(img, drop);
      return box;
    }));
  }
  function add(files) {
    for (const file of files) {
      if (!IMAGE_TYPES.includes(file.type)) {
        setStatus(file.name + " is not a PNG, JPEG, GIF or WebP image");
        continue;
      }
      const reader = new FileReader();
      reader.onload = () => { list.push(reader.result); draw(); };
      reader.readAsDataURL(file);
    }
  }
  document.addEventListener("DOMContentLoaded", () => {
    $(buttonId).addEventListener("click", () => $(pickerId).click());
    $(pickerId).addEventListener("change", () => { add($(pickerId).files); $(pickerId).value = ""; });
    $(inputId).addEventListener("paste", (ev) => {
      const files = [...(ev.clipboardData ? ev.clipboardData.files : [])];
      if (files.length) { ev.preventDefault(); add(files); }
    });
    const form = $(formId);
    form.addEventListener("dragover", (ev) => { ev.preventDefault(); form.classList.add("dropping"); });
    form.addEventListener("dragleave", () => form.classList.remove("dropping"));
    form.addEventListener("drop", (ev) => {
      ev.preventDefault();
      form.classList.remove("dropping");
      add(ev.dataTransfer ? ev.dataTransfer.files : []);
    });
  });
  return {
    get count() { return list.length; },
    take() { const out = list.splice(0); draw(); return out; },  // for the message being sent
  };
}

const attached = attachments("attachments", "image-file", "attach", "input", "composer");

// A user's message: its text, or its images then its text as content parts (OpenAI's
// image_url; images first, as the providers advise).
function userContent(text, images) {
  if (!images.length) return text;
  return images.map((url) => ({ type: "image_url", image_url: { url } })).concat(
    text ? [{ type: "text", text }] : []);
}

function showImages(div, images) {
  if (!images.length) return;
  const row = document.createElement("div");
  row.className = "images";
  for (const url of images) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "an image you sent";
    row.append(img);
  }
  div.append(row);
}

async function send(text) {
  const model = $("model").value;
  if (!model) { setStatus("no model to talk to"); return; }
  const images = attached.take();
  const userDiv = addBubble("user", text);
  showImages(userDiv, images);
  chat.messages.push({ role: "user", content: userContent(text, images) });
  const answer = addBubble("assistant", "", model);
  answer.dataset.state = "waiting";
  const system = $("system").value.trim();
  const messages = (system ? [{ role: "system", content: system }] : []).concat(chat.messages);
  const body = {
    model, messages, stream: true, stream_options: { include_usage: true },
    temperature: parseFloat($("temperature").value),
    max_tokens: parseInt($("max-tokens").value, 10) || undefined,
  };
  const ctrl = new AbortController();
  chat.abort = ctrl;
  busy(true);
  const picked = $("model").selectedOptions[0];
  const cold = picked && / \((unloaded|loading|unloading)\)$/.test(picked.textContent);
  if (cold) setStatus("loading " + model + " (loaded on demand: the first answer waits for it)…");
  const out = { text: "", reasoning: "", usage: null, finish: null };
  try {
    await streamChat(body, ctrl.signal, answer, out);
    chat.messages.push({ role: "assistant", content: out.text });
    answer.dataset.state = "done";
    const summary = usageNote(out);
    if (summary) note(answer, summary);
  } catch (e) {
    if (e.name === "AbortError") {
      // Keep what was said: the next turn continues from the partial answer.
      chat.messages.push({ role: "assistant", content: out.text });
      answer.dataset.state = "stopped";
      note(answer, "stopped");
    } else if (e.status === 401) {
      chat.messages.pop();
      userDiv.remove(); answer.remove();
      askForKey(e.message, () => send(text));
    } else {
      // The request failed: take the unanswered message out of the conversation.
      chat.messages.pop();
      answer.dataset.state = "error";
      userDiv.classList.add("failed");
      note(answer, "error: " + e.message + " (this message was not added to the conversation)");
    }
  } finally {
    chat.abort = null;
    busy(false);
    if (cold) loadModels();  // its state has changed
  }
}

// One streamed chat completion into `bubble` (its reasoning collapsed above the answer), what
// was said gathered in `out` ({text, reasoning, usage, finish}) as it comes, so a caller that
// aborts keeps the partial answer. An HTTP refusal throws an Error with its `status`.
async function streamChat(body, signal, bubble, out) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers: authHeaders(), body: JSON.stringify(body), signal,
  });
  if (!resp.ok) {
    const err = new Error(await errorMessage(resp));
    err.status = resp.status;
    throw err;
  }
  bubble.dataset.state = "streaming";
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;   // ": keep-alive" comments
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const obj = JSON.parse(data);
        if (obj.error) throw new Error(obj.error.message || "the server reported an error");
        if (obj.usage) out.usage = obj.usage;
        const choice = obj.choices && obj.choices[0];
        const thought = choice && choice.delta && choice.delta.reasoning_content;
        if (thought) {
          out.reasoning += thought;
          setReasoning(bubble, out.reasoning);
        }
        if (choice && choice.delta && choice.delta.content) {
          out.text += choice.delta.content;
          setBody(bubble, out.text, "assistant");
          bubble.scrollIntoView({ block: "end" });
        }
        if (choice && choice.finish_reason) out.finish = choice.finish_reason;
      }
    }
  }
  return out;
}

// The note under a finished answer: its tokens, reasoning tokens, a cut at max tokens.
function usageNote(out) {
  const parts = [];
  const usage = out.usage;
  if (usage) parts.push(usage.prompt_tokens + " prompt + " + usage.completion_tokens + " tokens");
  const details = usage && usage.completion_tokens_details;
  if (details && details.reasoning_tokens) parts.push(details.reasoning_tokens + " of them reasoning");
  if (out.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

function newChat() {
  if (chat.abort) chat.abort.abort();
  chat.messages = [];
  $("messages").replaceChildren();
  $("input").focus();
}

// ---- operator view -----------------------------------------------------------------------
let opsTimer = null;

async function loadWorkers() {
  let resp;
  try {
    resp = await fetch("/api/workers", { headers: authHeaders() });
  } catch (e) { $("ops-summary").textContent = "server not reachable: " + e.message; return; }
  if (resp.status === 401) {
    stopOps();
    askForKey(await errorMessage(resp), () => { showOps(); });
    return;
  }
  if (resp.status === 403) {
    // a key that is not an admin key: say so once, show no rows, stop asking every 2 s
    stopOps();
    document.querySelector("#ops-table tbody").replaceChildren();
    $("ops-summary").textContent = "The workers are shown to admin keys only: " +
      await errorMessage(resp);
    return;
  }
  if (!resp.ok) { $("ops-summary").textContent = await errorMessage(resp); return; }
  const data = await resp.json();
  $("ops-summary").textContent = data.workers.length + " worker(s) · source: " + data.source +
    " · dispatch: " + (data.dispatch_method || "?") +
    (data.heartbeat_interval ? " · heartbeat every " + data.heartbeat_interval + " s" : "");
  const rows = data.workers.map((w) => {
    const tr = document.createElement("tr");
    const cells = [w.models, w.address, w.engine, w.queue_length, w.running, w.served, w.speed,
      w.heartbeat_age == null ? "-" : w.heartbeat_age.toFixed(1) + " s ago", w.health,
      w.in_flight_here];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c == null ? "-" : String(c);
      tr.append(td);
    }
    tr.dataset.health = w.health;
    return tr;
  });
  document.querySelector("#ops-table tbody").replaceChildren(...rows);
}

function stopOps() { if (opsTimer) clearInterval(opsTimer); opsTimer = null; }

// The page's views, each a <main> with its tab; `onShow` hooks (compare.js, ops.js) run when
// their view is shown.
const VIEWS = { chat: "chat-view", compare: "compare-view", board: "board-view", ops: "ops-view" };
const onShow = {};

function showView(name) {
  stopOps();
  for (const [view, id] of Object.entries(VIEWS)) {
    $(id).hidden = view !== name;
    $("tab-" + view).classList.toggle("active", view === name);
  }
  document.body.dataset.view = name;
  if (onShow[name]) onShow[name]();
}

function opsTick() {
  loadWorkers();
  if (typeof loadOpsLive === "function") loadOpsLive();
}

function showOps() {
  showView("ops");
  opsTick();
  opsTimer = setInterval(opsTick, 2000);
}

function showChat() { showView("chat"); }

// ---- wiring ------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("input").value;
    if ((!text.trim() && !attached.count) || chat.abort) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("stop").addEventListener("click", () => { if (chat.abort) chat.abort.abort(); });
  $("new-chat").addEventListener("click", newChat);
  $("model").addEventListener("change", () => sessionStorage.setItem("llmrelay.model", $("model").value));
  $("temperature").addEventListener("input", () => {
    $("temperature-value").textContent = $("temperature").value;
  });
  $("tab-ops").addEventListener("click", showOps);
  $("tab-chat").addEventListener("click", showChat);
  $("tab-compare").addEventListener("click", () => showView("compare"));
  $("tab-board").addEventListener("click", () => showView("board"));
  $("change-key").addEventListener("click", () => askForKey("Enter the API key for this server.", loadModels));
  $("api-key-form").addEventListener("submit", () => {
    chat.apiKey = $("api-key").value.trim();
    sessionStorage.setItem("llmrelay.apiKey", chat.apiKey);
    const retry = chat.afterKey;
    chat.afterKey = null;
    if (retry) retry();
  });
  $("api-key-cancel").addEventListener("click", () => $("api-key-dialog").close());
  loadModels();
});
