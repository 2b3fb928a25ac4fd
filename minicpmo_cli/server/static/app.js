// The chat page: plain JavaScript over the server's own /v1 routes (no build step, nothing from a CDN).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // the conversation, as OpenAI messages
let pending = [];            // content parts waiting for the next message
const previews = new WeakMap();  // content part -> {name, url}: what the user's bubble shows for it
let modelId = null;
let recorder = null;

function headers() {
  const key = $("api-key").value.trim();
  const h = { "Content-Type": "application/json" };
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text || "";
  div.appendChild(body);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

function partLabel(part) {
  const name = previews.has(part) ? previews.get(part).name : "";
  if (part.type === "image_url") return "image";
  if (part.type === "video_url") return "video " + name;
  return "audio " + (name || "(" + part.input_audio.format + ")");
}

function showAttachments() {
  $("attachments").replaceChildren(...pending.map((part) => {
    const span = document.createElement("span");
    span.textContent = partLabel(part);
    return span;
  }));
}

// What the user's bubble shows of an attached part: the picture, or a labelled player for sound and video.
function partPreview(part) {
  if (part.type === "image_url") {
    const img = document.createElement("img");
    img.src = part.image_url.url;
    return img;
  }
  const figure = document.createElement("figure");
  const player = document.createElement(part.type === "video_url" ? "video" : "audio");
  player.controls = true;
  player.src = part.type === "video_url" ? part.video_url.url : previews.get(part).url;
  const caption = document.createElement("figcaption");
  caption.textContent = partLabel(part);
  figure.append(player, caption);
  return figure;
}

async function addImages(files) {
  for (const file of files) pending.push({ type: "image_url", image_url: { url: await readAsDataURL(file) } });
  showAttachments();
}

async function addAudio(blob, name) {
  const url = await readAsDataURL(blob);
  const format = (name.split(".").pop() || "wav").toLowerCase();
  const part = { type: "input_audio", input_audio: { data: url.split(",")[1], format: format } };
  const type = blob.type || "audio/" + format;  // a file of unknown type still gets a player
  previews.set(part, { name: name, url: "data:" + type + ";base64," + part.input_audio.data });
  pending.push(part);
  showAttachments();
}

async function addVideo(file) {
  const part = { type: "video_url", video_url: { url: await readAsDataURL(file) } };
  previews.set(part, { name: file.name, url: part.video_url.url });
  pending.push(part);
  showAttachments();
}

async function toggleRecording() {
  if (recorder) { recorder.stop(); return; }
  let stream;
  try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); }
  catch (err) { bubble("error", "microphone: " + err.message); return; }
  const chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.ondataavailable = (event) => chunks.push(event.data);
  recorder.onstop = async () => {
    stream.getTracks().forEach((track) => track.stop());
    const type = recorder.mimeType || "audio/webm";
    recorder = null;
    $("record").classList.remove("on");
    $("record").textContent = "Record";
    await addAudio(new Blob(chunks, { type: type }), "recording." + (type.includes("ogg") ? "ogg" : "webm"));
  };
  recorder.start();
  $("record").classList.add("on");
  $("record").textContent = "Stop";
}

// pcm16 mono 24 kHz chunks -> a playable wav Blob
function wavBlob(chunks, rate) {
  const size = chunks.reduce((n, c) => n + c.length, 0);
  const buffer = new ArrayBuffer(44 + size);
  const view = new DataView(buffer);
  const text = (offset, s) => [...s].forEach((ch, i) => view.setUint8(offset + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + size, true); text(8, "WAVE"); text(12, "fmt ");
  view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, size, true);
  let offset = 44;
  for (const chunk of chunks) { new Uint8Array(buffer, offset, chunk.length).set(chunk); offset += chunk.length; }
  return new Blob([buffer], { type: "audio/wav" });
}

function base64Bytes(data) {
  const raw = atob(data);
  const bytes = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
  return bytes;
}

// Reads an SSE response, calling onEvent with each parsed `data:` object until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text && !pending.length) return;
  const content = [...pending];
  if (text) content.push({ type: "text", text: text });
  const shown = bubble("user", text);
  for (const part of pending) shown.appendChild(partPreview(part));
  pending = [];
  showAttachments();
  $("prompt").value = "";
  history.push({ role: "user", content: content });
  const speak = $("speak").checked;
  const answer = bubble("assistant", "");
  answer.dataset.state = "streaming";
  $("send").disabled = true;
  try {
    const body = { model: modelId, messages: history, stream: true };
    const maxTokens = parseInt($("max-tokens").value, 10);
    const seed = parseInt($("seed").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    if (!Number.isNaN(seed)) body.seed = seed;
    if (speak) { body.modalities = ["text", "audio"]; body.audio = { voice: "alloy", format: "pcm16" }; }
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!response.ok) {
      const problem = await response.json().catch(() => ({}));
      throw new Error((problem.error && problem.error.message) || response.statusText);
    }
    let said = "";
    const pcm = [];
    await readEvents(response, (data) => {
      if (data.error) throw new Error(data.error.message);
      const delta = data.choices && data.choices[0] && data.choices[0].delta;
      if (!delta) return;
      if (delta.content) said += delta.content;
      if (delta.audio && delta.audio.transcript) said += delta.audio.transcript;
      if (delta.audio && delta.audio.data) pcm.push(base64Bytes(delta.audio.data));
      answer.querySelector(".text").textContent = said;
    });
    history.push({ role: "assistant", content: said });
    if (pcm.length) {
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.src = URL.createObjectURL(wavBlob(pcm, 24000));
      answer.appendChild(audio);
    }
    answer.dataset.state = "done";
  } catch (err) {
    history.pop();
    answer.className = "message error";
    answer.querySelector(".text").textContent = "error: " + err.message;
    answer.dataset.state = "error";
  } finally {
    $("send").disabled = false;
  }
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const data = await response.json();
    if (!response.ok) throw new Error(data.error ? data.error.message : response.statusText);
    modelId = data.data[0].id;
    $("model").textContent = modelId;
  } catch (err) {
    $("model").textContent = "(" + err.message + ")";
  }
}

$("api-key").value = localStorage.getItem("minicpmo-api-key") || "";
$("api-key").addEventListener("change", () => { localStorage.setItem("minicpmo-api-key", $("api-key").value); loadModel(); });
$("composer").addEventListener("submit", send);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("composer").requestSubmit(); }
});
$("image-input").addEventListener("change", (event) => addImages(event.target.files));
$("audio-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) addAudio(file, file.name);
});
$("video-input").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) addVideo(file);
});
$("record").addEventListener("click", toggleRecording);
$("clear").addEventListener("click", () => { history.length = 0; $("log").replaceChildren(); });
loadModel();
