// FLQ-Fed dashboard: polls dashboard/state (only what it does not have yet)
// and draws it. Every string from the server reaches the page through
// textContent, never as HTML.
"use strict";
(function () {
  const POLL_MS = 1000, HIDDEN_MS = 5000, GONE_MS = 5000;
  const $ = (id) => document.getElementById(id);
  const page = { rounds: [], evals: [], finalPolls: 0, gone: false, doc: null, config: false, charts: {} };

  // control and bidirectional-override characters (a worker's strings) would scramble a row: shown as U+FFFD
  const UNSAFE = /[\u0000-\u001f\u007f-\u009f\u202a-\u202e\u2066-\u2069]/g;
  function clean(value) { return String(value).replace(UNSAFE, "\ufffd"); }
  function setText(el, value) { el.textContent = value === null || value === undefined || value === "" ? "–" : String(value); }
  function cell(row, value, cls) {
    const td = document.createElement("td");
    td.textContent = value === null || value === undefined || value === "" ? "–" : clean(value);
    if (cls) td.className = cls;
    row.appendChild(td);
    return td;
  }
  function bits(b) {
    if (b === null || b === undefined) return "–";
    const units = [["Gbit", 1e9], ["Mbit", 1e6], ["kbit", 1e3]];
    for (const [u, s] of units) if (Math.abs(b) >= s) return (b / s).toPrecision(3) + " " + u;
    return b + " bit";
  }
  function bitsShort(b) {  // axis ticks: short, so that they never overlap
    const units = [["G", 1e9], ["M", 1e6], ["k", 1e3]];
    for (const [u, s] of units) if (Math.abs(b) >= s) return +(b / s).toPrecision(3) + u;
    return String(b);
  }
  const WHOLE = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000];  // rounds and counts: integer ticks
  function num(x, digits) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }
  function banner(text) { const b = $("banner"); b.hidden = !text; b.textContent = text || ""; }

  // ----- charts -------------------------------------------------------------
  function chart(id, xLabel, yLabel, xBits, yWhole) {
    const el = $(id);
    const opts = {
      width: Math.max(300, el.clientWidth || 400), height: 220,
      legend: { show: false },
      cursor: { drag: { x: false, y: false } },
      scales: { x: { time: false } },
      axes: [
        xBits ? { label: xLabel, values: (u, vals) => vals.map(bitsShort), space: 60, size: 40 }
          : { label: xLabel, incrs: WHOLE, size: 40 },
        yWhole ? { label: yLabel, incrs: WHOLE, size: 56 } : { label: yLabel, size: 56 },
      ],
      series: [{}, { label: yLabel, stroke: "#2f6fdf", width: 2, points: { show: true, size: 4 } }],
    };
    page.charts[id] = { plot: new uPlot(opts, [[], []], el), el: el };
  }
  function draw(id, xs, ys) {
    const c = page.charts[id];
    if (!c) return;
    c.plot.setData([xs, ys]);
    c.el.setAttribute("data-points", String(xs.length));
  }
  function redraw() {
    const ev = page.evals.filter((e) => e.acc !== null);
    const ce = page.evals.filter((e) => e.entropy !== null);
    draw("chart-acc-round", ev.map((e) => e.iter), ev.map((e) => e.acc));
    draw("chart-acc-bits", ev.map((e) => e.bits_up_cum), ev.map((e) => e.acc));
    draw("chart-ce-round", ce.map((e) => e.iter), ce.map((e) => e.entropy));
    draw("chart-ce-bits", ce.map((e) => e.bits_up_cum), ce.map((e) => e.entropy));
    const lr = page.rounds.filter((r) => r.loss !== null);
    draw("chart-loss-round", lr.map((r) => r.iter), lr.map((r) => r.loss));
    draw("chart-sel-round", page.rounds.map((r) => r.iter), page.rounds.map((r) => r.selcnt));
  }
  window.addEventListener("resize", () => {
    for (const c of Object.values(page.charts)) c.plot.setSize({ width: Math.max(300, c.el.clientWidth), height: 220 });
  });

  // ----- tables -------------------------------------------------------------
  function workers(rows) {
    const body = $("workers").tBodies[0];
    const fresh = document.createElement("tbody");
    for (const w of rows) {
      const tr = document.createElement("tr");
      tr.className = w.state;
      cell(tr, w.worker_id);
      cell(tr, w.address, "wrap");
      cell(tr, w.state, "state-" + w.state);
      cell(tr, w.seconds_since_seen === null || w.seconds_since_seen === undefined ? null : num(w.seconds_since_seen, 1) + " s ago");
      cell(tr, w.rounds_offered);
      cell(tr, w.rounds_selected);
      cell(tr, w.rounds_uploaded);
      cell(tr, bits(w.bits_up));
      cell(tr, w.up_version + " / " + w.down_version);
      cell(tr, w.device);
      const p = w.progress;
      cell(tr, p ? p.phase + " " + p.batches_done + "/" + p.batches_total + " (round " + p.round + ")" : null);
      fresh.appendChild(tr);
    }
    body.replaceWith(fresh);
  }
  function budget(doc) {
    const run = doc.run;
    $("budget-rule").textContent = run.sel_clients > 0
      ? "Selection: the " + run.sel_clients + " best candidates per round."
      : run.up_budget_bits > 0 ? "Uplink budget per round: " + bits(run.up_budget_bits) + "." : "No uplink budget: every candidate uploads.";
    const fresh = document.createElement("tbody");
    for (const b of doc.budget) {
      const tr = document.createElement("tr");
      cell(tr, b.iter);
      cell(tr, b.offers);
      cell(tr, b.candidates);
      const td = cell(tr, "none", "wrap");
      if (b.selected.length) td.textContent = "";
      b.selected.forEach((s, i) => {
        const span = document.createElement("span");
        span.textContent = (i ? ", " : "") + s.worker + ": " + bits(s.bits);
        if (!s.uploaded) { span.className = "not-uploaded"; span.title = "selected, but its upload never arrived"; }
        td.appendChild(span);
      });
      cell(tr, bits(b.spent_bits));
      fresh.appendChild(tr);
    }
    $("budget").tBodies[0].replaceWith(fresh);
  }
  function config(sections) {
    const fresh = document.createElement("tbody");
    for (const [section, values] of Object.entries(sections)) {
      for (const [key, value] of Object.entries(values)) {
        const tr = document.createElement("tr");
        cell(tr, section + "." + key);
        cell(tr, typeof value === "object" ? JSON.stringify(value) : String(value), "wrap");
        fresh.appendChild(tr);
      }
    }
    $("config").tBodies[0].replaceWith(fresh);
  }

  // ----- the document ---------------------------------------------------------
  function apply(doc) {
    if (doc.rounds_total < page.rounds.length || doc.evaluations_total < page.evals.length) {
      page.rounds = []; page.evals = []; // the run started over (a resumed master): take it all again
      return false;
    }
    page.rounds.push(...doc.rounds);
    page.evals.push(...doc.evaluations);
    page.doc = doc;
    const run = doc.run, st = doc.status;
    if (doc.config) {
      page.config = true;
      $("run").textContent = [run.kind, run.dataset, run.model, run.links, run.total_workers + " workers",
        run.max_rounds + " rounds"].join(" · ");
      config(doc.config);
      $("config-count").textContent = String(Object.values(doc.config).reduce((n, v) => n + Object.keys(v).length, 0));
    }
    const finished = st.state === "finished";
    const state = $("state");
    state.textContent = finished ? "finished (" + (st.finish_reason || "?") + ")" : st.stop_requested ? "stopping" : st.state;
    state.className = "badge " + (finished ? "finished" : st.stop_requested ? "stopping" : "");
    setText($("round"), st.round + " / " + run.max_rounds);
    setText($("phase"), finished ? (st.finish_detail || "") :
      "phase " + st.phase + (st.round_open_s !== null && st.round_open_s !== undefined ? ", open " + num(st.round_open_s, 1) + " s" : ""));
    const last = page.evals.length ? page.evals[page.evals.length - 1] : null;
    setText($("acc"), last ? num(last.acc, 4) : null);
    $("acc-round").textContent = last ? "round " + last.iter : "";
    setText($("ce"), last ? num(last.entropy, 4) : null);
    setText($("bits-up"), bits(st.bits ? st.bits.up_cum : 0));
    setText($("bits-down"), "downlink " + bits(st.bits ? st.bits.down_cum : 0));
    setText($("live"), st.live_workers + " / " + run.total_workers);
    $("waiting").textContent = st.waiting_for && st.waiting_for.length ? "waiting for " + st.waiting_for.join(", ") : "";
    $("stop").disabled = finished || st.stop_requested;
    const res = $("results");
    res.hidden = !doc.results;
    res.textContent = doc.results ? "results: " + doc.results : "";
    workers(doc.workers);
    budget(doc);
    redraw();
    $("updated").textContent = "Last update " + new Date().toLocaleTimeString() + ".";
    return true;
  }

  async function poll() {
    let wait = document.hidden ? HIDDEN_MS : POLL_MS;
    try {
      const url = "dashboard/state?rounds_since=" + page.rounds.length + "&evals_since=" + page.evals.length +
        (page.config ? "" : "&config=true");
      const r = await fetch(url, { cache: "no-store", credentials: "same-origin" });
      if (r.status === 401) {
        banner("This run needs its token: open this page once as /?token=<auth_token>.");
        return; // nothing more to do until the user opens it with the token
      }
      if (!r.ok) throw new Error("HTTP " + r.status);
      const doc = await r.json();
      if (!apply(doc) || page.rounds.length < doc.rounds_total || page.evals.length < doc.evaluations_total) {
        wait = 0; // more to fetch (a long run's history comes in parts)
      }
      page.gone = false;
      banner("");
      if (doc.status.state === "finished") {
        page.finalPolls += 1; // a few more, for the results line written just after
        if (page.finalPolls >= 3 && doc.results) { $("updated").textContent += " The run is over."; return; }
      }
    } catch (e) {
      page.gone = true;
      const over = page.doc && page.doc.status.state === "finished";
      banner(over ? "The run is over and its process has exited: this is its final state."
        : "Cannot reach the server (" + e.message + "): showing the last state; retrying.");
      if (over) return;
      wait = GONE_MS;
    }
    setTimeout(poll, wait);
  }

  $("stop").addEventListener("click", async () => {
    if (!window.confirm("Stop the run after the round in progress? The results of the rounds done are written.")) return;
    $("stop").disabled = true;
    try {
      const r = await fetch("stop", { method: "POST", headers: { "X-FLQ-Dashboard": "1" }, credentials: "same-origin" });
      banner(r.ok ? "" : "Stop refused: HTTP " + r.status);
      if (!r.ok) $("stop").disabled = false;
    } catch (e) {
      banner("Stop failed: " + e.message);
      $("stop").disabled = false;
    }
  });

  chart("chart-acc-round", "round", "accuracy");
  chart("chart-acc-bits", "cumulative uplink bits", "accuracy", true);
  chart("chart-ce-round", "round", "cross-entropy");
  chart("chart-ce-bits", "cumulative uplink bits", "cross-entropy", true);
  chart("chart-loss-round", "round", "loss");
  chart("chart-sel-round", "round", "uploads", false, true);
  poll();
})();
