// alignloop labelling page: rank by keyboard or drag and drop, thumbs up/down, undo, submit.
// Model text is never parsed as HTML here: the server renders it escaped, and this file only
// ever writes textContent.
(function () {
  "use strict";
  const main = document.getElementById("labeller");
  // a released set (its lease ended) can still be submitted: the server stores it if there is room
  if (!main || !["open", "released"].includes(main.dataset.status)) return;
  const mode = main.dataset.mode;
  const csrf = main.dataset.csrf;
  const assignment = main.dataset.assignment;
  const K = parseInt(main.dataset.k, 10);
  const list = document.getElementById("completions");
  const errorBox = document.getElementById("error");
  const value = {}; // completion id -> rank (1..K) | "F" | "up" | "down"
  const history = []; // snapshots for undo: {order, value, selected}
  let selected = 0;
  let sending = false;

  const cards = () => Array.from(list.querySelectorAll("li.card"));
  const cidOf = (li) => li.dataset.cid;

  function snapshot() {
    history.push({ order: cards().map(cidOf), value: Object.assign({}, value), selected: selected });
  }

  function undo() {
    const last = history.pop();
    if (!last) return;
    const byId = {};
    cards().forEach((li) => { byId[cidOf(li)] = li; });
    last.order.forEach((cid) => list.appendChild(byId[cid]));
    Object.keys(value).forEach((k) => delete value[k]);
    Object.assign(value, last.value);
    select(last.selected);
  }

  function label(v) {
    if (v === undefined) return "\u2013";
    if (v === "up") return "up"; // words, not emoji: a machine without an emoji font shows them too
    if (v === "down") return "down";
    return String(v);
  }

  function render() {
    const ranked = Object.values(value).filter((v) => typeof v === "number");
    const tied = new Set(ranked.filter((v, i) => ranked.indexOf(v) !== i));
    cards().forEach((li, i) => {
      const v = value[cidOf(li)];
      li.querySelector(".badge").textContent = label(v);
      li.classList.toggle("selected", i === selected);
      li.classList.toggle("failed", v === "F");
      li.classList.toggle("tied", tied.has(v));
      li.classList.toggle("done", v !== undefined);
    });
    errorBox.textContent = "";
  }

  function select(i, focus) {
    const n = cards().length;
    selected = Math.max(0, Math.min(n - 1, i));
    render();
    if (focus !== false) cards()[selected].focus();
  }

  function give(v) {
    const li = cards()[selected];
    snapshot();
    value[cidOf(li)] = v;
    select(selected + 1);
  }

  // Drag and drop: the order of the list becomes the ranking (F stays F).
  let dragged = null;
  function rankByOrder() {
    let r = 1;
    cards().forEach((li) => {
      const cid = cidOf(li);
      if (value[cid] !== "F") value[cid] = r++;
    });
  }
  list.addEventListener("dragstart", (e) => {
    dragged = e.target.closest("li.card");
    if (!dragged) return;
    e.dataTransfer.effectAllowed = "move";
    e.dataTransfer.setData("text/plain", cidOf(dragged));
    dragged.classList.add("dragging");
  });
  list.addEventListener("dragend", () => {
    if (dragged) dragged.classList.remove("dragging");
    dragged = null;
  });
  list.addEventListener("dragover", (e) => {
    if (dragged && mode === "rank") e.preventDefault();
  });
  list.addEventListener("drop", (e) => {
    e.preventDefault();
    const target = e.target.closest("li.card");
    if (!dragged || !target || target === dragged || mode !== "rank") return;
    snapshot();
    const all = cards();
    if (all.indexOf(dragged) < all.indexOf(target)) target.after(dragged);
    else target.before(dragged);
    rankByOrder();
    select(cards().indexOf(dragged), false);
  });

  list.addEventListener("click", (e) => {
    const li = e.target.closest("li.card");
    if (!li) return;
    select(cards().indexOf(li), false);
    const b = e.target.closest("button");
    if (!b) return;
    if (b.classList.contains("fail")) give("F");
    else if (b.classList.contains("up")) give("up");
    else if (b.classList.contains("down")) give("down");
    else if (b.classList.contains("tie") && selected > 0) {
      const above = value[cidOf(cards()[selected - 1])];
      if (typeof above === "number") give(above);
      else errorBox.textContent = "Rank the completion above first, then tie with it.";
    }
  });

  function newId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function submissionId() {
    // The same id for every retry of this set: the server stores a submission once.
    const key = "alignloop-submission-" + assignment;
    let id = null;
    try { id = sessionStorage.getItem(key); } catch (e) { /* storage off */ }
    if (!id) {
      id = newId();
      try { sessionStorage.setItem(key, id); } catch (e) { /* keep it in memory */ }
    }
    return id;
  }

  async function submit() {
    if (sending) return;
    const missing = cards().map((li, i) => (value[cidOf(li)] === undefined ? i + 1 : 0)).filter((i) => i);
    if (missing.length) {
      select(missing[0] - 1);
      errorBox.textContent = (mode === "rank" ? "Rank or fail every completion first: " : "Rate every completion first: ")
        + "#" + missing.join(", #") + " still open.";
      return;
    }
    const body = { submission_id: submissionId() };
    body[mode === "rank" ? "ranks" : "thumbs"] = Object.assign({}, value);
    sending = true;
    try {
      const r = await fetch("/api/assignments/" + assignment + "/submit", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(body),
      });
      if (r.ok) {
        try { sessionStorage.removeItem("alignloop-submission-" + assignment); } catch (e) { /* ignore */ }
        // reserve the next set (a POST: showing a page never reserves one), then show it
        try {
          await fetch("/api/next", {
            method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf },
          });
        } catch (e) { /* the page offers a "Next set" button instead */ }
        window.location.assign("/label");
        return;
      }
      let detail = r.statusText;
      try { detail = (await r.json()).detail || detail; } catch (e) { /* not JSON */ }
      errorBox.textContent = "Not saved: " + detail;
    } catch (e) {
      errorBox.textContent = "Network problem, nothing lost: press Enter to try again.";
    } finally {
      sending = false;
    }
  }

  document.getElementById("submit").addEventListener("click", submit);
  document.getElementById("undo").addEventListener("click", undo);

  document.addEventListener("keydown", (e) => {
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT")) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    const key = e.key;
    if (key === "Enter") {
      if (t && (t.tagName === "BUTTON" || t.tagName === "A")) return; // the button's own click
      e.preventDefault();
      submit();
    } else if (key === "ArrowDown" || key === "j" || key === "J") {
      e.preventDefault();
      select(selected + 1);
    } else if (key === "ArrowUp" || key === "k" || key === "K") {
      e.preventDefault();
      select(selected - 1);
    } else if (key === "u" || key === "U" || key === "Backspace") {
      e.preventDefault();
      undo();
    } else if (key === "s" || key === "S") {
      e.preventDefault();
      document.getElementById("skip-reason").focus();
    } else if (mode === "rank" && /^[1-9]$/.test(key)) {
      const d = parseInt(key, 10);
      if (d > K) {
        errorBox.textContent = "Ranks go from 1 (best) to " + K + ".";
        return;
      }
      give(d);
    } else if (mode === "rank" && (key === "f" || key === "F")) {
      give("F");
    } else if (mode === "thumbs" && (key === "y" || key === "Y" || key === "+")) {
      give("up");
    } else if (mode === "thumbs" && (key === "n" || key === "N" || key === "-")) {
      give("down");
    }
  });

  select(0);
})();
