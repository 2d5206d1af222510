// Epoxi dashboard: polls GET /api/dashboard/v1 and shows it. No framework, no build step.
//
// Rates are computed here from two consecutive polls of the cumulative totals (the server
// keeps no rate state). Every number shown has a stable data-metric attribute (site rows:
// tr[data-site] with td[data-metric="site.FIELD"]) so that tests and scripts can read the page.
// Text from the server goes in with textContent only, never as HTML.
"use strict";
(function () {
  // One poll a second, as the endpoint is built for ("every 1–2 s").
  const POLL_MS = 1000;
  // Points kept per chart: ten minutes at one a second, a few KiB.
  const POINTS_MAX = 600;
  // Fetches slower than this count as failed, so a hung server shows as down.
  const FETCH_TIMEOUT_MS = 5000;

  const $ = (sel, root) => (root || document).querySelector(sel);
  const metric = (name) => document.querySelectorAll('[data-metric="' + name + '"]');
  let prev = null;
  let polls = 0;
  let operator = false;
  const hist = { t: [], rin: [], rout: [], depth: [], ready: [], scheduled: [], inflight: [] };
  let rateChart = null;
  let queueChart = null;

  function fmtInt(v) { return (typeof v === "number" && isFinite(v)) ? String(Math.round(v)) : "–"; }
  function fmt1(v) { return (typeof v === "number" && isFinite(v)) ? v.toFixed(1) : "–"; }
  function set(name, text) { for (const el of metric(name)) { el.textContent = text; } }
  function el(tag, text, attrs) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) { e.textContent = text; }
    for (const k in (attrs || {})) { e.setAttribute(k, attrs[k]); }
    return e;
  }

  async function getJson(url, init) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const r = await fetch(url, Object.assign({ credentials: "same-origin", cache: "no-store", signal: ctl.signal }, init || {}));
      if (r.status === 401) { location.href = "/"; throw new Error("not signed in"); }
      const body = await r.json().catch(() => ({}));
      if (!r.ok) { throw new Error(body.error || ("HTTP " + r.status)); }
      return body;
    } finally { clearTimeout(timer); }
  }

  function chart(target, series, title) {
    const width = Math.max(300, target.clientWidth || 400);
    return new uPlot({
      title: title, width: width, height: 200,
      scales: { x: { time: true } },
      series: [{}].concat(series.map(([label, stroke]) => ({ label: label, stroke: stroke, width: 2 }))),
      axes: [{}, { size: 60 }],
    }, [[], ...series.map(() => [])], target);
  }

  function initCharts() {
    if (typeof uPlot === "undefined") { return; }
    rateChart = chart($("#chart-rate"), [["received/s", "#1d4ed8"], ["delivered/s", "#15803d"]]);
    queueChart = chart($("#chart-queue"), [["depth", "#1d2330"], ["ready", "#1d4ed8"],
      ["scheduled", "#b45309"], ["in flight", "#15803d"]]);
    window.addEventListener("resize", () => {
      for (const [c, id] of [[rateChart, "#chart-rate"], [queueChart, "#chart-queue"]]) {
        c.setSize({ width: Math.max(300, $(id).clientWidth), height: 200 });
      }
    });
  }

  function push(arr, v) { arr.push(v); if (arr.length > POINTS_MAX) { arr.shift(); } }

  function rates(cur) {
    if (!prev) { return null; }
    const dt = (cur.ts_ms - prev.ts_ms) / 1000;
    if (!(dt > 0)) { return null; }
    const d = (k) => Math.max(0, (cur.totals[k] || 0) - (prev.totals[k] || 0)) / dt;
    return { received: d("received"), delivered: d("delivered") };
  }

  function showTotals(s) {
    set("ready", s.ready ? "ready" : "recovering");
    $("#ready").className = s.ready ? "" : "error";
    $("#hostname").textContent = s.hostname || "";
    set("shards", fmtInt(s.shards));
    set("uptime_s", fmtInt(s.uptime_s));
    for (const k of ["received", "delivered", "transient_failures", "bounced", "expired", "rejected"]) {
      set("totals." + k, fmtInt((s.totals || {})[k]));
    }
    for (const k of ["depth", "ready", "scheduled", "in_flight", "oldest_age_s"]) {
      set("queue." + k, fmtInt((s.queue || {})[k]));
    }
    set("connections.in", fmtInt((s.connections || {}).in));
    set("connections.out", fmtInt((s.connections || {}).out));
    const spool = s.spool || {};
    set("spool.bytes", fmtInt(spool.bytes));
    set("spool.segments", fmtInt(spool.segments));
    set("spool.disk_used_pct", fmt1(spool.disk_used_pct));
    const lat = s.latency_ms || {};
    for (const k of ["reception_p50", "reception_p99", "queue_p50", "queue_p99", "delivery_p50", "delivery_p99"]) {
      set("latency_ms." + k, fmt1(lat[k]));
    }
    const t = s.totals || {};
    const done = (t.delivered || 0) + (t.bounced || 0) + (t.expired || 0);
    set("success_rate", done > 0 ? fmt1(100 * (t.delivered || 0) / done) + "%" : "–");
  }

  function showBounces(s) {
    const body = $("#bounces");
    body.replaceChildren();
    const cats = Object.entries(s.bounce_categories || {}).sort((a, b) => b[1] - a[1]);
    for (const [cat, n] of cats) {
      const tr = el("tr", null, { "data-category": cat });
      tr.append(el("td", cat, { class: "name" }), el("td", fmtInt(n), { "data-metric": "bounce." + cat }));
      body.append(tr);
    }
    if (cats.length === 0) {
      const tr = el("tr");
      tr.append(el("td", "none", { class: "name" }));
      body.append(tr);
    }
  }

  function showShards(s) {
    const body = $("#per-shard");
    body.replaceChildren();
    const rows = s.per_shard || [];
    const most = Math.max(1, ...rows.map((r) => r.queue_depth || 0));
    for (const r of rows) {
      const tr = el("tr", null, { "data-shard": String(r.shard) });
      const bar = el("div", null, { class: "bar" });
      bar.style.width = (100 * (r.queue_depth || 0) / most) + "%";
      const cell = el("td"); cell.append(bar);
      tr.append(el("td", String(r.shard), { class: "name" }),
        el("td", fmtInt(r.received), { "data-metric": "shard.received" }),
        el("td", fmtInt(r.delivered), { "data-metric": "shard.delivered" }),
        el("td", fmtInt(r.queue_depth), { "data-metric": "shard.queue_depth" }),
        el("td", fmtInt(r.connections_in), { "data-metric": "shard.connections_in" }),
        el("td", fmtInt(r.connections_out), { "data-metric": "shard.connections_out" }), cell);
      body.append(tr);
    }
  }

  function showAlerts(s) {
    const list = $("#alerts");
    list.replaceChildren();
    const alerts = s.alerts || [];
    set("alerts.count", String(alerts.length));
    for (const a of alerts) {
      const li = el("li", null, { "data-rule": a.rule || "", "data-subject": a.subject || "" });
      li.append(el("strong", (a.rule || a.kind || "alert") + ": "), el("span", a.message || ""),
        el("span", " (" + fmt1(a.value) + " > " + fmt1(a.threshold) + ")", { "data-metric": "alert.value" }));
      list.append(li);
    }
    if (alerts.length === 0) { list.append(el("li", "none", { class: "none" })); }
  }

  async function act(op, site) {
    const status = $("#action-status");
    const body = { site: site };
    if (op === "suspend") {
      body.reason = "suspended from the dashboard";
      body.duration = $("#suspend-duration").value;
    }
    status.textContent = op + " " + site + "…";
    try {
      await getJson("/api/admin/" + op + "/v1", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      status.textContent = op + " " + site + ": done";
      status.className = "";
      status.dataset.last = op + " " + site + " ok";
    } catch (e) {
      status.textContent = op + " " + site + ": " + e.message;
      status.className = "error";
      status.dataset.last = op + " " + site + " failed";
    }
    poll();
  }

  function showSites(s) {
    const body = $("#sites");
    body.replaceChildren();
    for (const site of (s.sites || [])) {
      const tr = el("tr", null, { "data-site": site.site });
      tr.append(el("td", site.site, { class: "name" }),
        el("td", site.state, { "data-metric": "site.state", class: "state state-" + site.state }));
      for (const k of ["ready", "scheduled", "in_flight", "delivered", "bounced", "deferred"]) {
        tr.append(el("td", fmtInt(site[k]), { "data-metric": "site." + k }));
      }
      const ops = el("td", null, { class: "ops" });
      if (operator) {
        // Both, always: the state shown is a poll old, and a suspension can outlive the
        // site's place in the table's top 20.
        for (const [op, label] of [["suspend", "Suspend"], ["resume", "Resume"]]) {
          const b = el("button", label, { "data-action": op, type: "button" });
          b.addEventListener("click", () => act(op, site.site));
          ops.append(b);
        }
      }
      tr.append(ops);
      body.append(tr);
    }
  }

  function showCharts(s, r) {
    push(hist.t, s.ts_ms / 1000);
    push(hist.rin, r ? r.received : null);
    push(hist.rout, r ? r.delivered : null);
    const q = s.queue || {};
    push(hist.depth, q.depth); push(hist.ready, q.ready);
    push(hist.scheduled, q.scheduled); push(hist.inflight, q.in_flight);
    if (rateChart) { rateChart.setData([hist.t, hist.rin, hist.rout]); }
    if (queueChart) { queueChart.setData([hist.t, hist.depth, hist.ready, hist.scheduled, hist.inflight]); }
  }

  let inFlight = false;
  async function poll() {
    if (inFlight) { return; }
    inFlight = true;
    try {
      const s = await getJson("/api/dashboard/v1");
      const r = rates(s);
      showTotals(s);
      set("rate.received", r ? fmt1(r.received) : "–");
      set("rate.delivered", r ? fmt1(r.delivered) : "–");
      showBounces(s); showShards(s); showAlerts(s); showSites(s); showCharts(s, r);
      prev = s;
      polls += 1;
      // What the page shows is the snapshot of this instant: readers compare against it.
      document.body.dataset.tsMs = String(s.ts_ms);
      document.body.dataset.polls = String(polls);
      const conn = $("#conn"); conn.textContent = "live"; conn.className = "conn";
    } catch (e) {
      const conn = $("#conn"); conn.textContent = "down: " + e.message; conn.className = "conn down";
    } finally { inFlight = false; }
  }

  async function whoami() {
    try {
      const me = await getJson("/api/whoami/v1");
      $("#who").textContent = me.name + " (" + me.role + ")";
      $("#who").dataset.role = me.role;
      operator = me.role === "operator" || me.role === "admin";
      $("#operator-controls").hidden = !operator;
    } catch (e) { $("#who").textContent = ""; }
  }

  initCharts();
  whoami().then(poll);
  setInterval(poll, POLL_MS);
})();
