// The review grid's keys and buttons. The page works as plain HTML; this adds the actions.
// Keys: arrows (or j/k) move, y confirms the prediction, each label's first letter sets it, n: neither.
(function () {
  "use strict";
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const grid = document.getElementById("grid");
  const status = document.getElementById("status");
  const cards = Array.from(grid.querySelectorAll(".card"));
  let current = 0;

  function select(index) {
    if (!cards.length) return;
    current = Math.max(0, Math.min(index, cards.length - 1));
    cards.forEach((card, i) => card.classList.toggle("selected", i === current));
    cards[current].focus({ preventScroll: false });
  }

  function showCounts(counts) {
    Object.entries(counts || {}).forEach(([name, value]) => {
      const el = document.querySelector('[data-count="' + name + '"]');
      if (el) el.textContent = String(value);
    });
  }

  // The reviewer's decision replaces the model's label as what the card says (highlighted).
  function showReview(card, review) {
    card.classList.remove("state-not_reviewed", "state-confirmed", "state-corrected");
    card.classList.add("state-" + review.state);
    const decision = card.querySelector("[data-decision]");
    decision.textContent = review.label;
    decision.hidden = false;
    const modelSaid = card.querySelector("[data-model-said]");
    if (modelSaid) modelSaid.hidden = false;
    card.querySelector("[data-review]").textContent = review.state;
    card.querySelectorAll("button[data-label]").forEach((button) => {
      const chosen = button.dataset.label === review.label;
      button.classList.toggle("right", chosen);
      button.classList.toggle("chosen", chosen);
      button.classList.toggle("secondary", !chosen);
    });
  }

  async function post(url, body) {
    const response = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf, "Accept": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) {
      const error = answer.error || {};
      throw new Error((error.message || response.statusText) + (error.hint ? " " + error.hint : ""));
    }
    return answer;
  }

  async function decide(card, label) {
    const body = label === null ? { confirm: true } : { label: label };
    try {
      const answer = await post("/api/uploads/" + card.dataset.id + "/review", body);
      showReview(card, answer);
      showCounts(answer.counts);
      status.textContent = "Saved: " + answer.label + ".";
      if (cards[current] === card) select(current + 1);
    } catch (error) {
      status.textContent = "Not saved: " + error.message;
    }
  }

  grid.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-label]");
    if (!button) return;
    const card = button.closest(".card");
    select(cards.indexOf(card));
    decide(card, button.dataset.label);
  });

  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (event.target.closest("input, select, textarea")) return;
    const key = event.key.toLowerCase();
    if (key === "arrowright" || key === "j") { select(current + 1); event.preventDefault(); return; }
    if (key === "arrowleft" || key === "k") { select(current - 1); event.preventDefault(); return; }
    const card = cards[current];
    if (!card) return;
    if (key === "y") { decide(card, null); event.preventDefault(); return; }
    const button = card.querySelector('button[data-key="' + CSS.escape(key) + '"]');
    if (button) { decide(card, button.dataset.label); event.preventDefault(); }
  });

  // The bulk confirm asks first, and only ever touches uploads nobody has reviewed (the server
  // enforces that too): a person's decision is never replaced by the model's label.
  const confirmPage = document.getElementById("confirm-page");
  const dialog = document.getElementById("confirm-dialog");
  const unreviewed = () => cards.filter((card) => card.dataset.predicted !== undefined
    && card.classList.contains("state-not_reviewed"));

  async function confirmUnreviewed(ids) {
    try {
      const answer = await post("/api/uploads/review", { reviews: ids.map((id) => ({ id: id, confirm: true })) });
      answer.reviewed.forEach((review) => {
        const card = cards.find((c) => c.dataset.id === review.id);
        if (card) showReview(card, review);
      });
      showCounts(answer.counts);
      const kept = (answer.already_reviewed || []).length;
      status.textContent = "Confirmed " + answer.reviewed.length + " predictions."
        + (kept ? " " + kept + " had been reviewed meanwhile and keep that review." : "");
    } catch (error) {
      status.textContent = "Not saved: " + error.message;
    }
  }

  confirmPage.addEventListener("click", () => {
    const ids = unreviewed().map((card) => card.dataset.id);
    if (!ids.length) {
      status.textContent = "Nothing to confirm: every upload on this page with a prediction has a review.";
      return;
    }
    dialog.querySelector("[data-confirm-count]").textContent = String(ids.length);
    dialog.dataset.ids = ids.join(",");
    dialog.showModal();
    document.getElementById("confirm-cancel").focus();
  });
  document.getElementById("confirm-cancel").addEventListener("click", () => dialog.close());
  document.getElementById("confirm-go").addEventListener("click", () => {
    const ids = (dialog.dataset.ids || "").split(",").filter(Boolean);
    dialog.close();
    if (ids.length) confirmUnreviewed(ids);
  });
  // Keys typed in the dialog answer the dialog, not the grid behind it.
  dialog.addEventListener("keydown", (event) => event.stopPropagation());

  cards.forEach((card, i) => card.addEventListener("focus", () => {
    current = i;
    cards.forEach((c, j) => c.classList.toggle("selected", j === i));
  }));
  select(0);
})();
