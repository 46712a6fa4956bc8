// The status page: polls /api/state every 2 s and /api/history every 30 s (and when an update
// ends), and builds every element with textContent: nothing from the app or the files is ever
// parsed as HTML. window.proto4dPage is the hook the browser test reads.
"use strict";

const page = { states: 0, histories: 0, errors: [], state: null, history: null, span: "24h" };
window.proto4dPage = page;

const STEP_COLORS = { requested: "#a0aec0", waiting: "#d69e2e", noticed: "#ed8936", preparing: "#4299e1",
  canary: "#805ad5", switching: "#38b2ac", verifying: "#48bb78", watching: "#2f855a", rolling_back: "#e53e3e" };

function $(id) { return document.getElementById(id); }

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v; else e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function dur(s) {
  if (s === null || s === undefined) return "";
  s = Number(s);
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.round((s % 86400) / 3600) + " h";
}

function clock(t, withDate) {
  if (t === null || t === undefined) return "";
  const d = new Date(Number(t) * 1000);
  const hm = d.toTimeString().slice(0, 8);
  return withDate ? d.toISOString().slice(0, 10) + " " + hm : hm;
}

function ago(iso) {
  if (!iso) return "";
  const t = Date.parse(iso);
  return isNaN(t) ? "" : dur(Math.max(0, (Date.now() - t) / 1000));
}

function mb(n) { return ((Number(n) || 0) / 1048576).toFixed(1) + " MiB"; }

function replace(node, ...children) { node.replaceChildren(...children.filter((c) => c !== null)); }

// ------------------------------------------------------------------ state

function renderState(s) {
  page.state = s;
  $("live").textContent = "updated " + clock(s.now);
  const prob = $("problem");
  prob.hidden = !s.problem;
  prob.textContent = s.problem || "";
  $("root").textContent = (s.daemon && s.daemon.root) || "root";
  $("release").textContent = s.app.release || "";

  const v = s.verdict;
  const badge = $("verdict");
  badge.dataset.verdict = v.color;
  badge.textContent = v.color.toUpperCase();
  const act = s.activity || {};
  $("now-users").textContent = `${act.users || 0} users · ${act.rpm || 0} req/min`;
  replace($("reasons"), ...v.reasons.map((r) => el("li", {}, r)));
  $("recommendation").textContent = v.recommendation;
  const tunnel = { true: "tunnel up", false: "tunnel DOWN" }[String(act.tunnel)] || "tunnel not watched";
  $("last-request").textContent = `${tunnel} · last request ${act.last_request ? ago(act.last_request) + " ago" : "none in the window"}`;
  const parts = [`now: ${v.window}${v.window_text ? " window " + v.window_text : ""}`];
  if (v.next.preferred) parts.push("next preferred window " + v.next.preferred.replace("T", " "));
  if (v.next.acceptable) parts.push("next acceptable " + v.next.acceptable.replace("T", " "));
  $("windows").textContent = parts.join(" · ") + ` (${v.timezone})`;

  renderApp(s);
  renderUpdate(s);
  renderTimeline(s.updates);
  renderReleases(s.releases);
  renderSnapshots(s.snapshots || []);
  $("commands").textContent = s.commands.join("\n");
}

function renderApp(s) {
  const a = s.app, act = s.activity || {}, h = s.health;
  const rows = [
    ["state", `${a.state || "?"}${a.healthy ? ", healthy" : ", NOT healthy"}${a.pid ? " (pid " + a.pid + ")" : ""}`],
    ["release", a.release || "(none)"],
    ["commit", el("span", {}, el("code", {}, String(a.commit || "").slice(0, 12)), " ", a.subject || "")],
    ["uptime", a.since ? ago(a.since) : "-"],
    ["restarts", a.restarts || 0],
    ["CPU", `${act.cpu_percent || 0} %`],
    ["memory", mb(act.rss_bytes)],
    ["health check", h ? `${h.latency_ms} ms, ${h.ok ? "passing" : "FAILING"} (${ago(h.at)} ago)` : "-"],
    ["drain", a.drain || "-"],
    ["daemon", `${(s.daemon && s.daemon.state) || "not running"}, ${mb(s.daemon && s.daemon.rss_bytes)}`],
  ];
  for (const db of (s.data && s.data.databases) || []) {
    rows.push(["database", `${db.path}: ${mb(db.bytes)}${db.wal_bytes ? " + WAL " + mb(db.wal_bytes) : ""}${db.revision ? ", revision " + db.revision : ""}`]);
  }
  if (a.message) rows.push(["message", a.message]);
  if (a.last_exit) rows.push(["last exit", a.last_exit]);
  const dl = $("app");
  replace(dl);
  for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, v));
}

function renderUpdate(s) {
  const u = s.update || {};
  const box = $("update"), ol = $("steps");
  box.dataset.state = u.state || "idle";
  const notes = [];
  if (u.queued) notes.push(el("p", {}, `queued next: ${u.queued.id} (${u.queued.action || "update"} ${u.queued.ref || u.queued.release || ""})`));
  const st = s.stage;
  if (st) notes.push(el("p", { id: "stage" }, st.running
    ? `staged: ${st.release} (${(st.commit || "").slice(0, 7)}) at ${st.url} until ${st.expires_at}; proto4d promote or proto4d discard`
    : `staged: ${st.release} has EXITED (${st.exited}); proto4d discard`));
  if (u.last_rejected) notes.push(el("p", { class: "muted" }, `last rejected: ${u.last_rejected.id}: ${u.last_rejected.reason || ""}`));
  if (!u.state || u.state === "idle") {
    const last = u.last;
    replace(box, el("p", { class: "muted" }, "None." + (last ? ` Last: ${last.id} ${last.state}: ${last.message || ""}` : "")), ...notes);
    replace(ol);
    return;
  }
  const head = el("p", {}, el("strong", {}, u.state), ` ${u.action || "update"} to ${u.ref || u.release || ""}`,
    u.reason ? ` (${u.reason})` : "", " · id ", el("code", {}, u.id || ""));
  const extra = [];
  if (u.waiting_for) extra.push(el("p", {}, "waiting for: " + u.waiting_for + (u.until ? " until " + u.until : "")));
  else if (u.message) extra.push(el("p", {}, u.message));
  if (u.log) extra.push(el("p", {}, el("a", { href: "/logs/" + encodeURIComponent(u.log.split("/").pop()) }, "its log")));
  replace(box, head, ...extra, ...notes);
  const steps = u.steps || [];
  replace(ol, ...steps.map((st, i) => {
    const current = i === steps.length - 1;
    const took = st.seconds !== null ? dur(st.seconds) : "running for " + dur(s.now - st.at);
    return el("li", { "data-step": st.state, "data-current": current ? "1" : null }, `${st.state} · ${clock(st.at)} · ${took}`);
  }));
}

function renderTimeline(updates) {
  const ol = $("timeline");
  if (!updates.length) { replace(ol, el("li", { class: "muted" }, "No update logs yet.")); return; }
  replace(ol, ...updates.map((u) => {
    const steps = (u.steps || []).filter((st) => st.seconds !== null);
    const total = steps.reduce((a, st) => a + Number(st.seconds), 0) || 1;
    const bar = el("div", { class: "bar" }, ...steps.map((st) => {
      const seg = el("span", { title: `${st.state} ${dur(st.seconds)}` });
      seg.style.width = (100 * Number(st.seconds) / total).toFixed(2) + "%";
      seg.style.background = STEP_COLORS[st.state] || "#718096";
      return seg;
    }));
    return el("li", { "data-outcome": u.outcome || "running", "data-id": u.id },
      el("div", {}, el("strong", {}, (u.outcome || "in progress").replace("_", " ")), " · ", u.what || u.id,
        " · ", clock(u.started_at, true), u.seconds !== null ? " · " + dur(u.seconds) : "", " · ",
        el("a", { href: "/logs/" + encodeURIComponent(u.log) }, "log")),
      u.message ? el("div", { class: "muted" }, u.message) : null,
      bar,
      el("div", { class: "stepnames" }, steps.map((st) => `${st.state} ${dur(st.seconds)}`).join(" → ")));
  }));
}

function renderReleases(rels) {
  const tb = $("releases").tBodies[0];
  const now = Date.now() / 1000;
  replace(tb, ...rels.map((r) => el("tr", { "data-current": r.current ? "1" : null },
    el("td", {}, r.current ? "●" : ""), el("td", { class: "mono" }, r.name), el("td", { class: "mono" }, String(r.commit).slice(0, 7)),
    el("td", { class: "subject" }, r.subject || ""), el("td", {}, r.outcome || ""), el("td", {}, dur(now - r.created_at)))));
}

function renderSnapshots(snaps) {
  const tb = $("snapshots").tBodies[0];
  const now = Date.now() / 1000;
  if (!snaps.length) { replace(tb, el("tr", {}, el("td", { colspan: 5, class: "muted" }, "None yet (one is taken before every switch when the app has SQLite databases)."))); return; }
  replace(tb, ...snaps.map((sn) => el("tr", {},
    el("td", { class: "mono" }, sn.id), el("td", {}, dur(now - sn.created_at)), el("td", { class: "mono" }, sn.release || "-"),
    el("td", { class: "subject" }, sn.databases.map((d) => `${d.path} ${mb(d.bytes)} ${d.rows} rows`).join(", ")),
    el("td", { class: "subject" }, sn.reason || ""))));
}

// ------------------------------------------------------------------ chart

// The axis top: four even steps of 1, 2 or 5 times a power of ten (whole steps for users).
function niceMax(v, whole) {
  const raw = v / 4, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  let step = [1, 2, 5, 10].map((k) => k * mag).find((s) => s >= raw);
  if (whole) step = Math.max(1, Math.ceil(step));
  return step * 4;
}

function tick(v) { return v >= 10 ? String(Math.round(v)) : String(Math.round(v * 10) / 10); }

function renderChart(h) {
  page.history = h;
  const chart = $("chart");
  const W = Math.max(280, chart.clientWidth || 800), H = Math.max(160, chart.clientHeight || 240);
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const L = 34, R = 40, T = 10, B = 22;
  const n = h.users.length;
  const x = (t) => L + (W - L - R) * (t - h.start) / (h.end - h.start);
  const maxU = niceMax(Math.max(1, ...h.users.filter((v) => v !== null)), true);
  const maxR = niceMax(Math.max(1, ...h.rpm.filter((v) => v !== null)), false);
  const yU = (v) => T + (H - T - B) * (1 - v / maxU);
  const yR = (v) => T + (H - T - B) * (1 - v / maxR);
  const kids = [];
  for (let i = 0; i <= 4; i++) {
    const y = T + (H - T - B) * i / 4;
    kids.push(svg("line", { class: "grid", x1: L, x2: W - R, y1: y, y2: y }));
    const lu = svg("text", { x: L - 4, y: y + 4, "text-anchor": "end" }); lu.textContent = tick(maxU * (1 - i / 4));
    const lr = svg("text", { x: W - R + 4, y: y + 4 }); lr.textContent = tick(maxR * (1 - i / 4));
    kids.push(lu, lr);
  }
  const ticks = W < 520 ? 3 : h.span === "7d" ? 7 : 6;
  for (let i = 0; i <= ticks; i++) {
    const t = h.start + (h.end - h.start) * i / ticks;
    const d = new Date(t * 1000);
    const lab = svg("text", { x: x(t), y: H - 6, "text-anchor": i === 0 ? "start" : i === ticks ? "end" : "middle" });
    lab.textContent = h.span === "7d" ? d.toDateString().slice(0, 10) : d.toTimeString().slice(0, 5);
    kids.push(lab);
  }
  for (const m of h.markers) {
    if (m.kind === "waited") {
      const x1 = Math.max(L, x(m.t)), x2 = Math.min(W - R, x(m.until));
      if (x2 > x1) kids.push(svg("rect", { class: "m-waited", x: x1, y: T, width: Math.max(2, x2 - x1), height: H - T - B }));
    } else {
      const xm = x(m.t);
      const line = svg("line", { class: "m-" + m.kind, x1: xm, x2: xm, y1: T, y2: H - B, "data-kind": m.kind });
      const tip = svg("title", {}); tip.textContent = `${m.kind} ${clock(m.t, true)} ${m.label}`;
      line.append(tip);
      kids.push(line);
    }
  }
  // A step line: each bucket's peak held across its width, so a lone bucket still shows.
  const path = (vals, y) => {
    let d = "", pen = false;
    vals.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      const x0 = x(h.start + i * h.step).toFixed(1), x1 = x(h.start + (i + 1) * h.step).toFixed(1);
      const py = y(v).toFixed(1);
      d += (pen ? "L" : "M") + x0 + " " + py + "L" + x1 + " " + py; pen = true;
    });
    return d;
  };
  const du = path(h.users, yU);
  if (du) kids.push(svg("path", { class: "users", d: du }));
  const dr = path(h.rpm, yR);
  if (dr) kids.push(svg("path", { class: "rpm", d: dr }));
  chart.replaceChildren(...kids);
  chart.dataset.points = String(h.users.filter((v) => v !== null).length);
  chart.dataset.markers = String(h.markers.length);
  chart.dataset.span = h.span;
  chart.dataset.buckets = String(n);
}

// ------------------------------------------------------------------ polling

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

let lastOutcomeKey = "";
async function pollState() {
  try {
    const s = await getJSON("/api/state");
    renderState(s);
    page.states++;
    // The chart is fetched again when an update moves on or the number of users changes (else every 30 s).
    const key = (s.updates[0] && (s.updates[0].log + s.updates[0].outcome)) + "|" + (s.update && s.update.state) +
      "|" + (s.activity && s.activity.users);
    if (key !== lastOutcomeKey) { lastOutcomeKey = key; pollHistory(); }
  } catch (e) {
    $("live").textContent = "cannot reach proto4d web: " + e.message;
  }
  setTimeout(pollState, 2000);
}

async function pollHistory() {
  try {
    renderChart(await getJSON("/api/history?span=" + page.span));
    page.histories++;
  } catch (e) {
    $("live").textContent = "cannot load the history: " + e.message;
  }
}

function main() {
  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => {
      page.span = b.dataset.span;
      for (const o of document.querySelectorAll(".tabs button")) o.classList.toggle("on", o === b);
      pollHistory();
    });
  }
  window.addEventListener("resize", () => { if (page.history) renderChart(page.history); });
  setInterval(pollHistory, 30000);
  pollState();
}

main();
