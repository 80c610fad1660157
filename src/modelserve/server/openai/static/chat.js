// The chat page: talks to this server's OpenAI-compatible /v1/chat/completions, streaming.
// No build step and no CDN: this file is served as it is from the Python package.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const promptBox = $("prompt");
const sendButton = $("send");
const stopButton = $("stop");
const statusLine = $("status");
const apiKey = $("api-key");

let model = null; // the served model's id, from /v1/models
let history = []; // {role, content} of the finished turns
let controller = null; // aborts the reply in flight (closing the connection stops its generation)

apiKey.value = localStorage.getItem("modelserve.apiKey") || "";
apiKey.addEventListener("change", () => localStorage.setItem("modelserve.apiKey", apiKey.value));

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey.value) h.Authorization = `Bearer ${apiKey.value}`;
  return h;
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `message ${role}`;
  box.dataset.testid = `message-${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  box.append(label, body);
  conversation.append(box);
  conversation.scrollTop = conversation.scrollHeight;
  return box;
}

function setMeta(box, text) {
  let meta = box.querySelector(".meta");
  if (!meta) {
    meta = document.createElement("span");
    meta.className = "meta";
    box.append(meta);
  }
  meta.textContent = text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    model = body.data[0]?.id ?? null;
    $("model").textContent = model ?? "no model";
  } catch (e) {
    $("model").textContent = `cannot list models: ${e.message}`;
  }
}

// Server-sent events: "data: {json}" blocks separated by a blank line, ending "data: [DONE]".
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data:")) yield line.slice(5).trim();
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  const body = box.querySelector(".text");
  box.classList.add("streaming");
  controller = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  statusLine.textContent = "generating…";
  const started = performance.now();
  let pieces = 0;
  let ending = "";
  // Text arrives a token at a time; it is drawn once per frame, appended as a new text node. Setting the
  // whole text on every token costs time that grows with the reply: a long one starved the page.
  const unseen = [];
  let frame = 0;
  const draw = () => {
    frame = 0;
    if (!unseen.length) return;
    body.append(unseen.join(""));
    unseen.length = 0;
    conversation.scrollTop = conversation.scrollHeight;
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model,
        messages: history,
        stream: true,
        temperature: Number($("temperature").value),
        max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of sseData(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      const choice = chunk.choices?.[0];
      const delta = choice?.delta?.content;
      if (delta) {
        unseen.push(delta);
        pieces += 1;
        frame ||= requestAnimationFrame(draw);
      }
      if (choice?.finish_reason) ending = choice.finish_reason;
    }
    statusLine.textContent = `done (${ending || "end"})`;
  } catch (e) {
    if (e.name === "AbortError") {
      ending = "stopped";
      statusLine.textContent = "stopped";
    } else {
      box.classList.add("error");
      ending = "error";
      statusLine.textContent = `error: ${e.message}`;
    }
  } finally {
    cancelAnimationFrame(frame);
    draw();
    const seconds = (performance.now() - started) / 1000;
    setMeta(box, `${pieces} pieces in ${seconds.toFixed(1)} s · ${ending}`);
    box.classList.remove("streaming");
    box.dataset.ending = ending;
    if (body.textContent) history.push({ role: "assistant", content: body.textContent });
    else history.pop(); // nothing came back: the user's turn is not kept
    controller = null;
    sendButton.disabled = false;
    stopButton.disabled = true;
    promptBox.focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = promptBox.value.trim();
  if (!text || controller) return;
  promptBox.value = "";
  send(text);
});
promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
stopButton.addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => {
  controller?.abort();
  history = [];
  conversation.replaceChildren();
  statusLine.textContent = "";
});

loadModel();
