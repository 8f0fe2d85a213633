// pagoda's chat page: streams /v1/chat/completions (SSE over fetch) and shows tokens/s.
// Plain script, no build step and no dependencies, so it ships inside the Python package.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = [];
let controller = null;
let modelName = null;

$("api-key").value = localStorage.getItem("pagoda-api-key") || "";
$("api-key").addEventListener("change", () => {
  localStorage.setItem("pagoda-api-key", $("api-key").value);
  loadModel();
});

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
    modelName = body.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    $("model").textContent = "(" + e.message + ")";
  }
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Yields the JSON payload of each "data:" event until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  setBusy(true);
  controller = new AbortController();
  const start = performance.now();
  let firstToken = null;
  let chunks = 0;
  let usage = null;
  let reply = "";
  const showRate = (final) => {
    const now = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const secs = firstToken ? (now - firstToken) / 1000 : 0;
    const rate = secs > 0 ? (Math.max(tokens - 1, 0) / secs).toFixed(1) : "–";
    const ttft = firstToken ? Math.round(firstToken - start) + " ms" : "–";
    $("status").textContent = `${tokens} tokens · ${rate} tokens/s · first token ${ttft}` + (final ? "" : " …");
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: modelName || undefined,
        messages: conversation,
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: parseInt($("max-tokens").value, 10) || 256,
        temperature: parseFloat($("temperature").value),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : response.status + " " + response.statusText);
    }
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (firstToken === null) firstToken = performance.now();
          chunks += 1;
          reply += piece;
          bubble.textContent = reply;
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
      showRate(false);
    }
    showRate(true);
  } catch (e) {
    if (e.name === "AbortError") {
      showRate(true);
    } else {
      addMessage("error", "error: " + e.message);
      $("status").textContent = "error";
    }
  } finally {
    bubble.classList.remove("streaming");
    bubble.classList.add("done");
    conversation.push({ role: "assistant", content: reply });
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").textContent = "";
  $("status").textContent = "ready";
});

loadModel();
