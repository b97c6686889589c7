// The viewer: shows the session's progress, then the remote browser through noVNC.
import RFB from "/static/novnc/core/rfb.js";
import keysyms from "/static/novnc/core/input/keysymdef.js";
import KeyTable from "/static/novnc/core/input/keysym.js";
import { t, translatePage } from "/static/app/viewer-texts.js";

const base = location.pathname.replace(/\/$/, "");
const wsUrl = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + base + "/websock";
const body = document.body;
const stateEl = document.getElementById("state");
const messageEl = document.getElementById("message");
const stepsEl = document.getElementById("steps");
const screen = document.getElementById("screen");
const taskEl = document.getElementById("task");
const timeLeftEl = document.getElementById("time-left");
const latencyEl = document.getElementById("latency");
const extendButton = document.getElementById("extend");
const pasteButton = document.getElementById("paste");
const typeOpenButton = document.getElementById("type-open");
const typePanel = document.getElementById("type-panel");
const typeText = document.getElementById("type-text");
const typeNote = document.getElementById("type-note");
const fitButton = document.getElementById("fit");
const copyButton = document.getElementById("copy");
const keyboardButton = document.getElementById("keyboard");
const keyboardInput = document.getElementById("keyboard-input");
// a touch screen (a phone, a tablet): the page offers its on-screen keyboard
const TOUCH = matchMedia("(pointer: coarse)").matches;
// while connected, the page asks for the session's state this often (time left, the end)
const WATCH_MS = 5000;
// a time left under this shows as short, with the "More time" button
const SHORT_SECONDS = 180;
// the guest's screen follows the window this long after the window stops changing size
const FIT_DELAY_MS = 300;

// Close codes the controller sends, in words (viewer-texts.js). FINAL: do not reconnect.
const CLOSE_CODES = new Set([1006, 1011, 4401, 4403, 4404, 4409, 4410, 4412, 4429]);
const closeWords = (code) => (CLOSE_CODES.has(code) ? t(`close${code}`) : t("closedWithCode", { code }));
const FINAL = new Set([4401, 4403, 4404, 4410]);

let attempts = 0;
let rfb = null;
let deadline = null;  // Date.now() at which the sign-in time runs out, as last told
let watching = null;
let copyOut = false;  // the operator lets the person copy out of the guest (viewer_copy_out)

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

async function fetchStatus(method = "GET", path = "/status") {
  const asked = performance.now();
  const response = await fetch(base + path, { method, cache: "no-store", credentials: "same-origin" });
  if (!response.ok) {
    const detail = await response.json().catch(() => ({}));
    const message = detail.error || `status ${response.status}`;
    // 4xx: this viewer may not see the session; 5xx: the controller has a problem, retry
    throw response.status < 500 ? new Refused(message) : new Error(message);
  }
  const status = await response.json();
  latencyEl.textContent = `${Math.round(performance.now() - asked)} ms`;
  learn(status);
  return status;
}

// What the page tells from a status: what to do, and the time left.
function learn(status) {
  taskEl.textContent = status.ready ? t("task", { provider: status.providerTitle }) : "";
  taskEl.title = taskEl.textContent;
  copyOut = Boolean(status.copyOut);
  deadline = status.secondsLeft == null ? null : Date.now() + status.secondsLeft * 1000;
  showTimeLeft();
}

function showTimeLeft() {
  if (deadline === null || body.dataset.state === "ended" || body.dataset.state === "signed-in") {
    timeLeftEl.textContent = "";
    extendButton.hidden = true;
    return;
  }
  const left = Math.max(0, Math.round((deadline - Date.now()) / 1000));
  const minutes = Math.floor(left / 60);
  timeLeftEl.textContent = t("timeLeft", { time: `${minutes}:${String(left % 60).padStart(2, "0")}` });
  timeLeftEl.classList.toggle("short", left < SHORT_SECONDS);
  extendButton.hidden = false;
}
setInterval(showTimeLeft, 1000);

extendButton.addEventListener("click", async () => {
  extendButton.disabled = true;
  try {
    await fetchStatus("POST", "/heartbeat");
  } catch (error) {
    timeLeftEl.textContent = t("extendFailed", { error: error.message });
  } finally {
    extendButton.disabled = false;
  }
});

// The end, in words a person reads: signed in, cancelled, out of time, or failed and why.
function showEnd(status) {
  if (status.status === "captured") {
    show("signed-in", t("signedIn"), t("signedInMessage"));
  } else if (status.status === "terminated" && status.reason.startsWith("timed out")) {
    show("ended", t("ended"), t("timedOutMessage", { reason: status.reason }), true);
  } else if (status.status === "terminated") {
    show("ended", t("cancelled"), t("cancelledMessage"), true);
  } else {
    show("ended", t("failed"), t("failedMessage", { reason: status.reason || status.status }), true);
  }
  setTools(false);
  showTimeLeft();
}

// After the viewer was closed for the end: the session's final state (a capture takes a
// moment to seal the credentials) says what to tell the person.
async function waitForTheEnd(fallback) {
  show("ending", t("finishing"), t("finishingMessage"));
  for (let tries = 0; tries < 90; tries++) {
    try {
      const status = await fetchStatus();
      renderSteps(status.events);
      if (status.ended || status.status === "captured") {
        showEnd(status);
        return;
      }
    } catch (error) {
      if (error instanceof Refused) break;
    }
    await new Promise((resolve) => setTimeout(resolve, 700));
  }
  show("ended", t("ended"), fallback, true);
}

function setTools(on) {
  keyboardButton.hidden = !on || !TOUCH;
  fitButton.hidden = !on;
  copyButton.hidden = !on || !copyOut;
  pasteButton.hidden = !on;
  typeOpenButton.hidden = !on;
  if (!on) typePanel.hidden = true;
}

// While connected: follow the session (the time left; a capture or an end closes the view).
function watch() {
  clearInterval(watching);
  watching = setInterval(async () => {
    try {
      const status = await fetchStatus();
      if (status.ended || status.status === "captured") {
        clearInterval(watching);
        if (rfb) rfb.disconnect();
        showEnd(status);
      }
    } catch (error) {
      latencyEl.textContent = t("noAnswer");
    }
  }, WATCH_MS);
}

async function waitUntilReady() {
  for (;;) {
    let status;
    try {
      status = await fetchStatus();
    } catch (error) {
      if (error instanceof Refused) {
        show("refused", t("refused"), error.message, true);
        return;
      }
      // the network or the controller hiccuped: keep trying
      show("booting", t("waiting"), t("unreachable", { error: error.message }), true);
      await new Promise((resolve) => setTimeout(resolve, 2000));
      continue;
    }
    renderSteps(status.events);
    if (status.ended || status.status === "captured") {
      showEnd(status);
      return;
    }
    if (status.ready) {
      connect();
      return;
    }
    if (["hibernating", "hibernated"].includes(status.status)) {
      show("hibernated", t("hibernated"), closeWords(4412));
    } else if (status.queuePosition !== null && status.queuePosition !== undefined) {
      const ahead = status.queuePosition;
      show("booting", t("waiting"), ahead === 0 ? t("queuedNext") : t("queued", { ahead }));
    } else if (status.status === "resuming") {
      show("booting", t("resuming"), t("resumingMessage"));
    } else {
      show("booting", t("starting"), t("startingMessage", { status: status.status }));
    }
    await new Promise((resolve) => setTimeout(resolve, 700));
  }
}

function connect() {
  show("connecting", t("connecting"), t("connectingMessage"));
  const socket = new WebSocket(wsUrl, ["binary"]);
  socket.binaryType = "arraybuffer";
  let closed = null;
  socket.addEventListener("close", (event) => { closed = { code: event.code, reason: event.reason }; });
  rfb = new RFB(screen, socket, { shared: true });
  rfb.scaleViewport = true;
  rfb.resizeSession = false;
  rfb.background = "#101820";
  // the guest's clipboard is never taken out (credentials live there; its VNC server sends
  // none either): anything that arrives is only counted, for the tests that check it
  rfb.addEventListener("clipboard", () => {
    body.dataset.guestCopies = String(Number(body.dataset.guestCopies || "0") + 1);
  });
  rfb.addEventListener("connect", () => {
    attempts = 0;
    show("connected", t("connected"), "");
    setTools(true);
    watch();
    fitSoon(0);
  });
  rfb.addEventListener("disconnect", () => {
    rfb = null;
    lastFit = "";
    setTools(false);
    clearInterval(watching);
    if (body.dataset.state === "signed-in" || body.dataset.state === "ended") return;
    const info = closed || { code: 1006, reason: "" };
    const words = closeWords(info.code);
    const why = info.reason ? ` (${info.reason})` : "";
    body.dataset.closeCode = String(info.code);
    if (info.code === 4410) {  // ended: say how, from the session itself
      waitForTheEnd(words + why);
      return;
    }
    if (FINAL.has(info.code)) {
      show("ended", t("refused"), words + why, true);
      return;
    }
    if (info.code === 4412) {  // hibernated: wait for the resume, without backoff
      show("hibernated", t("hibernated"), closeWords(4412));
      setTimeout(waitUntilReady, 1000);
      return;
    }
    attempts += 1;
    const delay = Math.min(30, 2 ** (attempts - 1));
    show("reconnecting", t("reconnecting"), t("reconnectingMessage", { words, why, delay }), true);
    setTimeout(waitUntilReady, delay * 1000);
  });
}

// --- the guest's screen fits the window ---------------------------------------------------

// On (the default, remembered per browser): the guest's screen is resized to the viewer's
// area, so nothing is scaled; the guest clamps it to the sizes it supports (800x600 ..
// 1920x1200) and noVNC scales what is left over. Off: the screen keeps its size, scaled.
let fitting = localStorage.getItem("mc-viewer-fit") !== "off";
let fitTimer = null;
let lastFit = "";

function showFit() {
  fitButton.setAttribute("aria-pressed", String(fitting));
}

function fitSoon(delay = FIT_DELAY_MS) {
  clearTimeout(fitTimer);
  if (fitting) fitTimer = setTimeout(fitScreen, delay);
}

async function fitScreen() {
  if (!rfb || !fitting || body.dataset.state !== "connected") return;
  // whole pixels the area surely has (clientHeight rounds 699.6 up, and noVNC would then
  // scale the screen down a little)
  const area = screen.getBoundingClientRect();
  const width = Math.floor(area.width);
  const height = Math.floor(area.height);
  const wanted = `${width}x${height}`;
  if (width < 1 || height < 1 || wanted === lastFit) return;
  lastFit = wanted;
  try {
    const response = await fetch(base + "/display", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ width, height }),
    });
    if (!response.ok) throw new Error(`status ${response.status}`);
    const size = await response.json();
    body.dataset.guestScreen = `${size.width}x${size.height}`;
  } catch (error) {
    lastFit = "";  // scaled as before; the next change of size tries again
  }
}

new ResizeObserver(() => fitSoon()).observe(screen);
fitButton.addEventListener("click", () => {
  fitting = !fitting;
  localStorage.setItem("mc-viewer-fit", fitting ? "on" : "off");
  showFit();
  lastFit = "";
  fitSoon(0);
});
showFit();

// --- phones and tablets: the on-screen keyboard ---------------------------------------------

// The canvas cannot open a phone's keyboard; a hidden text field can. What is typed into it
// goes to the guest as keys; keys that would act on the page (Enter, Tab, Backspace, the
// arrows) are sent as themselves. The field keeps one character, so Backspace on an empty
// field still reaches the guest.
const KEEP = " ";
const KEYS = {
  Enter: [KeyTable.XK_Return, "Enter"],
  Tab: [KeyTable.XK_Tab, "Tab"],
  Backspace: [KeyTable.XK_BackSpace, "Backspace"],
  Delete: [KeyTable.XK_Delete, "Delete"],
  Escape: [KeyTable.XK_Escape, "Escape"],
  ArrowLeft: [KeyTable.XK_Left, "ArrowLeft"],
  ArrowRight: [KeyTable.XK_Right, "ArrowRight"],
  ArrowUp: [KeyTable.XK_Up, "ArrowUp"],
  ArrowDown: [KeyTable.XK_Down, "ArrowDown"],
};

keyboardButton.addEventListener("click", () => {
  keyboardInput.value = KEEP;
  keyboardInput.focus();
});
keyboardInput.addEventListener("keydown", (event) => {
  const key = KEYS[event.key];
  if (!key || !rfb || event.isComposing) return;
  event.preventDefault();
  // a tablet's hardware keyboard: Shift+Tab goes back a field
  if (event.shiftKey) rfb.sendKey(KeyTable.XK_Shift_L, "ShiftLeft", true);
  rfb.sendKey(key[0], key[1]);
  if (event.shiftKey) rfb.sendKey(KeyTable.XK_Shift_L, "ShiftLeft", false);
});
keyboardInput.addEventListener("input", (event) => {
  if (event.isComposing || !rfb) return;
  if (event.inputType === "deleteContentBackward") {
    rfb.sendKey(KeyTable.XK_BackSpace, "Backspace");
  } else if (event.inputType === "insertLineBreak") {
    rfb.sendKey(KeyTable.XK_Return, "Enter");
  } else if (event.data) {
    typeIntoGuest(event.data);
  }
  keyboardInput.value = KEEP;
});
keyboardInput.addEventListener("compositionend", (event) => {
  if (event.data && rfb) typeIntoGuest(event.data);
  keyboardInput.value = KEEP;
});

// --- copy: only where the operator allows it (credentials live in the guest) ---------------

copyButton.addEventListener("click", async () => {
  try {
    const response = await fetch(base + "/copy", { method: "POST", credentials: "same-origin" });
    if (!response.ok) throw new Error(`status ${response.status}`);
    const { text } = await response.json();
    await navigator.clipboard.writeText(text);
    body.dataset.copies = String(Number(body.dataset.copies || "0") + 1);
  } catch (error) {
    messageEl.textContent = t("copyFailed", { error: error.message });
  }
});

// --- paste: the person's clipboard text reaches the focused field in the guest -------------

// Ctrl+V (Cmd+V) on the page: kept from noVNC (which would send the keys at once, before the
// text), so that the browser's paste event brings the text; that sets the guest's clipboard,
// then the guest gets its own Ctrl+V.
// Ctrl+W, Ctrl+T, Ctrl+N, Ctrl+Q (with Shift too) are kept from the guest on purpose: they
// would close the sign-in's tab or open tabs and windows nobody needs. (Outside fullscreen
// the host browser keeps them to itself anyway; leaving the page asks first, below.)
const BLOCKED_SHORTCUTS = new Set(["w", "t", "n", "q"]);
window.addEventListener("keydown", (event) => {
  if (!rfb || !(event.ctrlKey || event.metaKey) || event.altKey) return;
  const key = event.key.toLowerCase();
  if (key === "v") event.stopImmediatePropagation();
  if (BLOCKED_SHORTCUTS.has(key)) {
    event.stopImmediatePropagation();
    event.preventDefault();
    body.dataset.blockedShortcuts = String(Number(body.dataset.blockedShortcuts || "0") + 1);
  }
}, true);

// Closing or leaving the page while connected (a habitual Ctrl+W, say) asks first.
window.addEventListener("beforeunload", (event) => {
  if (body.dataset.state === "connected") event.preventDefault();
});

document.addEventListener("paste", (event) => {
  if (!rfb || !typePanel.hidden && typePanel.contains(document.activeElement)) return;
  event.preventDefault();
  const text = event.clipboardData ? event.clipboardData.getData("text/plain") : "";
  if (text) pasteIntoGuest(text);
});

async function pasteIntoGuest(text) {
  body.dataset.pastes = String(Number(body.dataset.pastes || "0") + 1);
  try {
    const response = await fetch(base + "/clipboard", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ text }),
    });
    if (!response.ok) throw new Error(`status ${response.status}`);
  } catch (error) {
    typeIntoGuest(text);  // the guest's clipboard could not take it: typed instead
    return;
  }
  if (!rfb) return;
  // the guest's own paste, now that its clipboard holds the text
  rfb.sendKey(KeyTable.XK_Control_L, "ControlLeft", true);
  rfb.sendKey(KeyTable.XK_v, "KeyV");
  rfb.sendKey(KeyTable.XK_Control_L, "ControlLeft", false);
  rfb.focus();
}

pasteButton.addEventListener("click", async () => {
  try {
    const text = await navigator.clipboard.readText();
    if (text) pasteIntoGuest(text);
  } catch (error) {
    // the browser withholds the clipboard: offer the field to paste into instead
    typePanel.hidden = false;
    typeNote.textContent = t("clipboardWithheld");
    typeText.focus();
  }
});

// "Type text": for fields that refuse paste, the text goes as key presses, one by one.
typeOpenButton.addEventListener("click", () => {
  typePanel.hidden = !typePanel.hidden;
  typeNote.textContent = "";
  if (!typePanel.hidden) typeText.focus();
});
document.getElementById("type-close").addEventListener("click", () => {
  typePanel.hidden = true;
  typeText.value = "";
  if (rfb) rfb.focus();
});
typePanel.addEventListener("submit", (event) => {
  event.preventDefault();
  if (!rfb) return;
  const text = typeText.value;
  typeText.value = "";
  typePanel.hidden = true;
  rfb.focus();
  typeIntoGuest(text);
});

function typeIntoGuest(text) {
  for (const char of text) {
    if (char === "\n") {
      rfb.sendKey(KeyTable.XK_Return, "Enter");
      continue;
    }
    const keysym = keysyms.lookup(char.codePointAt(0));
    if (!keysym) continue;
    // capitals with Shift: a keysym the guest's VNC server adds to its keymap (Ü, say) sits
    // on a key of its own, whose unshifted level is the small letter
    const capital = char !== char.toLowerCase();
    if (capital) rfb.sendKey(KeyTable.XK_Shift_L, "ShiftLeft", true);
    rfb.sendKey(keysym, null);
    if (capital) rfb.sendKey(KeyTable.XK_Shift_L, "ShiftLeft", false);
  }
}

translatePage();
sessionStorage.removeItem("mc-viewer-reloads");
waitUntilReady();
