// The waiting page: wait for the participant's responses over a WebSocket, polling the status URL if
// the socket cannot be opened or drops, or if the page has no socket to open. When they are ready (or the
// participant has moved on, or timed out) the page reloads, and the server redirects to the right step. If
// generation failed, the message is shown and the page keeps listening: a coordinator may retry it, and
// the page then waits again.
(function () {
  "use strict";
  var root = document.getElementById("waiting");
  if (!root) return;
  var POLL_MS = 3000;
  // templates/participant/waiting.html renders the same words for the first status.
  var DELAYED_TEXT = "Our servers are catching up, so your answers will take a little longer. Your choices are saved: keep this page open, it moves on by itself.";
  var pollTimer = null;
  var finished = false;

  // What the status line says while the participant waits (the server renders the first one).
  var WAITING_TEXT = {
    queued: "Your answers are next in line.",
    running: "Writing your answers now.",
    delayed: DELAYED_TEXT
  };
  var statusLine = document.getElementById("waiting-status");

  function handle(status) {
    if (finished || !status) return;
    var key = status.delayed ? "delayed" : status.generation;
    if (statusLine && WAITING_TEXT[key]) statusLine.textContent = WAITING_TEXT[key];
    if (status.generation === "ready" || status.state !== "waiting") {
      finished = true;
      window.location.reload();
      return;
    }
    var failed = status.generation === "failed";
    document.getElementById("waiting-busy").hidden = failed;
    document.getElementById("waiting-failed").hidden = !failed;
  }

  function poll() {
    if (pollTimer !== null || finished) return;
    pollTimer = window.setInterval(function () {
      fetch(root.dataset.statusUrl, { credentials: "same-origin", headers: { Accept: "application/json" } })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(handle)
        .catch(function () { /* offline for a moment: try again on the next tick */ });
    }, POLL_MS);
  }

  // No socket path: the server's channel layer cannot carry the worker's events (it lives in one
  // process), so polling is the only way to hear about them.
  if (!root.dataset.socketPath) {
    poll();
    return;
  }
  try {
    var scheme = window.location.protocol === "https:" ? "wss://" : "ws://";
    var socket = new WebSocket(scheme + window.location.host + root.dataset.socketPath);
    socket.onmessage = function (event) { handle(JSON.parse(event.data)); };
    socket.onerror = poll;
    socket.onclose = poll;
  } catch (e) {
    poll();
  }
})();
