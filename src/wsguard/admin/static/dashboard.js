"use strict";
// The live dashboard: one snapshot a second over /dashboard/live.
// Every value from the server is written with textContent, never as HTML.
(() => {
  const HISTORY = 60;
  const series = { messages: [], handshakes: [], refusals: {} };
  const $ = (id) => document.getElementById(id);

  function push(list, value) {
    list.push(value);
    if (list.length > HISTORY) list.shift();
  }

  function draw(canvas, values, color) {
    const ctx = canvas.getContext("2d");
    const w = canvas.width, h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    const max = Math.max(1, ...values);
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => {
      const x = (i / (HISTORY - 1)) * w;
      const y = h - 2 - (v / max) * (h - 6);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
    ctx.fillStyle = "#8a96a3";
    ctx.font = "10px system-ui";
    ctx.fillText(String(max), 2, 10);
  }

  function row(cells, className) {
    const tr = document.createElement("tr");
    if (className) tr.className = className;
    for (const cell of cells) {
      const td = document.createElement("td");
      td.textContent = cell === undefined || cell === null ? "" : String(cell);
      tr.appendChild(td);
    }
    return tr;
  }

  function fill(tableId, rows) {
    const body = $(tableId).querySelector("tbody");
    body.replaceChildren(...rows);
  }

  function clock(seconds) {
    return new Date(seconds * 1000).toLocaleTimeString();
  }

  function refusalChart(category) {
    let figure = document.querySelector(`figure[data-reason="${CSS.escape(category)}"]`);
    if (!figure) {
      figure = document.createElement("figure");
      figure.dataset.reason = category;
      const canvas = document.createElement("canvas");
      canvas.width = 160;
      canvas.height = 40;
      const caption = document.createElement("figcaption");
      figure.append(canvas, caption);
      $("refusal-charts").appendChild(figure);
    }
    return figure;
  }

  function render(s) {
    $("node").textContent = `node ${s.node}`;
    const status = $("status");
    status.textContent = s.ready ? "ready" : `not ready (${s.not_ready_reason})`;
    status.className = "status " + (s.ready ? "ok" : "bad");
    $("connections").textContent = s.connections;
    $("message-rate").textContent = s.rates.messages;
    $("handshake-rate").textContent = s.rates.handshakes;
    const refusalRate = Object.values(s.rates.refusals).reduce((a, b) => a + b, 0);
    $("refusal-rate").textContent = Math.round(refusalRate * 100) / 100;
    const refusalTotal = Object.values(s.totals.refusals).reduce((a, b) => a + b, 0);
    $("refusal-total").textContent = refusalTotal;

    push(series.messages, s.rates.messages);
    push(series.handshakes, s.rates.handshakes);
    draw($("chart-messages"), series.messages, "#4fb3ff");
    draw($("chart-handshakes"), series.handshakes, "#5fd38d");
    for (const [category, total] of Object.entries(s.totals.refusals)) {
      const list = (series.refusals[category] ||= []);
      push(list, s.rates.refusals[category] || 0);
      if (total === 0) continue; // only reasons that happened get a chart
      const figure = refusalChart(category);
      figure.querySelector("figcaption").textContent = `${category}: ${total}`;
      figure.dataset.total = String(total);
      draw(figure.querySelector("canvas"), list, "#ff6b6b");
    }

    fill("events", s.events.map((e) => row(
      [clock(e.time), e.kind, e.code || e.reason || e.rule || e.detail || "", e.client || ""],
      e.kind === "alert" ? "alert" : e.kind === "ban" ? "ban" : "",
    )));
    fill("connection-list", (s.recent_connections || []).map((c) => row(
      [c.id, c.subject, c.client, c.connected_seconds, c.messages_in],
    )));
    fill("offenders", s.offenders.map((o) => row([o.address, o.refusals])));
    fill("alerts", s.alerts.map((a) => row([clock(a.time), a.rule, a.address || "(all)"], "alert")));
    fill("bans", s.bans.map((b) => row([b.address, b.remaining_seconds])));
    document.body.dataset.updated = String(s.time);
  }

  let retry = 1000;
  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/dashboard/live`);
    ws.onopen = () => { retry = 1000; };
    ws.onmessage = async (event) => {
      const text = typeof event.data === "string" ? event.data : await event.data.text();
      render(JSON.parse(text));
    };
    ws.onclose = (event) => {
      const status = $("status");
      status.className = "status bad";
      if (event.code === 4001) {
        status.textContent = "session ended";
        window.location.assign("/login");
        return;
      }
      status.textContent = "disconnected; retrying";
      setTimeout(connect, retry);
      retry = Math.min(retry * 2, 30000);
    };
  }

  $("logout").addEventListener("click", async () => {
    const response = await fetch("/logout", { method: "POST", credentials: "same-origin" })
      .catch(() => null);
    if (!response || !response.ok) {
      $("status").className = "status bad";
      $("status").textContent =
        `log out failed (${response ? "HTTP " + response.status : "unreachable"})`;
      return;
    }
    window.location.assign("/login");
  });

  connect();
})();
