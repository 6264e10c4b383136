// The operator dashboard: polls /v1/dashboard every second, keeps two minutes of
// points in memory and draws them as SVG polylines (no libraries).
"use strict";
(function () {
  const POINTS = 120;
  const series = { sessions: [], busy: [], queue: [], latency: [], rtf: [], refused: [] };
  let lastRefused = null;

  const el = (k) => document.querySelector('[data-k="' + k + '"]');
  const set = (k, text) => { const e = el(k); if (e) e.textContent = text; };
  const num = (v, digits) => (v == null ? "–" : Number(v).toFixed(digits || 0));
  const ms = (v) => (v == null ? "–" : v >= 1000 ? (v / 1000).toFixed(2) + " s" : Math.round(v) + " ms");

  function push(name, value) {
    const s = series[name];
    s.push(value == null ? null : Number(value));
    if (s.length > POINTS) s.shift();
  }

  function draw(name, limit) {
    const svg = document.querySelector('svg[data-chart="' + name + '"]');
    if (!svg) return;
    const values = series[name];
    const top = Math.max(1e-9, limit || 0, ...values.filter((v) => v != null)) * 1.1;
    const x0 = POINTS - values.length;
    const pts = values.map((v, i) => v == null ? null : (x0 + i) + "," + (30 - (v / top) * 28 - 1).toFixed(2)).filter(Boolean);
    let inner = '<polyline points="' + pts.join(" ") + '"/>';
    if (limit) { const y = (30 - (limit / top) * 28 - 1).toFixed(2); inner += '<line class="limit" x1="0" x2="120" y1="' + y + '" y2="' + y + '"/>'; }
    svg.innerHTML = inner;
  }

  function render(d) {
    document.getElementById("edge").textContent = "edge " + (d.edge_id || "?");
    const adm = document.getElementById("admitting");
    if (d.admitting) {
      adm.className = "notice " + (d.admitting.ok ? "ok" : "error");
      adm.textContent = d.admitting.ok ? "Admitting new sessions." : "Refusing new sessions: " + d.admitting.reason + " – " + d.admitting.message;
    } else {
      adm.className = "notice warn";
      adm.textContent = "The edge is not connected to NATS yet.";
    }
    const sessions = d.sessions || {};
    set("sessions", num(sessions.active));
    set("sessions-sub", (sessions.admitted || 0) + " admitted, " + (sessions.resumed || 0) + " resumed since start");
    push("sessions", sessions.active);

    const w = d.workers || {};
    set("workers", (w.alive == null ? "–" : w.alive) + " / " + (w.busy == null ? "–" : w.busy));
    const engines = (d.decoding && d.decoding.engines) || [];
    set("workers-sub", engines.length ? "engines: " + engines.join(", ") : "no results in the last minute");
    push("busy", w.busy);

    const q = d.queue || {};
    const depth = q.pending == null ? null : q.pending + q.in_flight;
    set("queue", num(depth));
    set("queue-sub", q.pending == null ? "" : q.pending + " waiting, " + q.in_flight + " in flight, " + q.interims_waiting +
      " interim looks; refuses at " + q.high_water + (q.full ? " (FULL)" : "") + "; " + (q.bytes / 1024).toFixed(0) + " KiB stored");
    push("queue", depth);

    const lat = d.latency_ms || {};
    set("latency", lat.p50 == null ? "–" : ms(lat.p50) + " p50");
    set("latency-sub", "p90 " + ms(lat.p90) + " · p99 " + ms(lat.p99) + " · " + (lat.count || 0) + " finals");
    push("latency", lat.p90);

    const dec = d.decoding || {};
    const rtf = dec.rtf || {};
    set("rtf", rtf.p50 == null ? "–" : num(rtf.p50, 3) + " p50");
    set("rtf-sub", "p90 " + num(rtf.p90, 3) + " · " + (dec.decoded || 0) + " decoded/min · " + num(dec.audio_s_per_s, 2) +
      " s audio/s · inference p50 " + ms(dec.inference_ms && dec.inference_ms.p50));
    push("rtf", rtf.p50);

    const refused = d.refused || {};
    const total = Object.values(refused).reduce((a, b) => a + b, 0);
    set("refused", String(total));
    const rows = Object.entries(refused).sort((a, b) => b[1] - a[1]).map(([reason, n]) => {
      const tr = document.createElement("tr");
      const a = tr.appendChild(document.createElement("td")); a.textContent = reason;
      const b = tr.appendChild(document.createElement("td")); b.textContent = String(n);
      return tr;
    });
    el("refused-table").replaceChildren(...rows);
    push("refused", lastRefused == null ? 0 : Math.max(0, total - lastRefused));
    lastRefused = total;

    set("faults", num(q.dead_letters) + " / " + num(q.redelivered));
    set("faults-sub", (dec.errors || 0) + " error results in the last minute");

    draw("sessions"); draw("busy", w.alive); draw("queue", q.high_water); draw("latency"); draw("rtf", 1); draw("refused");
  }

  async function tick() {
    try {
      const r = await fetch("/v1/dashboard", { cache: "no-store" });
      render(await r.json());
    } catch (e) {
      const adm = document.getElementById("admitting");
      adm.className = "notice error";
      adm.textContent = "The edge does not answer (" + (e && e.message ? e.message : e) + "); retrying every second.";
    }
  }
  (async function loop() { await tick(); setTimeout(loop, 1000); })();
})();
