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

  function showReview(card, review) {
    card.classList.remove("state-not_reviewed", "state-confirmed", "state-corrected");
    card.classList.add("state-" + review.state);
    card.querySelector("[data-review]").textContent = review.state + ": " + review.label;
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

  const confirmPage = document.getElementById("confirm-page");
  confirmPage.addEventListener("click", async () => {
    const ids = cards.filter((card) => card.querySelector("button.right")).map((card) => card.dataset.id);
    if (!ids.length) return;
    try {
      const answer = await post("/api/uploads/review", { reviews: ids.map((id) => ({ id: id, confirm: true })) });
      answer.reviewed.forEach((review) => {
        const card = cards.find((c) => c.dataset.id === review.id);
        if (card) showReview(card, review);
      });
      showCounts(answer.counts);
      status.textContent = "Confirmed " + answer.reviewed.length + " predictions.";
    } catch (error) {
      status.textContent = "Not saved: " + error.message;
    }
  });

  cards.forEach((card, i) => card.addEventListener("focus", () => {
    current = i;
    cards.forEach((c, j) => c.classList.toggle("selected", j === i));
  }));
  select(0);
})();
