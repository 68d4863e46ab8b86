// Ops dashboard: polls /api/overview every few seconds; builds rows with textContent only (no HTML injection).
"use strict";
const REFRESH_MS = 3000;

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
  return e;
}
const fmtTime = (ts) => ts ? new Date(ts * 1000).toLocaleTimeString() : "";
const fmtS = (v) => v == null ? "–" : `${Number(v).toFixed(2)} s`;
function fill(id, rows) { document.querySelector(`#${id} tbody`).replaceChildren(...rows); }

function render(d) {
  document.getElementById("node").textContent = `${d.node.ae_title}:${d.node.port}`;
  const q = Object.entries(d.queues).map(([k, v]) => el("tr", {"data-queue": k}, el("td", {}, k), el("td", {class: "n"}, v)));
  if (d.unacked != null) q.push(el("tr", {}, el("td", {}, "in progress"), el("td", {}, d.unacked)));
  if (!d.broker_ok) q.push(el("tr", {}, el("td", {class: "bad", colSpan: 2}, "broker unreachable")));
  fill("queues", q);
  fill("workers", d.workers.workers.map((w) => el("tr", {"data-worker": w.name},
    el("td", {}, w.name), el("td", {}, w.role), el("td", {}, w.model || "–"), el("td", {}, w.tasks_done ?? ""))));
  document.getElementById("workers-error").textContent = d.workers.error || (d.workers.workers.length ? "" : "no worker answers");
  const h = d.last_hour, c = h.counts;
  const hourRows = [["received", c.received || 0], ["results sent", c.sent || 0]]
    .concat(c.shadow ? [["shadow: archived, not sent", c.shadow]] : [])
    .concat([["skipped", c.skipped || 0],
    ["refused", c.refused || 0], ["failed", c.failed || 0], ["dead-lettered", c.dead_lettered || 0],
    ["latency p50", fmtS(h.latency_s.p50)], ["latency p95", fmtS(h.latency_s.p95)], ["latency max", fmtS(h.latency_s.max)],
    ["spool pending", d.spool.pending],
    ["spool disk", `${(d.spool.disk_usage * 100).toFixed(0)} % used, ${(d.spool.free_bytes / 2 ** 30).toFixed(1)} GiB free`]]);
  fill("lasthour", hourRows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v)))
    .concat(d.spool.refusing ? [el("tr", {"data-refusing": ""}, el("td", {}, "intake"), el("td", {class: "bad"}, `refusing: ${d.spool.refusing}`))] : []));
  const f = Object.entries(d.failures_by_stage || {});
  fill("failures", f.length ? f.map(([stage, n]) => el("tr", {"data-stage": stage}, el("td", {}, stage),
    el("td", {class: n.failed ? "bad" : ""}, n.failed), el("td", {}, n.retry), el("td", {class: n.dead_lettered ? "bad" : ""}, n.dead_lettered)))
    : [el("tr", {}, el("td", {colSpan: 4, class: "muted"}, "none"))]);
  document.getElementById("dead-count").textContent = d.dead_letters.length || "";
  fill("dead", d.dead_letters.map((x) => {
    const btn = el("button", {class: "replay", disabled: !x.replayable, title: x.replayable ? "resend the results" : "no results to resend"}, "Replay");
    btn.addEventListener("click", () => replay(x.sop_instance_uid, btn));
    return el("tr", {"data-sop": x.sop_instance_uid}, el("td", {class: "uid"}, x.sop_instance_uid),
      el("td", {}, x.accession), el("td", {class: "bad"}, x.reason), el("td", {}, x.attempts ?? ""),
      el("td", {}, fmtTime(x.ts)), el("td", {}, btn));
  }));
  fill("studies", d.studies.map((s) => {
    const img = s.thumbnail ? el("img", {class: "thumb", src: s.thumbnail, alt: "overlay preview"}) : "";
    return el("tr", {"data-sop": s.sop_instance_uid, "data-flagged": s.flagged ? "1" : "0", "data-status": s.status,
                     class: s.flagged ? "flagged" : ""},
      el("td", {}, img), el("td", {class: "st"}, s.flagged ? "FLAGGED" : s.status === "shadow" && s.positive ? "SHADOW: would flag" : s.status),
      el("td", {}, s.accession), el("td", {class: "uid"}, s.study_instance_uid, el("br"), s.sop_instance_uid),
      el("td", {}, s.probability ?? ""), el("td", {}, s.latency_s != null ? fmtS(s.latency_s) : ""),
      el("td", {}, s.reason), el("td", {}, fmtTime(s.updated_ts)));
  }));
}

// Drift: one small bar plot per statistic, reference (grey) beside the window (blue; red when out of band).
const SVG = "http://www.w3.org/2000/svg";
function svgEl(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}
function plot(name, st) {
  const W = 150, H = 56, ref = st.reference || [], win = st.window || [], n = Math.max(ref.length, win.length, 1);
  const top = Math.max(...ref, ...win, 0.01), bw = W / n;
  const svg = svgEl("svg", {width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
  const title = svgEl("title", {});
  title.textContent = `${name}: reference (grey) and window (blue) shares per bin`;
  svg.append(title);
  for (let i = 0; i < n; i++) {
    const r = (ref[i] || 0) / top * (H - 2), w = (win[i] || 0) / top * (H - 2);
    svg.append(svgEl("rect", {class: "ref", x: i * bw + 1, y: H - r, width: bw / 2 - 1, height: r}));
    svg.append(svgEl("rect", {class: "win", x: i * bw + bw / 2, y: H - w, width: bw / 2 - 1, height: w}));
  }
  const psi = (st.psi == null ? "–" : st.psi.toFixed(2)) + (st.limit != null ? ` (drift ≥ ${st.limit.toFixed(2)})` : "");
  return el("div", {class: `plot ${st.band}`, "data-stat": name, "data-band": st.band},
    el("div", {}, el("b", {}, name), ` PSI ${psi} `, el("span", {class: `state ${st.band}`}, st.band)), svg);
}
function renderDrift(d, mode) {
  const banner = document.getElementById("shadow-banner");
  banner.hidden = !mode || mode.mode !== "shadow";
  document.body.dataset.mode = mode ? mode.mode : "";
  if (!d) return;
  for (const [id, part] of [["input-state", d.input], ["output-state", d.output]]) {
    const s = document.getElementById(id);
    s.textContent = part.state.toUpperCase();
    s.className = `state ${part.state.replace(" ", "-")}`;
    s.dataset.state = part.state;
  }
  const o = d.output, pct = (v) => v == null ? "–" : `${(v * 100).toFixed(1)} %`;
  document.getElementById("drift-summary").textContent =
    `${d.films} film(s) in the window (last ${d.window_films} within ${d.window_hours} h; state changes from ${d.min_films}); ` +
    `reference: ${d.reference}. Flagged ${pct(o.flagged_rate)} [${pct(o.flagged_ci[0])}, ${pct(o.flagged_ci[1])}]` +
    (o.reference_flagged_rate != null ? ` against ${pct(o.reference_flagged_rate)} on validation.` : "; no validation rate in the model package.") +
    (d.input.drifted && d.input.drifted.length ? ` Out of band: ${d.input.drifted.join(", ")}.` : "");
  const plots = Object.entries(d.input.statistics || {}).map(([k, st]) => plot(k, st));
  if (o.score) plots.push(plot("score (output)", o.score));
  document.getElementById("drift-plots").replaceChildren(...plots);
}

// Keep thumbnails that already loaded: only replace the table when something changed.
let lastKey = "";
async function refresh() {
  const status = document.getElementById("status");
  try {
    const r = await fetch("api/overview", {cache: "no-store"});
    if (!r.ok) throw new Error(`HTTP ${r.status}`);
    const d = await r.json();
    const key = JSON.stringify({...d, now: 0});
    if (key !== lastKey) { render(d); renderDrift(d.drift, d.mode); lastKey = key; }
    status.textContent = `updated ${fmtTime(d.now)}`;
    status.className = "ok";
    document.body.dataset.updated = String(d.now);
  } catch (e) {
    status.textContent = `refresh failed: ${e.message}`;
    status.className = "bad";
  }
}

async function replay(sop, btn) {
  btn.disabled = true;
  const msg = document.getElementById("replay-msg");
  try {
    const r = await fetch(`api/replay/${encodeURIComponent(sop)}`, {method: "POST", headers: {"X-Triage-Request": "1"}});
    const d = await r.json();
    msg.textContent = `${sop}: ${d.message}`;
  } catch (e) {
    msg.textContent = `${sop}: replay failed: ${e.message}`;
  }
  await refresh();
}

refresh();
setInterval(refresh, REFRESH_MS);
