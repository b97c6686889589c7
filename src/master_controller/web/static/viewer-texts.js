// What the viewer page says, in each language it speaks; the browser's languages choose
// (the first one spoken here, English otherwise). Placeholders: {name}.
const TEXTS = {
  en: {
    title: "Sign-in browser",
    loading: "Loading…",
    preparing: "Preparing your isolated browser…",
    progress: "Progress",
    screen: "Remote browser",
    latencyTitle: "Round trip to the controller",
    moreTime: "More time",
    keyboard: "Keyboard",
    keyboardTitle: "Open your device's keyboard to type into the browser below",
    keyboardInput: "Keyboard input for the browser below",
    fit: "Fit to window",
    fitTitle: "Resize the browser below to this window (off: keep its size and scale it)",
    paste: "Paste",
    pasteTitle: "Paste your clipboard's text into the browser below (Ctrl+V works too)",
    typeOpen: "Type text…",
    typeOpenTitle: "For fields that refuse paste: the text is typed key by key",
    typeLabel: "Text to type into the focused field",
    typeSend: "Type it",
    typeClose: "Close",
    clipboardWithheld: "Your browser does not let the page read the clipboard: paste here, then Type it.",
    task: "Sign in to {provider} in the window below.",
    timeLeft: "{time} left",
    extendFailed: "could not extend: {error}",
    noAnswer: "no answer",
    connected: "Connected",
    signedIn: "Signed in",
    signedInMessage: "Signed in. You can close this tab.",
    ended: "Ended",
    timedOutMessage: "The time for this sign-in ran out ({reason}). Start a new sign-in to try again.",
    cancelled: "Cancelled",
    cancelledMessage: "This sign-in was cancelled. You can close this tab.",
    failed: "Failed",
    failedMessage: "The sign-in failed: {reason}.",
    finishing: "Finishing…",
    finishingMessage: "Saving your sign-in…",
    refused: "Refused",
    waiting: "Waiting…",
    unreachable: "Cannot reach the controller ({error}); retrying…",
    hibernated: "Hibernated",
    queuedNext: "Many people are signing in right now: waiting for a free slot, you are next…",
    queued: "Many people are signing in right now: waiting for a free slot, {ahead} ahead of you…",
    resuming: "Resuming…",
    resumingMessage: "Waking your isolated browser up…",
    starting: "Starting…",
    startingMessage: "Starting your isolated browser ({status})…",
    connecting: "Connecting…",
    connectingMessage: "Connecting to your browser…",
    reconnecting: "Reconnecting…",
    reconnectingMessage: "{words}{why} Reconnecting in {delay} s…",
    closedWithCode: "The connection closed (code {code}).",
    close1006: "The connection dropped without a reason (network or proxy problem).",
    close1011: "The browser machine's display could not be reached.",
    close4401: "This viewer link is not valid any more. Open the link you were given again.",
    close4403: "This page is not allowed to open the viewer connection.",
    close4404: "This sign-in session does not exist.",
    close4409: "The browser machine is not ready yet.",
    close4410: "This sign-in session has ended.",
    close4412: "This session was put to sleep (hibernated). It comes back when it is resumed.",
    close4429: "This session has as many viewers as it allows. Close another viewer and retry.",
  },
  de: {
    title: "Anmelde-Browser",
    loading: "Lädt…",
    preparing: "Ihr isolierter Browser wird vorbereitet…",
    progress: "Fortschritt",
    screen: "Entfernter Browser",
    latencyTitle: "Antwortzeit des Controllers",
    moreTime: "Mehr Zeit",
    keyboard: "Tastatur",
    keyboardTitle: "Die Tastatur Ihres Geräts öffnen, um in den Browser unten zu tippen",
    keyboardInput: "Tastatureingabe für den Browser unten",
    fit: "An Fenster anpassen",
    fitTitle: "Den Browser unten an dieses Fenster anpassen (aus: seine Größe behalten und skalieren)",
    paste: "Einfügen",
    pasteTitle: "Den Text Ihrer Zwischenablage in den Browser unten einfügen (Strg+V geht auch)",
    typeOpen: "Text tippen…",
    typeOpenTitle: "Für Felder, die kein Einfügen zulassen: der Text wird Taste für Taste getippt",
    typeLabel: "Text, der in das ausgewählte Feld getippt wird",
    typeSend: "Tippen",
    typeClose: "Schließen",
    clipboardWithheld: "Ihr Browser lässt die Seite die Zwischenablage nicht lesen: hier einfügen, dann Tippen.",
    task: "Melden Sie sich im Fenster unten bei {provider} an.",
    timeLeft: "noch {time}",
    extendFailed: "nicht verlängert: {error}",
    noAnswer: "keine Antwort",
    connected: "Verbunden",
    signedIn: "Angemeldet",
    signedInMessage: "Angemeldet. Sie können diesen Tab schließen.",
    ended: "Beendet",
    timedOutMessage: "Die Zeit für diese Anmeldung ist abgelaufen ({reason}). Starten Sie eine neue Anmeldung.",
    cancelled: "Abgebrochen",
    cancelledMessage: "Diese Anmeldung wurde abgebrochen. Sie können diesen Tab schließen.",
    failed: "Fehlgeschlagen",
    failedMessage: "Die Anmeldung ist fehlgeschlagen: {reason}.",
    finishing: "Wird abgeschlossen…",
    finishingMessage: "Ihre Anmeldung wird gespeichert…",
    refused: "Abgelehnt",
    waiting: "Warten…",
    unreachable: "Der Controller ist nicht erreichbar ({error}); neuer Versuch…",
    hibernated: "Ruht",
    queuedNext: "Gerade melden sich viele an: Sie warten auf einen freien Platz und sind als Nächste dran…",
    queued: "Gerade melden sich viele an: Sie warten auf einen freien Platz, {ahead} vor Ihnen…",
    resuming: "Wird fortgesetzt…",
    resumingMessage: "Ihr isolierter Browser wird geweckt…",
    starting: "Startet…",
    startingMessage: "Ihr isolierter Browser startet ({status})…",
    connecting: "Verbindet…",
    connectingMessage: "Verbindung zu Ihrem Browser…",
    reconnecting: "Verbindet neu…",
    reconnectingMessage: "{words}{why} Neue Verbindung in {delay} s…",
    closedWithCode: "Die Verbindung wurde geschlossen (Code {code}).",
    close1006: "Die Verbindung brach ohne Grund ab (Netzwerk- oder Proxy-Problem).",
    close1011: "Die Anzeige des Browser-Rechners war nicht erreichbar.",
    close4401: "Dieser Link gilt nicht mehr. Öffnen Sie den Link, den Sie bekommen haben, noch einmal.",
    close4403: "Diese Seite darf die Verbindung nicht öffnen.",
    close4404: "Diese Anmeldung gibt es nicht.",
    close4409: "Der Browser-Rechner ist noch nicht bereit.",
    close4410: "Diese Anmeldung ist beendet.",
    close4412: "Diese Sitzung ruht. Sie kommt zurück, wenn sie fortgesetzt wird.",
    close4429: "Diese Sitzung hat schon so viele Betrachter wie erlaubt. Schließen Sie einen und versuchen Sie es erneut.",
  },
};

export const LANGUAGE =
  (navigator.languages || [navigator.language || "en"])
    .map((tag) => String(tag).toLowerCase().split("-")[0])
    .find((code) => code in TEXTS) || "en";

// The text for ``key`` in the page's language, with its {placeholders} filled in.
export function t(key, values = {}) {
  const text = TEXTS[LANGUAGE][key] ?? TEXTS.en[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (_, name) => String(values[name] ?? ""));
}

// The page's own labels: elements say which text they show (data-i18n), and which text is
// their tooltip or accessible name (data-i18n-title, data-i18n-label).
export function translatePage() {
  document.documentElement.lang = LANGUAGE;
  document.title = t("title");
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of document.querySelectorAll("[data-i18n-label]")) {
    el.setAttribute("aria-label", t(el.dataset.i18nLabel));
  }
}
