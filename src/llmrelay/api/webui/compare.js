// llmrelay's web console, part 2: two models side by side and the leaderboard. Uses app.js's
// functions ($, authHeaders, addBubble, streamChat, usageNote, note, errorMessage, askForKey).
// A vote goes to POST /api/arena/votes; the leaderboard reads GET /api/arena/leaderboard and
// the export GET /api/arena/battles (FastChat's battle log, JSONL).
"use strict";

const cmp = {
  models: ["", ""],   // the two models of this round
  anon: false,        // names hidden until the vote
  revealed: false,
  convs: [[], []],    // each side's {role, content} messages
  aborts: [null, null],
  voted: false,
};
const SIDES = ["a", "b"];
const cmpAttached = attachments("cmp-attachments", "cmp-image-file", "cmp-attach", "cmp-input",
                                "cmp-composer");

function modelIds() { return chat.models.map((m) => m.id); }

function modelsChanged() {
  for (const side of SIDES) {
    const select = $("cmp-model-" + side);
    const before = select.value;
    select.replaceChildren(...modelIds().map((id) => {
      const opt = document.createElement("option");
      opt.value = id; opt.textContent = id;
      return opt;
    }));
    if (modelIds().includes(before)) select.value = before;
  }
  const ids = modelIds();
  if (!$("cmp-model-b").value || $("cmp-model-b").value === $("cmp-model-a").value) {
    const other = ids.find((id) => id !== $("cmp-model-a").value);
    if (other) $("cmp-model-b").value = other;
  }
  if (!cmp.models[0]) newRound();
}

function paneName(i) {
  if (cmp.anon && !cmp.revealed) return "Model " + "AB"[i];
  return cmp.models[i] || "?";
}

function showNames() {
  SIDES.forEach((side, i) => {
    $("name-" + side).textContent = paneName(i);
    for (const meta of $("msgs-" + side).querySelectorAll(".msg.assistant .meta")) {
      meta.textContent = paneName(i);
    }
  });
}

function running() { return cmp.aborts.some((a) => a !== null); }

function cmpButtons() {
  const busyNow = running();
  const answered = cmp.convs[0].length > 0 && cmp.convs[1].length > 0;
  $("cmp-send").disabled = busyNow;
  $("cmp-stop").disabled = !busyNow;
  for (const id of ["vote-a", "vote-b", "vote-tie", "vote-bad"]) {
    $(id).disabled = busyNow || !answered || cmp.voted;
  }
  SIDES.forEach((side) => { $("regen-" + side).disabled = busyNow || !answered; });
  // random two: the pickers (which show names) are hidden until the next round
  $("cmp-model-a").parentElement.hidden = $("cmp-model-b").parentElement.hidden = cmp.anon;
}

function newRound() {
  for (const a of cmp.aborts) if (a) a.abort();
  cmp.anon = $("cmp-anon").checked;
  let pair = [$("cmp-model-a").value, $("cmp-model-b").value];
  if (cmp.anon) {
    const ids = modelIds().slice();
    const first = ids.splice(Math.floor(Math.random() * ids.length), 1)[0];
    pair = [first, ids[Math.floor(Math.random() * ids.length)]];
  }
  cmp.models = pair;
  cmp.revealed = false;
  cmp.voted = false;
  cmp.convs = [[], []];
  SIDES.forEach((side) => $("msgs-" + side).replaceChildren());
  $("vote-result").textContent = "";
  showNames();
  cmpButtons();
}

// One side's answer to its conversation so far, streamed into a new bubble in its pane.
async function answerSide(i) {
  const side = SIDES[i];
  const bubble = addBubble("assistant", "", paneName(i), $("msgs-" + side));
  bubble.dataset.state = "waiting";
  const body = {
    model: cmp.models[i], messages: cmp.convs[i], stream: true,
    stream_options: { include_usage: true },
    max_tokens: parseInt($("cmp-max-tokens").value, 10) || undefined,
  };
  const ctrl = new AbortController();
  cmp.aborts[i] = ctrl;
  cmpButtons();
  const out = { text: "", reasoning: "", usage: null, finish: null };
  try {
    await streamChat(body, ctrl.signal, bubble, out);
    bubble.dataset.state = "done";
    const summary = usageNote(out);
    if (summary) note(bubble, summary);
  } catch (e) {
    if (e.name === "AbortError") {
      bubble.dataset.state = "stopped";
      note(bubble, "stopped");
    } else {
      bubble.dataset.state = "error";
      note(bubble, "error: " + e.message);
      if (e.status === 401) askForKey(e.message, loadModels);
    }
  } finally {
    // the answer joins the conversation (empty if it failed), so both sides keep turns aligned
    cmp.convs[i].push({ role: "assistant", content: out.text });
    cmp.aborts[i] = null;
    cmpButtons();
  }
}

async function sendBoth(text) {
  if (!cmp.models[0] || !cmp.models[1]) { $("vote-result").textContent = "two models are needed"; return; }
  cmp.voted = false;
  $("vote-result").textContent = "";
  const images = cmpAttached.take();
  const runs = SIDES.map((side, i) => {
    showImages(addBubble("user", text, null, $("msgs-" + side)), images);
    cmp.convs[i].push({ role: "user", content: userContent(text, images) });
    return answerSide(i);
  });
  await Promise.all(runs);
}

async function regenerate(i) {
  if (running()) return;
  const conv = cmp.convs[i];
  if (!conv.length || conv[conv.length - 1].role !== "assistant") return;
  conv.pop();
  const bubbles = $("msgs-" + SIDES[i]).querySelectorAll(".msg.assistant");
  if (bubbles.length) bubbles[bubbles.length - 1].remove();
  cmp.voted = false;
  $("vote-result").textContent = "";
  await answerSide(i);
}

const VOTE_TEXT = {
  model_a: "left is better", model_b: "right is better", tie: "a tie", "tie (bothbad)": "both are bad",
};

// A conversation as a vote keeps it: an image as the mark "[image]" (the vote stores text).
function voteConversation(conv) {
  return conv.map((m) => typeof m.content === "string" ? m : {
    role: m.role,
    content: m.content.map((p) => p.type === "text" ? p.text : "[image]").join("\n"),
  });
}

async function vote(winner) {
  const body = {
    model_a: cmp.models[0], model_b: cmp.models[1], winner, anony: cmp.anon && !cmp.revealed,
    conversation_a: voteConversation(cmp.convs[0]), conversation_b: voteConversation(cmp.convs[1]),
  };
  const resp = await fetch("/api/arena/votes", {
    method: "POST", headers: authHeaders(), body: JSON.stringify(body),
  });
  if (!resp.ok) { $("vote-result").textContent = "vote not stored: " + await errorMessage(resp); return; }
  cmp.voted = true;
  cmp.revealed = true;
  showNames();
  $("vote-result").textContent = "Voted " + VOTE_TEXT[winner] + ": left " + cmp.models[0] +
    ", right " + cmp.models[1] + ".";
  cmpButtons();
}

// ---- leaderboard -------------------------------------------------------------------------
function boardQuery() {
  const params = new URLSearchParams();
  const span = $("board-since").value;
  if (span) params.set("since", String(Date.now() / 1000 - parseFloat(span)));
  if ($("board-key").value) params.set("key", $("board-key").value);
  return params.toString();
}

// A small SVG of the rating's interval on the board's scale.
function intervalBar(row, lo, hi) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", "160"); svg.setAttribute("height", "14");
  svg.setAttribute("class", "ci");
  const x = (v) => 4 + 152 * (hi > lo ? (v - lo) / (hi - lo) : 0.5);
  const line = document.createElementNS(ns, "line");
  for (const [k, v] of [["x1", x(row.ci_low)], ["x2", x(row.ci_high)], ["y1", 7], ["y2", 7]]) {
    line.setAttribute(k, String(v));
  }
  const dot = document.createElementNS(ns, "circle");
  dot.setAttribute("cx", String(x(row.rating))); dot.setAttribute("cy", "7"); dot.setAttribute("r", "4");
  svg.append(line, dot);
  return svg;
}

async function loadBoard() {
  let resp;
  try {
    resp = await fetch("/api/arena/leaderboard?" + boardQuery(), { headers: authHeaders() });
  } catch (e) { $("board-summary").textContent = "server not reachable: " + e.message; return; }
  if (resp.status === 401) { askForKey(await errorMessage(resp), loadBoard); return; }
  if (!resp.ok) { $("board-summary").textContent = await errorMessage(resp); return; }
  const data = await resp.json();
  const keySelect = $("board-key");
  if (data.keys.length) {
    const chosen = keySelect.value;
    const opts = [["", "every key"]].concat(data.keys.map((k) => [k, k]));
    keySelect.replaceChildren(...opts.map(([value, label]) => {
      const opt = document.createElement("option");
      opt.value = value; opt.textContent = label;
      return opt;
    }));
    keySelect.value = chosen;
  }
  $("board-key-label").hidden = !data.keys.length;
  $("board-summary").textContent = data.votes + " vote(s)" + (data.key ? " of key " + data.key : "");
  const lo = Math.min(...data.models.map((r) => r.ci_low));
  const hi = Math.max(...data.models.map((r) => r.ci_high));
  const rows = data.models.map((r) => {
    const tr = document.createElement("tr");
    tr.dataset.model = r.model;
    const cells = [r.rank, r.model, r.rating.toFixed(0), null, r.votes, r.wins, r.losses, r.ties,
      (100 * r.win_rate).toFixed(0) + "%"];
    for (const c of cells) {
      const td = document.createElement("td");
      if (c === null) {
        td.append(intervalBar(r, lo, hi), document.createTextNode(
          " " + r.ci_low.toFixed(0) + " – " + r.ci_high.toFixed(0)));
      } else td.textContent = String(c);
      tr.append(td);
    }
    return tr;
  });
  document.querySelector("#board-table tbody").replaceChildren(...rows);
}

async function exportBattles() {
  const resp = await fetch("/api/arena/battles?" + boardQuery(), { headers: authHeaders() });
  if (!resp.ok) { $("board-summary").textContent = await errorMessage(resp); return; }
  const url = URL.createObjectURL(await resp.blob());
  const a = document.createElement("a");
  a.href = url; a.download = "battles.jsonl";
  document.body.append(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

document.addEventListener("DOMContentLoaded", () => {
  onShow.compare = () => { modelsChanged(); $("cmp-input").focus(); };
  onShow.board = loadBoard;
  $("cmp-composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("cmp-input").value;
    if ((!text.trim() && !cmpAttached.count) || running()) return;
    $("cmp-input").value = "";
    sendBoth(text);
  });
  $("cmp-input").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("cmp-composer").requestSubmit(); }
  });
  $("cmp-stop").addEventListener("click", () => { for (const a of cmp.aborts) if (a) a.abort(); });
  $("cmp-new").addEventListener("click", newRound);
  for (const id of ["cmp-anon", "cmp-model-a", "cmp-model-b"]) $(id).addEventListener("change", newRound);
  $("regen-a").addEventListener("click", () => regenerate(0));
  $("regen-b").addEventListener("click", () => regenerate(1));
  $("vote-a").addEventListener("click", () => vote("model_a"));
  $("vote-b").addEventListener("click", () => vote("model_b"));
  $("vote-tie").addEventListener("click", () => vote("tie"));
  $("vote-bad").addEventListener("click", () => vote("tie (bothbad)"));
  $("board-since").addEventListener("change", loadBoard);
  $("board-key").addEventListener("change", loadBoard);
  $("board-refresh").addEventListener("click", loadBoard);
  $("board-export").addEventListener("click", exportBattles);
});
