// dpokit label: the page's script. Plain JS, no build step. Model text is only ever set with
// textContent (never innerHTML): a response holding <script> or an onerror attribute is shown as text.
"use strict";

(() => {
  const token = new URLSearchParams(window.location.search).get("token") || "";
  const NAME_KEY = "dpokit-label-annotator";
  const NAME_RE = /^[\w.@-]{1,40}$/u;
  const $ = (id) => document.getElementById(id);

  let config = null; // {mode, annotator, items, overlap, max_reason}
  let annotator = null;
  let state = null; // the server's view: {item, progress, can_undo, ...}
  let confidence = null;
  let busy = false;

  async function api(path, body) {
    const options = { headers: { "X-Dpokit-Token": token }, cache: "no-store" };
    if (body !== undefined) {
      options.method = "POST";
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    const response = await fetch(path, options);
    let data = null;
    try {
      data = await response.json();
    } catch (e) {
      data = null;
    }
    if (!response.ok) {
      throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
    }
    return data;
  }

  function say(text, isError) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", Boolean(isError));
  }

  function show(id, visible) {
    $(id).hidden = !visible;
  }

  function duration(seconds) {
    if (seconds < 90) return `${Math.round(seconds)} s`;
    const minutes = Math.round(seconds / 60);
    if (minutes < 90) return `${minutes} min`;
    return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
  }

  function renderPrompt(prompt) {
    const box = $("prompt");
    box.replaceChildren();
    const turns = typeof prompt === "string" ? [{ role: "", content: prompt }] : prompt;
    for (const turn of turns) {
      const div = document.createElement("div");
      div.className = "turn";
      if (turn.role) {
        const role = document.createElement("span");
        role.className = "role";
        role.textContent = turn.role;
        div.appendChild(role);
      }
      const text = document.createElement("div");
      text.className = "text";
      text.textContent = turn.content;
      div.appendChild(text);
      box.appendChild(div);
    }
  }

  function renderProgress(p) {
    let line = `${p.done} / ${p.total} done`;
    if (config.overlap > 1 || p.complete !== p.done) line += ` · ${p.complete} / ${p.items} items complete`;
    $("progress").textContent = line;
    $("eta").textContent = p.eta_s === null || p.total === p.done ? "" : `· about ${duration(p.eta_s)} left`;
  }

  function setConfidence(value) {
    confidence = confidence === value ? null : value;
    for (const button of document.querySelectorAll("[data-confidence]")) {
      const on = Number(button.dataset.confidence) === confidence;
      button.classList.toggle("selected", on);
      button.setAttribute("aria-pressed", String(on));
    }
  }

  function render(next) {
    state = next;
    confidence = null;
    setConfidence(null);
    $("reason").value = "";
    $("who").textContent = `· ${next.annotator}`;
    renderProgress(next.progress);
    $("undo").disabled = !next.can_undo;
    const item = next.item;
    show("task", Boolean(item));
    show("done", !item);
    if (!item) return;
    const pair = config.mode === "pair";
    renderPrompt(item.prompt);
    $("head-a").textContent = pair ? "A" : "Response";
    $("text-a").textContent = item.responses[0];
    show("resp-b", pair);
    $("text-b").textContent = pair ? item.responses[1] : "";
    $("task").dataset.item = item.id;
  }

  async function run(work, message) {
    if (busy) return;
    busy = true;
    try {
      render(await work());
      say(message || "", false);
    } catch (e) {
      say(e.message, true);
    } finally {
      busy = false;
    }
  }

  function choose(choice) {
    if (!state || !state.item) return;
    const item = state.item;
    const body = {
      annotator, item: item.id, shown: item.shown, choice, confidence,
      reason: $("reason").value.slice(0, config.max_reason),
    };
    run(() => api("/api/label", body), `saved: ${choice} (${item.id})`);
  }

  function undo() {
    if (!state || !state.can_undo) return;
    run(() => api("/api/undo", { annotator }), "undone: label it again");
  }

  function keyAction(key) {
    const k = key.length === 1 ? key.toLowerCase() : key;
    if (k === "u") return undo;
    if (k === "1" || k === "2" || k === "3") return () => setConfidence(Number(k));
    const keys = config.mode === "pair"
      ? { a: "A", b: "B", t: "tie", s: "skip" }
      : { y: "up", ArrowUp: "up", n: "down", ArrowDown: "down", s: "skip" };
    return keys[k] ? () => choose(keys[k]) : null;
  }

  function onKey(event) {
    if (event.ctrlKey || event.metaKey || event.altKey || !config || !annotator) return;
    const target = event.target;
    if (target instanceof HTMLElement
        && (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName))) {
      if (target.id === "reason" && (event.key === "Escape" || event.key === "Enter")) {
        event.preventDefault();
        target.blur();
      }
      return; // typing in a field never labels
    }
    const action = keyAction(event.key);
    if (action) {
      event.preventDefault();
      action();
    }
  }

  function askName() {
    show("task", false);
    show("done", false);
    show("name-section", true);
    $("name-input").value = localStorage.getItem(NAME_KEY) || "";
    $("name-input").focus();
  }

  async function start(name) {
    annotator = name;
    $("rename").hidden = Boolean(config.annotator);
    show("name-section", false);
    await run(() => api(`/api/state?annotator=${encodeURIComponent(name)}`), "");
  }

  function wire() {
    document.addEventListener("keydown", onKey);
    for (const button of document.querySelectorAll("[data-choice]")) {
      button.addEventListener("click", () => {
        button.blur(); // so that Enter or a letter after a click does not act on the button again
        choose(button.dataset.choice);
      });
    }
    for (const button of document.querySelectorAll("[data-confidence]")) {
      button.addEventListener("click", () => {
        button.blur();
        setConfidence(Number(button.dataset.confidence));
      });
    }
    $("undo").addEventListener("click", () => {
      $("undo").blur();
      undo();
    });
    $("rename").addEventListener("click", () => {
      annotator = null;
      askName();
    });
    $("name-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const name = $("name-input").value.trim();
      if (!NAME_RE.test(name)) {
        say("a name is 1-40 letters, digits, or . _ @ -", true);
        return;
      }
      localStorage.setItem(NAME_KEY, name);
      $("name-input").blur();
      start(name);
    });
  }

  async function main() {
    wire();
    try {
      config = await api("/api/config");
    } catch (e) {
      say(`cannot reach the label server: ${e.message}`, true);
      return;
    }
    document.body.dataset.mode = config.mode;
    show("controls-pair", config.mode === "pair");
    show("controls-binary", config.mode === "binary");
    const name = config.annotator || localStorage.getItem(NAME_KEY);
    if (name && NAME_RE.test(name)) {
      await start(name);
    } else {
      askName();
    }
  }

  main();
})();
