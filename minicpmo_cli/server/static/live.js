// Live mode: a spoken conversation over WS /v1/realtime (OpenAI's Realtime protocol).
// The microphone (and, optionally, the camera) through getUserMedia; the microphone's samples leave an
// AudioWorklet in a 24 kHz AudioContext and go out as 0.2 s pcm16 appends; the answer's pcm16 deltas are
// scheduled for playback as they arrive. Speaking over an answer stops its playback (the server cancels it
// and this page tells it how much was heard). State for tests and curious users: window.minicpmoLive.
"use strict";

(() => {
  const RATE = 24000, CHUNK = RATE / 5;  // 0.2 s per append
  const live = window.minicpmoLive = {
    state: "off", appended: 0, deltas: 0, scheduledSeconds: 0, playedSeconds: 0,
    responses: 0, user: [], assistant: [], errors: [],
  };
  const WORKLET = `class Tap extends AudioWorkletProcessor {
    process(inputs) { const ch = inputs[0] && inputs[0][0]; if (ch) this.port.postMessage(ch.slice(0)); return true; }
  }
  registerProcessor("minicpmo-tap", Tap);`;
  let socket = null, context = null, media = null, pending = [], pendingLength = 0;
  let nextTime = 0, sources = [], itemId = null, itemStart = 0, cameraTimer = null;

  const panel = document.createElement("section");
  panel.id = "live-panel";
  panel.dataset.state = "off";
  panel.innerHTML = `<button id="live-toggle" type="button">Live</button>
    <label><input id="live-camera" type="checkbox"> Camera</label>
    <span id="live-status">off</span><div id="live-log"></div>`;
  document.querySelector("header").after(panel);
  const $ = (id) => document.getElementById(id);

  function setState(state) { live.state = state; panel.dataset.state = state; $("live-status").textContent = state; }

  function line(who, text) {
    const row = document.createElement("p");
    row.className = "live-" + who;
    row.textContent = (who === "user" ? "you: " : "assistant: ") + text;
    $("live-log").append(row);
    return row;
  }

  function b64(bytes) {
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    return btoa(text);
  }

  function send(event) { if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(event)); }

  function appendSamples(samples) {
    pending.push(samples); pendingLength += samples.length;
    if (pendingLength < CHUNK) return;
    const pcm = new Int16Array(pendingLength);
    let at = 0;
    for (const part of pending) for (let i = 0; i < part.length; i++) {
      pcm[at++] = Math.max(-32768, Math.min(32767, Math.round(part[i] * 32767)));
    }
    pending = []; pendingLength = 0;
    send({type: "input_audio_buffer.append", audio: b64(new Uint8Array(pcm.buffer))});
    live.appended += 1;
  }

  function play(delta) {
    const raw = atob(delta), pcm = new Int16Array(raw.length >> 1);
    for (let i = 0; i < pcm.length; i++) pcm[i] = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
    const buffer = context.createBuffer(1, pcm.length, RATE), data = buffer.getChannelData(0);
    for (let i = 0; i < pcm.length; i++) data[i] = pcm[i] / 32768;
    const source = context.createBufferSource();
    source.buffer = buffer; source.connect(context.destination);
    nextTime = Math.max(nextTime, context.currentTime);
    source.start(nextTime);
    nextTime += buffer.duration;
    live.scheduledSeconds += buffer.duration;
    source.onended = () => { live.playedSeconds += buffer.duration; sources = sources.filter((s) => s !== source); };
    sources.push(source);
  }

  function interrupt() {  // the user speaks over the answer: stop playing, say what was heard
    if (!sources.length || !itemId) return;
    const heard = Math.max(0, Math.round((context.currentTime - itemStart) * 1000));
    for (const s of sources) { try { s.stop(); } catch (e) { /* already ended */ } }
    sources = []; nextTime = context.currentTime;
    send({type: "conversation.item.truncate", item_id: itemId, content_index: 0, audio_end_ms: heard});
  }

  let answerLine = null;
  function onEvent(event) {
    switch (event.type) {
      case "input_audio_buffer.speech_started": interrupt(); setState("listening"); break;
      case "input_audio_buffer.speech_stopped": setState("thinking"); break;
      case "response.created": answerLine = null; itemId = null; break;
      case "response.output_item.added": itemId = event.item.id; itemStart = Math.max(nextTime, context.currentTime); break;
      case "response.output_audio.delta": live.deltas += 1; setState("speaking"); play(event.delta); break;
      case "response.output_audio_transcript.delta":
        if (!answerLine) { answerLine = line("assistant", ""); live.assistant.push(""); }
        answerLine.textContent += event.delta;
        live.assistant[live.assistant.length - 1] += event.delta;
        break;
      case "response.done": live.responses += 1; setState("on"); break;
      case "conversation.item.input_audio_transcription.completed": live.user.push(event.transcript); line("user", event.transcript); break;
      case "error": live.errors.push(event.error.message); line("assistant", "(error) " + event.error.message); break;
    }
  }

  function sendFrame(video) {
    if (!video.videoWidth) return;
    const canvas = document.createElement("canvas");
    const scale = Math.min(1, 448 / Math.max(video.videoWidth, video.videoHeight));
    canvas.width = Math.round(video.videoWidth * scale); canvas.height = Math.round(video.videoHeight * scale);
    canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
    send({type: "conversation.item.create", item: {type: "message", role: "user",
      content: [{type: "input_image", image_url: canvas.toDataURL("image/jpeg", 0.8)}]}});
  }

  async function start() {
    setState("starting");
    const camera = $("live-camera").checked;
    media = await navigator.mediaDevices.getUserMedia({audio: {channelCount: 1, echoCancellation: true}, video: camera});
    context = new AudioContext({sampleRate: RATE});
    await context.audioWorklet.addModule(URL.createObjectURL(new Blob([WORKLET], {type: "application/javascript"})));
    const tap = new AudioWorkletNode(context, "minicpmo-tap");
    tap.port.onmessage = (message) => appendSamples(message.data);
    context.createMediaStreamSource(media).connect(tap);
    const key = ($("api-key") && $("api-key").value.trim()) || "";
    const url = location.origin.replace(/^http/, "ws") + "/v1/realtime";
    socket = new WebSocket(url, key ? ["realtime", "openai-insecure-api-key." + key] : ["realtime"]);
    socket.onmessage = (message) => onEvent(JSON.parse(message.data));
    socket.onclose = () => stop();
    socket.onopen = () => {
      send({type: "session.update", session: {type: "realtime", audio: {input: {turn_detection:
        {type: "server_vad", silence_duration_ms: 500, interrupt_response: true}}}}});
      setState("on");
      if (camera) {
        const video = document.createElement("video");
        video.srcObject = media; video.muted = true; video.play();
        cameraTimer = setInterval(() => sendFrame(video), 1000);
      }
    };
    $("live-toggle").textContent = "Stop";
  }

  function stop() {
    if (cameraTimer) clearInterval(cameraTimer);
    cameraTimer = null;
    if (socket && socket.readyState <= WebSocket.OPEN) socket.close();
    if (media) media.getTracks().forEach((t) => t.stop());
    if (context) context.close();
    socket = media = context = null; sources = []; nextTime = 0;
    setState("off");
    $("live-toggle").textContent = "Live";
  }

  $("live-toggle").addEventListener("click", () => {
    if (live.state === "off") start().catch((e) => { live.errors.push(String(e)); line("assistant", "(error) " + e); stop(); });
    else stop();
  });
})();
