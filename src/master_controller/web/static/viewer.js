// The viewer: shows the session's progress, then the remote browser through noVNC.
import RFB from "/static/novnc/core/rfb.js";

const base = location.pathname.replace(/\/$/, "");
const wsUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + base + "/websock";
const body = document.body;
const stateEl = document.getElementById("state");
const messageEl = document.getElementById("message");
const stepsEl = document.getElementById("steps");
const screen = document.getElementById("screen");

// Close codes the controller sends, in words. Codes in FINAL mean: do not reconnect.
const REASONS = {
  1006: "The connection dropped without a reason (network or proxy problem).",
  1011: "The browser machine's display could not be reached.",
  4401: "This viewer link is not valid any more. Open the link you were given again.",
  4403: "This page is not allowed to open the viewer connection.",
  4404: "This sign-in session does not exist.",
  4409: "The browser machine is not ready yet.",
  4410: "This sign-in session has ended.",
  4412: "This session was put to sleep (hibernated). It comes back when it is resumed.",
  4429: "This session has as many viewers as it allows. Close another viewer and retry.",
};
const FINAL = new Set([4401, 4403, 4404, 4410]);

let attempts = 0;
let rfb = null;

function show(state, label, message, isError = false) {
  body.dataset.state = state;
  stateEl.textContent = label;
  if (message !== undefined) {
    messageEl.textContent = message;
    messageEl.classList.toggle("error", isError);
  }
}

function renderSteps(events) {
  stepsEl.replaceChildren(...events.filter((e) => e.kind === "step").map((e) => {
    const li = document.createElement("li");
    li.className = e.ok ? "ok" : "failed";
    const took = e.seconds == null ? "" : ` (${e.seconds.toFixed(1)} s)`;
    li.textContent = e.name + took + (e.detail && !e.ok ? ` — ${e.detail}` : "");
    return li;
  }));
}

class Refused extends Error {}

async function fetchStatus() {
  const response = await fetch(base + "/status", { cache: "no-store", credentials: "same-origin" });
  if (!response.ok) {
    const detail = await response.json().catch(() => ({}));
    const message = detail.error || `status ${response.status}`;
    // 4xx: this viewer may not see the session; 5xx: the controller has a problem, retry
    throw response.status < 500 ? new Refused(message) : new Error(message);
  }
  return response.json();
}

async function waitUntilReady() {
  for (;;) {
    let status;
    try {
      status = await fetchStatus();
    } catch (error) {
      if (error instanceof Refused) {
        show("refused", "Refused", error.message, true);
        return;
      }
      // the network or the controller hiccuped: keep trying
      show("booting", "Waiting…", `Cannot reach the controller (${error.message}); retrying…`, true);
      await new Promise((resolve) => setTimeout(resolve, 2000));
      continue;
    }
    renderSteps(status.events);
    if (status.ended) {
      show("ended", "Ended", `This sign-in session has ended: ${status.reason || status.status}.`, true);
      return;
    }
    if (status.ready) {
      connect();
      return;
    }
    if (["hibernating", "hibernated"].includes(status.status)) {
      show("hibernated", "Hibernated", REASONS[4412]);
    } else if (status.queuePosition !== null && status.queuePosition !== undefined) {
      const ahead = status.queuePosition;
      const who = ahead === 0 ? "you are next" : `${ahead} ahead of you`;
      show("booting", "Waiting…", `Many people are signing in right now: waiting for a free slot, ${who}…`);
    } else if (status.status === "resuming") {
      show("booting", "Resuming…", "Waking your isolated browser up…");
    } else {
      show("booting", "Starting…", `Starting your isolated browser (${status.status})…`);
    }
    await new Promise((resolve) => setTimeout(resolve, 700));
  }
}

function connect() {
  show("connecting", "Connecting…", "Connecting to your browser…");
  const socket = new WebSocket(wsUrl, ["binary"]);
  socket.binaryType = "arraybuffer";
  let closed = null;
  socket.addEventListener("close", (event) => { closed = { code: event.code, reason: event.reason }; });
  rfb = new RFB(screen, socket, { shared: true });
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.background = "#101820";
  rfb.addEventListener("connect", () => {
    attempts = 0;
    show("connected", "Connected", "");
  });
  rfb.addEventListener("disconnect", () => {
    rfb = null;
    const info = closed || { code: 1006, reason: "" };
    const words = REASONS[info.code] || `The connection closed (code ${info.code}).`;
    const why = info.reason ? ` (${info.reason})` : "";
    body.dataset.closeCode = String(info.code);
    if (FINAL.has(info.code)) {
      show("ended", info.code === 4410 ? "Ended" : "Refused", words + why, true);
      return;
    }
    if (info.code === 4412) {  // hibernated: wait for the resume, without backoff
      show("hibernated", "Hibernated", REASONS[4412]);
      setTimeout(waitUntilReady, 1000);
      return;
    }
    attempts += 1;
    const delay = Math.min(30, 2 ** (attempts - 1));
    show("reconnecting", "Reconnecting…", `${words}${why} Reconnecting in ${delay} s…`, true);
    setTimeout(waitUntilReady, delay * 1000);
  });
}

sessionStorage.removeItem("mc-viewer-reloads");
waitUntilReady();
