// The chat page: talks to this server's /v1/chat/completions, streaming the reply.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const input = $("input");
let history = [];   // {role, content} of the conversation so far
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

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  const out = reply.querySelector(".text");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  controller = new AbortController();
  busy(true);
  $("status").textContent = "generating…";
  let reason = null;
  let replyText = "";  // as the model wrote it: the next request sends it back unchanged
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify({
        model: modelId || undefined, messages, stream: true,
        temperature: Number($("temperature").value), top_p: Number($("top-p").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : r.statusText);
    }
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
    $("status").textContent = reason === "length" ? "stopped at max tokens" : "";
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      addMessage("error", "Error: " + e.message);
      $("status").textContent = "";
    }
  } finally {
    controller = null;
    busy(false);
    history.push({ role: "assistant", content: replyText });
    addCopy(reply);
    input.focus();
  }
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
  if (controller) controller.abort();
  history = [];
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
