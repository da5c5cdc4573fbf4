// The studio's live pages, in plain JavaScript: the job page and the study dashboard follow their
// WebSocket, and poll their JSON endpoint every few seconds while the socket is down (or when the page
// has no socket to open). Numbers are formatted as the templates format them
// (studyapp/templatetags/studio.py).
(function () {
  "use strict";
  var POLL_MS = 3000;

  function live(root, handle) {
    var timer = null;
    var label = root.querySelector("[data-live-label]");
    function mode(text) { if (label) label.textContent = text; root.dataset.live = text; }
    function poll() {
      if (timer !== null) return;
      mode("Updating every few seconds");
      timer = window.setInterval(function () {
        fetch(root.dataset.pollUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
          .then(function (r) { return r.ok ? r.json() : null; })
          .then(function (data) { if (data) handle(data, stop); })
          .catch(function () { /* offline for a moment: the next tick tries again */ });
      }, POLL_MS);
    }
    var socket = null;
    function stop() {
      if (timer !== null) { window.clearInterval(timer); timer = null; }
      if (socket) { socket.onclose = null; socket.close(); }
    }
    if (!root.dataset.socketPath) {  // the server's channel layer cannot carry a worker's events
      poll();
      return;
    }
    try {
      var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
      socket = new WebSocket(scheme + window.location.host + root.dataset.socketPath);
      socket.onopen = function () { mode("Live"); };
      socket.onmessage = function (event) { handle(JSON.parse(event.data), stop); };
      socket.onerror = poll;
      socket.onclose = poll;
    } catch (e) {
      poll();
    }
  }

  function set(root, selector, text) {
    root.querySelectorAll(selector).forEach(function (el) { el.textContent = text; });
  }
  function pct(x) { return x === null || x === undefined ? "—" : (100 * x).toFixed(1) + "%"; }
  function width(x) { return x === null || x === undefined ? 0 : Math.min(100, Math.max(0, 100 * x)); }
  function pvalue(p) {
    if (p === null || p === undefined) return "—";
    if (p > 0 && p < 1e-4) return p.toExponential(1);
    return String(Number(p.toPrecision(2)));
  }

  // The job page: progress bar, stage, log; reload once the job has finished to show its results.
  var job = document.getElementById("job-live");
  if (job) {
    var log = job.querySelector("[data-field=log]");
    var meter = job.querySelector("[data-meter]");
    if (log) log.scrollTop = log.scrollHeight;
    if (job.dataset.finished !== "true") {
      live(job, function (s, stop) {
        if (s.status === undefined) return;
        set(job, "[data-field=stage]", s.stage || "Waiting for a worker…");
        set(job, "[data-field=done]", s.done.toLocaleString("en-US"));
        set(job, "[data-field=total]", s.total.toLocaleString("en-US"));
        set(job, "[data-field=percent]", s.percent);
        if (meter) {
          meter.setAttribute("aria-valuenow", s.percent);
          meter.querySelector(".meter-fill").style.width = s.percent + "%";
          meter.classList.toggle("running", s.status === "running");
        }
        document.querySelectorAll("[data-status-pill]").forEach(function (pill) {
          pill.textContent = s.status;
          pill.className = "pill " + ({ succeeded: "ok", failed: "bad", running: "info" }[s.status] || "muted");
        });
        if (log) {
          var atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 24;
          log.textContent = s.log;
          if (atBottom) log.scrollTop = log.scrollHeight;
        }
        if (s.finished) { stop(); window.location.reload(); }
      });
    }
  }

  // The study dashboard: counts, the participants-by-step bars and the win-rate table.
  var dash = document.getElementById("dashboard-live");
  if (dash) {
    live(dash, function (d) {
      ["participants", "places_taken", "completed", "median_completion", "generation_failed",
       "failed_attention", "ratings"].forEach(function (name) { set(dash, "[data-field=" + name + "]", d[name]); });
      d.by_step.forEach(function (row) {
        set(dash, "[data-step=" + row.step + "]", row.count);
        var bar = dash.querySelector("[data-bar=" + row.step + "]");
        if (bar) bar.style.width = (d.participants ? 100 * row.count / d.participants : 0) + "%";
      });
      Object.keys(d.by_state).forEach(function (state) { set(dash, "[data-state=" + state + "]", d.by_state[state]); });
      d.win_rates.forEach(function (wr) {
        var row = dash.querySelector("[data-comparison='" + wr.comparison_id + "']");
        if (!row) { window.location.reload(); return; }  // a comparison added since the page loaded
        set(row, "[data-wr=wins]", wr.wins);
        set(row, "[data-wr=n]", wr.n);
        set(row, "[data-wr=rate]", pct(wr.rate));
        set(row, "[data-wr=ci]", wr.ci_low !== null ? pct(wr.ci_low) + " – " + pct(wr.ci_high) : "—");
        set(row, "[data-wr=p]", pvalue(wr.p_value));
        var range = row.querySelector("[data-wr=range]");
        var point = row.querySelector("[data-wr=point]");
        if (range) { range.style.left = width(wr.ci_low) + "%"; range.style.width = (width(wr.ci_high) - width(wr.ci_low)) + "%"; }
        if (point) { point.hidden = wr.rate === null; point.style.left = width(wr.rate) + "%"; }
      });
    });
  }

  // Copy buttons (the participant link).
  document.querySelectorAll("[data-copy]").forEach(function (button) {
    button.addEventListener("click", function () {
      var input = document.getElementById(button.dataset.copy);
      input.select();
      var done = function () { button.textContent = "Copied"; window.setTimeout(function () { button.textContent = "Copy"; }, 1500); };
      if (navigator.clipboard) navigator.clipboard.writeText(input.value).then(done, function () {});
      else { document.execCommand("copy"); done(); }
    });
  });

  // Buttons whose action cannot be undone ask first (data-confirm holds the question).
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  });

  // A form that came back with problems: move focus to their summary, so keyboard and screen-reader
  // users land on it.
  var summary = document.getElementById("error-summary");
  if (summary) summary.focus();
})();
