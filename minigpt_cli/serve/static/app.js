// The chat page: talks to this server's /v1/chat/completions, streaming the reply.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const input = $("input");
let turns = [];  // the conversation so far: {user, assistant, divs} of every turn kept
let firstTurn = 0;  // the oldest turn that still fitted the context in the last request
let chatId = 0;  // New chat bumps it: a reply still finishing then has no conversation to join
let controller = null;  // the reply being streamed, to stop it
let modelId = null;

const saved = JSON.parse(localStorage.getItem("minigpt-settings") || "{}");
for (const id of ["temperature", "top-p", "max-tokens", "system", "api-key"]) {
  if (saved[id] !== undefined) $(id).value = saved[id];
  $(id).addEventListener("change", () => {
    saved[id] = $(id).value;
    localStorage.setItem("minigpt-settings", JSON.stringify(saved));
    if (id === "api-key") loadModel();
  });
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    const m = body.data[0];
    modelId = m.id;
    const loss = m.val_loss == null ? "n/a" : Number(m.val_loss).toFixed(3);
    $("model-info").textContent = `${m.id} · step ${m.step ?? "?"} · val loss ${loss}`;
  } catch (e) {
    $("model-info").textContent = "model unavailable: " + e.message;
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  div.appendChild(body);
  conversation.appendChild(div);
  conversation.scrollTop = conversation.scrollHeight;
  return div;
}

function addCopy(div) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "Copy";
  button.addEventListener("click", async () => {
    const text = div.querySelector(".text").textContent;
    try { await navigator.clipboard.writeText(text); button.textContent = "Copied"; }
    catch (e) { button.textContent = "Copy failed"; }
    setTimeout(() => (button.textContent = "Copy"), 1500);
  });
  div.appendChild(button);
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
}

// Greys out a message the model no longer sees, and says why when hovered.
function leaveOut(div, why) {
  div.classList.add("left-out");
  div.title = why;
}

// The request for a reply to `text` after turns[first:], with the system prompt.
function request(first, text, signal) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const turn of turns.slice(first)) {
    messages.push({ role: "user", content: turn.user },
                  { role: "assistant", content: turn.assistant });
  }
  messages.push({ role: "user", content: text });
  return fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), signal,
    body: JSON.stringify({
      model: modelId || undefined, messages, stream: true,
      temperature: Number($("temperature").value), top_p: Number($("top-p").value),
      max_tokens: Number($("max-tokens").value),
    }),
  });
}

// Starts the reply to `text`, leaving out the oldest turns when the conversation has
// outgrown the model's context (as `minigpt chat` does); returns the streaming response
// and the first turn it includes. Only the server knows how its chat template turns the
// messages into tokens, so the page does not count them itself: it sends the
// conversation, and while the server refuses it as too long (a 400 with the code
// context_length_exceeded, answered before any generation, so it costs little), it drops
// the oldest turn and asks again. The system prompt and the new message are always sent;
// when they alone are too long, the server's error is shown. Only the prompt has to fit:
// the server slides its window past the context while generating, so no room is kept for
// the reply. The search starts where the last request started, so a long conversation
// is not tried from its beginning every time.
async function startReply(text, signal) {
  for (let first = Math.min(firstTurn, turns.length); ; first++) {
    const r = await request(first, text, signal);
    if (r.ok) return { r, first };
    const body = await r.json().catch(() => ({}));
    const error = body.error || {};
    if (error.code !== "context_length_exceeded" || first >= turns.length) {
      throw new Error(error.message || r.statusText);
    }
  }
}

async function send(text) {
  const mine = chatId;
  const asked = addMessage("user", text);
  const reply = addMessage("assistant", "");
  const out = reply.querySelector(".text");
  controller = new AbortController();
  busy(true);
  $("status").textContent = "generating…";
  let reason = null;
  let replyText = "";  // as the model wrote it: the next request sends it back unchanged
  let first = firstTurn;
  let failure = null;
  try {
    const started = await startReply(text, controller.signal);
    first = started.first;
    const r = started.r;
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        for (const choice of chunk.choices) {
          if (choice.delta && choice.delta.content) {
            replyText += choice.delta.content;
            out.textContent = replyText.trimStart();  // shown without a leading blank line
          }
          if (choice.finish_reason) reason = choice.finish_reason;
        }
        conversation.scrollTop = conversation.scrollHeight;
      }
    }
  } catch (e) {
    failure = e;
  }
  // New chat was clicked meanwhile (it stopped this reply): the reply belonged to the
  // conversation that is gone, so it must not touch the new one's turns, buttons or status.
  if (mine !== chatId) return;
  controller = null;
  busy(false);
  const stopped = failure !== null && failure.name === "AbortError";
  const said = replyText.trim() !== "";
  if ((failure && !stopped) || (stopped && !said)) {
    // a failed turn, or one stopped before a word, is not part of the conversation:
    // the next request leaves it out
    if (said) leaveOut(reply, "not part of the conversation: the reply failed");
    else reply.remove();
    leaveOut(asked, "not part of the conversation: it got no reply");
    if (!stopped) addMessage("error", "Error: " + failure.message);
    $("status").textContent = stopped ? "stopped" : "";
  } else {
    const notes = [];
    if (stopped) notes.push("stopped");
    else if (reason === "length") notes.push("stopped at max tokens");
    if (first > firstTurn) notes.push("the oldest messages (greyed) no longer fit the context");
    $("status").textContent = notes.join(" · ");
    for (const turn of turns.slice(firstTurn, first)) {
      for (const div of turn.divs) leaveOut(div, "no longer in the model's context");
    }
    firstTurn = first;
    turns.push({ user: text, assistant: replyText, divs: [asked, reply] });
    addCopy(reply);
  }
  conversation.scrollTop = conversation.scrollHeight;  // after the Copy button or the error
  input.focus();
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value;
  if (!text.trim() || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  chatId++;
  if (controller) controller.abort();
  controller = null;
  busy(false);
  turns = [];
  firstTurn = 0;
  conversation.replaceChildren();
  $("status").textContent = "";
  input.focus();
});
$("toggle-settings").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
});
loadModel();
input.focus();
