// The talk page: microphone or WAV file -> 16 kHz PCM -> GET /v1/stream -> transcript.
//
// Protocol (README "Device protocol"): binary frames are s16le PCM; text frames are
// JSON events (SessionStarted, SpeechStarted, SpeechEnded, Interim, Final, Error,
// Overloaded). A socket lost mid-session is resumed with
// ?resume=<resume_token>&last_segment=<last Final's segment>. A refused upgrade
// cannot be read from a WebSocket, so the page asks GET /v1/admission why.
"use strict";
(function () {
  const RATE = 16000, FRAME = 1600; // 100 ms frames
  const RESUME_FOR_MS = 5 * 60 * 1000; // the server's resume window
  const OFFLINE_FRAMES = 100; // audio kept while reconnecting: 10 s
  const NO_RESUME = new Set([1000, 1007, 1008, 1009, 4008]);
  const CLOSE_TEXT = { 1001: "the server is restarting", 1006: "the connection dropped", 1007: "the server could not read the audio",
    1008: "the session ended (time limit, or resumed elsewhere)", 1009: "a frame was too large", 1011: "server error", 4008: "no audio for too long" };

  const $ = (id) => document.getElementById(id);
  const micBtn = $("mic"), statusEl = $("status"), notice = $("notice"), transcript = $("transcript");
  const speaking = $("speaking"), meter = $("meter"), meterBar = $("meterbar"), upload = $("upload");

  // --- what is on screen ----------------------------------------------------------
  function setStatus(text) { statusEl.textContent = text; }
  function say(kind, title, detail) {
    notice.className = "notice " + (kind || "");
    notice.replaceChildren();
    if (!title) return;
    const strong = document.createElement("strong");
    strong.textContent = title;
    notice.appendChild(strong);
    if (detail) notice.appendChild(document.createTextNode(detail));
  }
  function setSpeaking(on, text) {
    speaking.classList.toggle("on", on);
    speaking.textContent = text || (on ? "Speaking" : "Listening");
  }
  function setLevel(level) {
    const pct = Math.min(100, Math.round(level * 400));
    meterBar.style.width = pct + "%";
    meter.setAttribute("aria-valuenow", String(pct));
  }
  function fmtTime(ms) {
    const s = Math.max(0, Math.round((Number(ms) || 0) / 100)) / 10;
    return String(Math.floor(s / 60)).padStart(2, "0") + ":" + (s % 60).toFixed(1).padStart(4, "0");
  }
  function atBottom() { return transcript.scrollHeight - transcript.scrollTop - transcript.clientHeight < 40; }
  function systemLine(text) {
    const div = document.createElement("div");
    div.className = "utt sys";
    div.textContent = text;
    transcript.appendChild(div);
  }

  // --- a session: one socket at a time, resumed when it drops ---------------------
  let s = null; // the current session, or null

  function newSession(kind) {
    return { kind, ws: null, id: "", resumeToken: "", lastFinal: -1, lines: new Map(), sent: [], samples: 0,
      offline: [], lostFrames: 0, stopping: false, resuming: false, lostAt: 0, attempts: 0, timer: 0,
      keepAlive: 0, lastSend: 0, finals: 0, done: null, opened: false, live: false };
  }

  function streamUrl(sess) {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    const q = new URLSearchParams({ sample_rate: String(RATE), encoding: "linear16" });
    if (sess.kind === "file") q.set("pace", "fast");
    if (!$("interims").checked) q.set("interim_results", "false");
    const token = $("token").value.trim();
    if (token) q.set("token", token);
    if (sess.resuming && sess.resumeToken) {
      q.set("resume", sess.resumeToken);
      q.set("last_segment", String(sess.lastFinal));
    }
    return proto + "//" + location.host + "/v1/stream?" + q.toString();
  }

  function connect(sess) {
    const ws = new WebSocket(streamUrl(sess));
    ws.binaryType = "arraybuffer";
    sess.ws = ws;
    sess.opened = false;
    sess.live = false; // audio flows once SessionStarted says the session is on
    ws.onopen = () => {
      sess.opened = true;
      sess.lastSend = performance.now();
      clearInterval(sess.keepAlive);
      sess.keepAlive = setInterval(() => {
        if (ws.readyState === WebSocket.OPEN && performance.now() - sess.lastSend > 4000) sendJson(sess, { type: "KeepAlive" });
      }, 1000);
    };
    ws.onmessage = (ev) => { if (typeof ev.data === "string") onEvent(sess, ev.data); };
    ws.onclose = (ev) => onClose(sess, ws, ev);
  }

  function sendJson(sess, obj) {
    if (sess.ws && sess.ws.readyState === WebSocket.OPEN) { sess.ws.send(JSON.stringify(obj)); sess.lastSend = performance.now(); }
  }

  function sendPcm(sess, buffer) {
    const ws = sess.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || !sess.live) {
      if (sess.kind === "mic" && !sess.stopping) { // reconnecting: keep the last seconds
        sess.offline.push(buffer);
        if (sess.offline.length > OFFLINE_FRAMES) { sess.offline.shift(); sess.lostFrames++; }
      }
      return;
    }
    ws.send(buffer);
    sess.samples += buffer.byteLength / 2;
    sess.lastSend = performance.now();
    sess.sent.push([sess.samples / (RATE / 1000), sess.lastSend]);
    if (sess.sent.length > 20000) sess.sent.splice(0, 10000);
  }

  function sentAt(sess, ms) { // when the audio up to `ms` on the timeline left this page
    const sent = sess.sent;
    let lo = 0, hi = sent.length - 1, found = -1;
    while (lo <= hi) { const mid = (lo + hi) >> 1; if (sent[mid][0] >= ms) { found = mid; hi = mid - 1; } else lo = mid + 1; }
    return found < 0 ? null : sent[found][1];
  }

  function onEvent(sess, data) {
    let msg;
    try { msg = JSON.parse(data); } catch (e) { return; }
    switch (msg.type) {
      case "SessionStarted": {
        const resumed = sess.resuming && msg.session_id === sess.id;
        sess.id = msg.session_id; sess.resumeToken = msg.resume_token || ""; sess.live = true;
        sess.resuming = false; sess.attempts = 0; sess.lostAt = 0;
        if (resumed) {
          say("ok", "Reconnected.", " The session goes on where it stopped" +
            (sess.lostFrames ? "; " + (sess.lostFrames / 10).toFixed(1) + " s of audio from the outage could not be kept." : "."));
        } else {
          if (sess.kind === "file") say("", "");
          else systemLine("— microphone session, " + new Date().toLocaleTimeString() + " —");
        }
        if (sess.kind === "mic") { setStatus("Listening. Session " + sess.id + "."); setSpeaking(false); }
        const backlog = sess.offline.splice(0);
        sess.lostFrames = 0;
        backlog.forEach((b) => sendPcm(sess, b));
        if (sess.kind === "file" && sess.onStarted) { const go = sess.onStarted; sess.onStarted = null; go(); }
        break;
      }
      case "SpeechStarted": if (sess.kind === "mic") setSpeaking(true); break;
      case "SpeechEnded": if (sess.kind === "mic") setSpeaking(false); break;
      case "Interim": showUtterance(sess, msg, false); break;
      case "Final":
        sess.lastFinal = Math.max(sess.lastFinal, msg.segment);
        sess.finals++;
        showUtterance(sess, msg, true);
        break;
      case "Error":
        say("error", "The server reported an error" + (msg.code ? " (" + msg.code + ")" : "") + ".",
          " " + (msg.message || "") + (msg.segment != null ? " Segment " + msg.segment + "." : ""));
        break;
      case "Overloaded":
        say("warn", "The server is overloaded.", " " + (msg.message || "Part of what you said was not transcribed.") +
          (msg.segment != null ? " Segment " + msg.segment + "." : ""));
        break;
      default: break;
    }
  }

  function showUtterance(sess, msg, final) {
    const stick = atBottom();
    let line = sess.lines.get(msg.segment);
    if (line && line.final && !final) return; // a late interim never replaces its Final
    if (!line) {
      const div = document.createElement("div");
      const ts = div.appendChild(document.createElement("span"));
      const text = div.appendChild(document.createElement("span"));
      const lat = div.appendChild(document.createElement("span"));
      ts.className = "ts"; text.className = "text"; lat.className = "lat";
      transcript.appendChild(div);
      line = { div, ts, text, lat, final: false };
      sess.lines.set(msg.segment, line);
    }
    line.ts.textContent = fmtTime(msg.start_ms);
    line.text.replaceChildren();
    if (final) {
      line.final = true;
      line.div.className = "utt final";
      line.text.textContent = msg.text || "";
      if (!(msg.text || "").trim()) { line.div.remove(); return; }
      const words = Array.isArray(msg.words) ? msg.words : [];
      const spoken = words.length ? words[words.length - 1].end_ms : msg.end_ms;
      const left = sentAt(sess, spoken);
      const parts = [];
      if (left != null && sess.kind === "mic") parts.push(Math.round(performance.now() - left) + " ms");
      if (msg.inference_ms != null) parts.push("inference " + Math.round(msg.inference_ms) + " ms");
      line.lat.textContent = parts.join(" · ");
      line.lat.title = "From the end of the last word leaving this page to its final text here; " +
        "inference is the model's share. Engine: " + (msg.engine || "?");
    } else {
      line.div.className = "utt interim";
      const words = Array.isArray(msg.words) && msg.words.length ? msg.words.map((w) => w.word.trim()) : (msg.text || "").trim().split(/\s+/);
      const stable = Math.min(words.length, msg.stable_prefix || 0);
      const a = line.text.appendChild(document.createElement("span"));
      a.className = "stable"; a.textContent = words.slice(0, stable).join(" ");
      line.text.appendChild(document.createTextNode((stable ? " " : "") + words.slice(stable).join(" ")));
    }
    if (stick) transcript.scrollTop = transcript.scrollHeight;
  }

  // The server refused the upgrade, or could not be reached: ask why.
  async function whyRefused() {
    const q = new URLSearchParams();
    const token = $("token").value.trim();
    if (token) q.set("token", token);
    try {
      const r = await fetch("/v1/admission?" + q.toString(), { cache: "no-store" });
      const body = await r.json().catch(() => ({}));
      if (r.ok) return { admitted: true };
      return { admitted: false, status: r.status, reason: body.reason || "refused", message: body.message || "",
        retryAfter: Number(r.headers.get("Retry-After")) || body.retry_after || 5 };
    } catch (e) {
      return { unreachable: true };
    }
  }

  const REFUSAL_HELP = {
    no_workers: "No transcription worker is running. Start one (escapement up starts one), then press Start again.",
    queue_full: "The transcription queue is full. Wait a few seconds and try again.",
    at_capacity: "The server already serves as many sessions as its workers can keep up with. Try again shortly.",
    too_many_connections: "Too many connections are open. Try again shortly.",
    draining: "The server is shutting down. Try again in a moment.",
    missing_credentials: "The server needs a token or API key: open Settings and paste one.",
    invalid_credentials: "The token or API key was not accepted. Check it in Settings.",
    expired_token: "The token has expired. Mint a new one (escapement token mint) and paste it in Settings.",
  };

  async function onClose(sess, ws, ev) {
    if (sess.ws !== ws) return;
    clearInterval(sess.keepAlive);
    sess.ws = null;
    sess.live = false;
    if (s !== sess) return;
    if (sess.stopping || ev.code === 1000) { finish(sess, ev.code === 1000 ? "" : null); return; }
    if (!sess.opened) { // refused, or nothing answered
      const why = await whyRefused();
      if (s !== sess) return;
      if (sess.resuming || sess.lostAt) {
        if (why.admitted && sess.resumeToken) { // admitted, so the resume itself was refused (expired)
          sess.resumeToken = ""; sess.id = ""; sess.resuming = false;
          say("warn", "The session could not be resumed; a new one starts.", " Text already shown stays.");
          connect(sess);
          return;
        }
        retry(sess, why);
        return;
      }
      refused(sess, why);
      return;
    }
    const text = CLOSE_TEXT[ev.code] || "the connection closed (" + ev.code + ")";
    if (NO_RESUME.has(ev.code) || sess.kind === "file" || !sess.resumeToken) {
      say("error", "Disconnected: " + text + ".", ev.reason ? " " + ev.reason : "");
      finish(sess, null);
      return;
    }
    sess.lostAt = sess.lostAt || performance.now();
    retry(sess, { unreachable: ev.code === 1006 });
  }

  function retry(sess, why) {
    if (performance.now() - sess.lostAt > RESUME_FOR_MS) {
      say("error", "Connection lost.", " The server did not come back within 5 minutes; press Start to begin a new session.");
      finish(sess, null);
      return;
    }
    sess.attempts++;
    const wait = why && why.retryAfter ? why.retryAfter * 1000 : Math.min(10000, 500 * 2 ** Math.min(5, sess.attempts - 1));
    const because = why && why.reason ? " (" + why.reason + (why.message ? ": " + why.message : "") + ")" : "";
    say("warn", "Connection lost" + because + ".", " Reconnecting in " + Math.round(wait / 1000) +
      " s (attempt " + sess.attempts + "); the session resumes where it stopped.");
    setStatus("Reconnecting…");
    setSpeaking(false, "Offline");
    sess.resuming = true;
    clearTimeout(sess.timer);
    sess.timer = setTimeout(() => { if (s === sess && !sess.stopping) connect(sess); }, wait);
  }

  function refused(sess, why) {
    if (why.unreachable) {
      say("error", "The server cannot be reached.", " Check that Escapement is running (escapement up) and reload this page.");
    } else if (why.admitted) {
      say("error", "The connection failed.", " The server admits sessions now; press Start to try again.");
    } else {
      const help = REFUSAL_HELP[why.reason] || (why.message ? why.message + "." : "");
      const later = why.status === 503 || why.status === 429 ? " (The server suggests retrying after " + why.retryAfter + " s.)" : "";
      say("error", "The server refused the session: " + why.reason + ".", " " + help + later);
    }
    finish(sess, null);
  }

  function finish(sess, note) {
    clearTimeout(sess.timer);
    clearInterval(sess.keepAlive);
    if (sess.ws) { try { sess.ws.close(1000); } catch (e) { /* already closed */ } }
    stopAudio();
    if (s === sess) s = null;
    if (sess.kind === "file") {
      upload.disabled = false; micBtn.disabled = false;
      if (note != null) setStatus("File done: " + sess.finals + " final(s).");
    } else {
      setStatus(note != null ? "Stopped." : "Idle.");
    }
    micUi(false);
    if (sess.done) sess.done();
  }

  // --- microphone ---------------------------------------------------------------
  let audio = null;

  async function startAudio(sess) {
    if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia)
      throw Object.assign(new Error("insecure"), { name: "InsecureContext" });
    const ctx = new (window.AudioContext || window.webkitAudioContext)();
    audio = { ctx, stream: null, node: null, src: null };
    try {
      audio.stream = await navigator.mediaDevices.getUserMedia({
        audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true } });
      if (ctx.state === "suspended") await ctx.resume();
      await ctx.audioWorklet.addModule("/static/pcm-worklet.js");
      const node = new AudioWorkletNode(ctx, "pcm-downsampler", {
        numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1, channelCountMode: "explicit",
        processorOptions: { targetRate: RATE, frameSamples: FRAME } });
      node.port.onmessage = (ev) => { setLevel(ev.data.level); sendPcm(sess, ev.data.pcm); };
      audio.src = ctx.createMediaStreamSource(audio.stream);
      audio.src.connect(node);
      audio.node = node;
    } catch (e) { stopAudio(); throw e; }
  }

  function stopAudio() {
    const a = audio; audio = null;
    if (!a) return;
    if (a.node) { a.node.port.postMessage("stop"); a.node.disconnect(); }
    if (a.src) a.src.disconnect();
    if (a.stream) a.stream.getTracks().forEach((t) => t.stop());
    a.ctx.close().catch(() => {});
    setLevel(0);
  }

  function micUi(live) {
    micBtn.textContent = live ? "Stop" : "Start";
    micBtn.classList.toggle("stop", live);
    micBtn.setAttribute("aria-pressed", String(live));
    upload.disabled = live;
    if (!live) setSpeaking(false, "Not listening");
  }

  const MIC_HELP = {
    NotAllowedError: ["Microphone access was denied.", " Allow the microphone for this site (the icon by the address bar), then press Start again."],
    SecurityError: ["Microphone access was denied.", " Allow the microphone for this site, then press Start again."],
    NotFoundError: ["No microphone was found.", " Plug one in, or transcribe a WAV file below."],
    NotReadableError: ["The microphone is busy or unavailable.", " Close other programs using it and press Start again."],
    InsecureContext: ["The microphone needs a secure page.", " Open this page as https:// or on http://localhost."],
  };

  async function startMic() {
    const sess = newSession("mic");
    s = sess;
    micUi(true);
    say("", "");
    setStatus("Asking for the microphone…");
    try {
      await startAudio(sess);
    } catch (e) {
      const [title, detail] = MIC_HELP[e && e.name] || ["The microphone could not be started.", " " + (e && e.message ? e.message : e)];
      say("error", title, detail);
      s = null; micUi(false); setStatus("Idle.");
      return;
    }
    if (s !== sess) return;
    setStatus("Connecting…");
    connect(sess);
  }

  function stopMic() {
    const sess = s;
    if (!sess) return;
    sess.stopping = true;
    stopAudio();
    micBtn.disabled = true;
    if (!sess.ws || sess.ws.readyState !== WebSocket.OPEN) { micBtn.disabled = false; finish(sess, ""); return; }
    setStatus("Finishing: waiting for the last words…");
    sendJson(sess, { type: "CloseStream" });
    sess.done = () => { micBtn.disabled = false; };
    sess.timer = setTimeout(() => finish(sess, ""), 15000);
  }

  micBtn.addEventListener("click", () => { if (s && s.kind === "mic") stopMic(); else if (!s) startMic(); });

  // --- a WAV file through the same path -----------------------------------------
  async function decodeTo16k(file) {
    const bytes = await file.arrayBuffer();
    const probe = new OfflineAudioContext(1, 1, RATE); // decodeAudioData resamples to the context's rate
    const decoded = await probe.decodeAudioData(bytes);
    const n = decoded.length, out = new Int16Array(n), chans = decoded.numberOfChannels;
    const data = []; for (let c = 0; c < chans; c++) data.push(decoded.getChannelData(c));
    for (let i = 0; i < n; i++) {
      let v = 0; for (let c = 0; c < chans; c++) v += data[c][i];
      v = Math.max(-1, Math.min(1, v / chans));
      out[i] = v < 0 ? v * 0x8000 : v * 0x7fff;
    }
    return out;
  }

  async function sendFile(sess, pcm) {
    const total = pcm.length;
    for (let at = 0; at < total; at += FRAME) {
      if (s !== sess || !sess.ws || sess.ws.readyState !== WebSocket.OPEN) return;
      while (sess.ws && sess.ws.bufferedAmount > 512 * 1024) await new Promise((r) => setTimeout(r, 20));
      sendPcm(sess, pcm.slice(at, Math.min(total, at + FRAME)).buffer);
      if ((at / FRAME) % 50 === 0) setStatus("Sending the file: " + Math.round((100 * at) / total) + "%…");
    }
    setStatus("File sent; waiting for the last finals…");
    sess.stopping = true;
    sendJson(sess, { type: "CloseStream" });
  }

  upload.addEventListener("change", async () => {
    const file = upload.files && upload.files[0];
    if (!file || s) return;
    upload.disabled = true; micBtn.disabled = true;
    say("", "");
    setStatus("Reading " + file.name + "…");
    let pcm;
    try { pcm = await decodeTo16k(file); } catch (e) {
      say("error", "That file could not be read as audio.", " Choose a WAV file (16-bit PCM works everywhere).");
      upload.disabled = false; micBtn.disabled = false; setStatus("Idle."); upload.value = "";
      return;
    }
    const sess = newSession("file");
    s = sess;
    systemLine("— " + file.name + ", " + (pcm.length / RATE).toFixed(1) + " s —");
    sess.onStarted = () => sendFile(sess, pcm);
    sess.done = () => { upload.value = ""; };
    setStatus("Connecting…");
    connect(sess);
  });

  window.addEventListener("beforeunload", () => { if (s && s.ws) s.ws.close(1000); });
})();
