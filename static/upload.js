// The upload page, enhanced: several photos at once (choose, drop, paste, camera), a preview
// at once, each photo sent as its own POST /file/ (three in flight) so results fill in one by one.
// Without this script the page's plain form posts the chosen photos in one request and gets
// the server's result page.
"use strict";

(function () {
  const form = document.getElementById("upload-form");
  if (!form || !window.fetch || !window.URL || !document.createElement("template").content) {
    return; // an old browser keeps the plain form
  }

  const IN_FLIGHT = 3; // enough to keep the server's batcher fed, few enough to show progress
  const maxFiles = Number(form.dataset.maxFiles) || 20;
  const maxUploadBytes = Number(form.dataset.maxUploadBytes) || Infinity;

  const chooser = document.getElementById("file");
  const camera = document.getElementById("camera");
  const dropzone = document.getElementById("dropzone");
  const notice = document.getElementById("notice");
  const section = document.getElementById("results-section");
  const list = document.getElementById("results");
  const progress = document.getElementById("progress");
  const announcer = document.getElementById("announcer");
  const template = document.getElementById("tile-template");
  const lightbox = document.getElementById("lightbox");
  const labels = parseLabels(list.dataset.labels);
  const neither = list.dataset.neither || "neither";

  function parseLabels(text) {
    try {
      const parsed = JSON.parse(text || "[]");
      return Array.isArray(parsed) ? parsed.filter((label) => typeof label === "string") : [];
    } catch (err) {
      return []; // no labels, no feedback buttons: the result itself still shows
    }
  }

  // Take over the form: the plain picker goes, the drop zone and camera button come.
  form.querySelector(".plain-picker").hidden = true;
  form.querySelector(".picker").hidden = false;
  chooser.required = false;

  const queue = [];
  let running = 0;
  let done = 0;
  let total = 0;
  const objectUrls = new Set();

  function objectUrl(blob) {
    const url = URL.createObjectURL(blob);
    objectUrls.add(url);
    return url;
  }

  function percent(score) {
    return (score * 100).toFixed(1) + " %";
  }

  async function jsonOrNull(response) {
    try {
      return await response.json();
    } catch (err) {
      return null;  // no body, or not JSON (a proxy's error page)
    }
  }

  function announce(text) {
    // Added, not replaced: a screen reader reads each addition to the live region, so answers
    // arriving close together are all heard. Only the last few are kept.
    const line = document.createElement("p");
    line.textContent = text;
    announcer.append(line);
    while (announcer.childElementCount > 5) {
      announcer.firstElementChild.remove();
    }
  }

  function showNotice(text) {
    notice.textContent = text;
    notice.hidden = !text;
  }

  function updateProgress() {
    progress.textContent = done < total ? `${done} of ${total} done` : `${total} done`;
  }

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    if (files.length === 0) {
      return;
    }
    const taken = files.slice(0, maxFiles);
    const left = files.length - taken.length;
    showNotice(left > 0
      ? `Up to ${maxFiles} photos at a time: the first ${maxFiles} are being classified, ` +
        `${left} ${left === 1 ? "was" : "were"} left out. Add ${left === 1 ? "it" : "them"} again afterwards.`
      : "");
    section.hidden = false;
    if (done === total) { // a new go after the last one finished: count afresh
      done = 0;
      total = 0;
    }
    total += taken.length;
    updateProgress();
    // Newest first, as photo apps list them; within one go, in the order given.
    const tiles = taken.map(makeTile);
    for (let i = tiles.length - 1; i >= 0; i--) {
      list.prepend(tiles[i].element);
    }
    tiles.forEach(function (tile) { queue.push(tile); });
    pump();
  }

  function makeTile(file, index) {
    const element = template.content.firstElementChild.cloneNode(true);
    const $ = function (selector) { return element.querySelector(selector); };
    const name = file.name || `pasted image ${index + 1}`;
    $(".filename").textContent = name;
    const preview = $(".preview");
    const tile = { file: file, name: name, element: element, $: $ };
    // Tried for every file: Safari draws HEIC, most other browsers cannot and say so with an
    // error event, which swaps in the placeholder until the server's thumbnail of the stored
    // image can take its place (the server decodes HEIC).
    preview.alt = `Your photo ${name}`;
    preview.addEventListener("error", function () { noPreview(); }, { once: true });
    preview.src = objectUrl(file);
    function noPreview() {
      preview.hidden = true;
      preview.removeAttribute("src");
      $(".no-preview").hidden = false;
      element.classList.add("without-preview");
      tile.previewFromServer = true;
      if (tile.answer) { serverPreview(tile); }
    }
    const opener = $(".photo");
    opener.setAttribute("aria-label", `Show ${name} large`);
    opener.addEventListener("click", function () { openLightbox(tile); });
    $(".opacity").addEventListener("input", function (event) { setOpacity(tile, event.target.value); });
    $(".retry").addEventListener("click", function () {
      $(".failure").hidden = true;
      $(".retry").hidden = true;
      setState(tile, "Waiting", "waiting");
      total += 1;
      updateProgress();
      queue.push(tile);
      pump();
    });
    $(".heatmap-toggle").addEventListener("click", function () { toggleHeatmap(tile); });
    setState(tile, "Waiting", "waiting");
    return tile;
  }

  function setState(tile, text, kind) {
    tile.element.dataset.state = kind;
    const state = tile.$(".state");
    state.textContent = text;
    state.hidden = !text;
  }

  function pump() {
    while (running < IN_FLIGHT && queue.length > 0) {
      running += 1;
      classify(queue.shift()).finally(function () {
        running -= 1;
        done += 1;
        updateProgress();
        if (done === total && total > 1) {
          announce(`All ${total} photos done.`);
        }
        pump();
      });
    }
  }

  async function classify(tile) {
    if (tile.file.size > maxUploadBytes) {
      const mb = (n) => (n / 1048576).toFixed(1) + " MB";
      return fail(tile, `This file is ${mb(tile.file.size)}; the limit is ${mb(maxUploadBytes)}.`,
                  "Send a smaller copy (most phones can share a photo at a smaller size).", false);
    }
    setState(tile, "Classifying…", "busy");
    const body = new FormData();
    body.append("file", tile.file, tile.name);
    let response;
    try {
      response = await fetch(form.action, {
        method: "POST", body: body, headers: { Accept: "application/json" }, credentials: "same-origin",
      });
    } catch (err) {
      return fail(tile, "Could not reach the server.", "Check the connection, then try again.", true);
    }
    const answer = await jsonOrNull(response);
    if (!response.ok || !answer || answer.error) {
      const error = (answer && answer.error) || {};
      return fail(tile, error.message || `The server answered ${response.status}.`, error.hint || "",
                  response.status >= 500 || response.status === 0);
    }
    show(tile, answer);
  }

  function fail(tile, message, hint, retryable) {
    tile.$(".no-preview").textContent = "No preview";
    setState(tile, "", "failed");
    tile.$(".failure").hidden = false;
    tile.$(".error-message").textContent = message;
    tile.$(".error-hint").textContent = hint;
    tile.$(".retry").hidden = !retryable;
    announce(`${tile.name}: not classified. ${message}`);
  }

  function show(tile, answer) {
    const $ = tile.$;
    tile.answer = answer;
    setState(tile, "", answer.unsure ? "unsure" : "done");
    $(".not-sure").hidden = !answer.unsure;
    $(".answer").hidden = false;
    $(".tile-foot").hidden = false;
    if (tile.previewFromServer) { serverPreview(tile); }
    $(".label").textContent = answer.label;
    $(".confidence").textContent = percent(answer.confidence);
    const bars = $(".bars");
    bars.textContent = "";
    const top = answer.top || Object.entries(answer.scores || {}).map(([label, score]) => ({ label, score }));
    top.forEach(function (entry) {
      const row = document.createElement("li");
      row.className = "bar" + (entry.label === answer.label ? " winner" : "");
      const name = document.createElement("span");
      name.className = "bar-label";
      name.textContent = entry.label;
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = percent(entry.score);
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = Math.max(0, Math.min(100, entry.score * 100)).toFixed(1) + "%"; // CSSOM: allowed by the CSP
      track.append(fill);
      row.append(name, track, value);
      bars.append(row);
    });
    if (answer.unsure) {
      const scores = top.map((entry) => `${entry.label} ${percent(entry.score)}`).join(" or ");
      $(".unsure").hidden = false;
      $(".unsure").textContent = `The model is not sure: ${scores}. If you can tell, trust your own eyes ` +
        "and say which it is below.";
    }
    offerFeedback(tile);
    const stored = $(".stored");
    stored.href = answer.image_url || `/uploads/${encodeURIComponent(answer.id)}`;
    stored.textContent = "Original"; // short: it shares a row with "Where it looked" in a desktop column
    const hidden = document.createElement("span");
    hidden.className = "visually-hidden";
    hidden.textContent = ` of ${tile.name}, as stored (opens in a new tab)`;
    stored.append(hidden);
    announce(`${tile.name}: ${answer.unsure ? "not sure, maybe " : ""}${answer.label}, ${percent(answer.confidence)}.`);
  }

  // A photo this browser cannot draw (HEIC outside Safari): the server's thumbnail of the
  // stored image instead, once there is one. If even that fails the placeholder stays.
  function serverPreview(tile) {
    const preview = tile.$(".preview");
    if (preview.dataset.fromServer) { return; }
    preview.dataset.fromServer = "true";
    preview.addEventListener("load", function () {
      preview.hidden = false;
      tile.$(".no-preview").hidden = true;
      tile.element.classList.remove("without-preview");
    }, { once: true });
    preview.src = `/uploads/${encodeURIComponent(tile.answer.id)}/thumbnail.webp`;
  }

  // --- the photo, large ------------------------------------------------------------------
  // A modal <dialog>: Escape and the Close button close it, the focus goes back to the tile's
  // photo, a click beside the picture (on the backdrop) closes it too.

  function openLightbox(tile) {
    const preview = tile.$(".preview");
    if (!lightbox || typeof lightbox.showModal !== "function" || preview.hidden || !preview.getAttribute("src")) {
      return;
    }
    document.getElementById("lightbox-title").textContent = tile.name;
    const image = document.getElementById("lightbox-image");
    image.src = preview.src;
    image.alt = `Your photo ${tile.name}`;
    if (preview.naturalWidth && preview.naturalHeight) { // the CSS sizes the picture by its shape
      image.parentElement.style.setProperty("--aspect", String(preview.naturalWidth / preview.naturalHeight));
    }
    const heat = document.getElementById("lightbox-heatmap");
    const overlay = tile.$(".heatmap");
    const heatOn = !overlay.hidden && overlay.getAttribute("src");
    heat.hidden = !heatOn;
    if (heatOn) {
      heat.src = overlay.src;
      heat.alt = overlay.alt;
      heat.style.opacity = overlay.style.opacity || "1"; // CSSOM: allowed by the CSP
    } else {
      heat.removeAttribute("src");
    }
    lightbox.showModal();
    document.getElementById("lightbox-close").focus();
  }

  function setOpacity(tile, percentValue) {
    const value = Math.max(0, Math.min(100, Number(percentValue) || 100)) / 100;
    tile.$(".heatmap").style.opacity = String(value); // CSSOM: allowed by the CSP
  }

  // --- "Was this right?" ------------------------------------------------------------------
  // One answer per tile: the buttons go once the server has stored it. While a request is out
  // the buttons are aria-disabled (not disabled: a disabled button drops the keyboard focus).

  function offerFeedback(tile) {
    const $ = tile.$;
    const choices = $(".feedback-choices");
    choices.textContent = "";
    if (labels.length === 0) {
      $(".tile-feedback").hidden = true;
      return;
    }
    $(".feedback-about").textContent = ` (${tile.name})`;
    const predicted = tile.answer.label;
    // One row of short buttons ("Yes", "CAT", "Neither"); each one's full meaning is its
    // accessible name, which contains what it shows (as speech input needs).
    const options = [[predicted, "Yes", `Yes, it is ${predicted}`]];
    labels.forEach(function (label) {
      if (label !== predicted) { options.push([label, label, `No, it is ${label}`]); }
    });
    options.push([neither, "Neither", "No, neither"]);
    options.forEach(function ([label, text, name]) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "feedback-choice";
      button.dataset.label = label;
      button.textContent = text;
      button.setAttribute("aria-label", name);
      button.addEventListener("click", function () { sendFeedback(tile, label); });
      choices.append(button);
    });
    tile.feedback = "open";
  }

  function feedbackBusy(tile, busy) {
    tile.$(".tile-feedback").setAttribute("aria-busy", String(busy));
    tile.$(".feedback-choices").querySelectorAll("button").forEach(function (button) {
      if (busy) {
        button.setAttribute("aria-disabled", "true");
      } else {
        button.removeAttribute("aria-disabled");
      }
    });
  }

  async function sendFeedback(tile, label) {
    if (tile.feedback !== "open") {
      return; // sending, or already sent: one answer per tile
    }
    tile.feedback = "sending";
    feedbackBusy(tile, true);
    let response;
    try {
      response = await fetch(`/uploads/${encodeURIComponent(tile.answer.id)}/feedback`, {
        method: "POST", body: JSON.stringify({ label: label }), credentials: "same-origin",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
      });
    } catch (err) {
      return feedbackFailed(tile, "Could not send your answer: the server cannot be reached.",
                            "Check the connection, then press your answer again.", true);
    }
    const answer = await jsonOrNull(response);
    if (!response.ok || !answer || answer.error) {
      const error = (answer && answer.error) || {};
      // Worth another press: too many answers for now (429) and a server that is struggling
      // (5xx). A 400, 401 or 404 would only be refused again.
      const retryable = response.status === 429 || response.status >= 500;
      return feedbackFailed(tile, error.message || `Your answer was not stored (the server answered ${response.status}).`,
                            [error.hint, waitUntil(response.headers.get("Retry-After"))].filter(Boolean).join(" "),
                            retryable);
    }
    tile.feedback = "sent";
    const thanks = tile.$(".feedback-thanks");
    thanks.textContent = thanksText(tile.answer.label, answer.label);
    thanks.hidden = false;
    const box = tile.$(".tile-feedback");
    const hadFocus = box.contains(document.activeElement);
    tile.$(".feedback-choices").textContent = ""; // gone: nothing left to press twice
    box.removeAttribute("aria-busy");
    box.hidden = true;
    if (hadFocus) {
      thanks.focus(); // the keyboard goes on from where the buttons were, not from the page's top
    }
    if (tile.element.isConnected) { // not after Clear took the tile away
      announce(`${tile.name}: ${thanks.textContent}`);
    }
  }

  function thanksText(predicted, given) {
    if (given === neither) {
      const named = labels.length === 2 ? `neither ${labels[0]} nor ${labels[1]}` : "none of these";
      return `Thanks — noted: it is ${named}.`;
    }
    return given === predicted ? `Thanks — noted: it is ${given}, as the model said.`
                               : `Thanks — noted: it is ${given}, not ${predicted}.`;
  }

  function waitUntil(retryAfter) {
    // Retry-After in seconds (the server sends no dates): when to press again, in local time.
    const seconds = Number(retryAfter);
    if (!retryAfter || !Number.isFinite(seconds) || seconds <= 0) {
      return "";
    }
    const at = new Date(Date.now() + seconds * 1000);
    return `Answers are taken again from ${at.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}.`;
  }

  function feedbackFailed(tile, message, hint, retryable) {
    const box = tile.$(".tile-feedback");
    const error = tile.$(".feedback-error");
    const hadFocus = box.contains(document.activeElement);
    error.textContent = hint ? `${message} ${hint}` : message;
    error.hidden = false;
    if (retryable) {
      tile.feedback = "open";
      feedbackBusy(tile, false);
    } else {
      tile.feedback = "refused";
      tile.$(".feedback-choices").textContent = "";
      box.removeAttribute("aria-busy");
      if (hadFocus) { error.focus(); }
    }
    if (tile.element.isConnected) {
      announce(`${tile.name}: ${error.textContent}`);
    }
  }

  async function toggleHeatmap(tile) {
    const button = tile.$(".heatmap-toggle");
    const overlay = tile.$(".heatmap");
    const pressed = button.getAttribute("aria-pressed") === "true";
    if (pressed) {
      button.setAttribute("aria-pressed", "false");
      overlay.hidden = true;
      tile.$(".heatmap-controls").hidden = true;
      return;
    }
    if (!overlay.getAttribute("src")) {
      // Fetched, not just an <img src>: a model without a convolution layer answers 422 with a
      // message worth showing, which an image element would swallow.
      button.disabled = true;
      button.setAttribute("aria-busy", "true");
      try {
        const response = await fetch(`/uploads/${encodeURIComponent(tile.answer.id)}/heatmap.png`);
        if (!response.ok) {
          let message = `No heatmap (the server answered ${response.status}).`;
          try {
            const body = await response.json();
            if (body && body.error && body.error.message) { message = body.error.message; }
          } catch (err) { /* keep the status line */ }
          heatmapError(tile, message);
          return;
        }
        overlay.alt = `Heatmap over ${tile.name}: the warm areas are where the model looked`;
        overlay.src = objectUrl(await response.blob());
      } catch (err) {
        heatmapError(tile, "Could not reach the server for the heatmap. Try again.");
        return;
      } finally {
        button.disabled = false;
        button.removeAttribute("aria-busy");
      }
    }
    tile.$(".heatmap-error").hidden = true;
    overlay.hidden = false;
    tile.$(".heatmap-controls").hidden = false;
    button.setAttribute("aria-pressed", "true");
  }

  function heatmapError(tile, message) {
    const box = tile.$(".heatmap-error");
    box.textContent = message;
    box.hidden = false;
    announce(`${tile.name}: ${message}`);
  }

  function clearResults() {
    queue.length = 0;
    list.textContent = "";
    objectUrls.forEach(function (url) { URL.revokeObjectURL(url); });
    objectUrls.clear();
    total = running;
    done = 0;
    showNotice("");
    section.hidden = true;
    dropzone.focus();
  }

  // --- every way a photo arrives --------------------------------------------------------
  if (lightbox) {
    document.getElementById("lightbox-close").addEventListener("click", function () { lightbox.close(); });
    lightbox.addEventListener("click", function (event) {
      if (event.target === lightbox) { lightbox.close(); } // the backdrop, not the picture
    });
  }

  // The example pictures: fetched from /static and sent exactly as a chosen file would be.
  const examples = form.querySelector(".examples");
  if (examples) {
    examples.hidden = false;
    examples.querySelectorAll("button.example").forEach(function (button) {
      button.addEventListener("click", async function () {
        try {
          const response = await fetch(button.dataset.src);
          if (!response.ok) { throw new Error(String(response.status)); }
          const blob = await response.blob();
          addFiles([new File([blob], button.dataset.name, { type: blob.type || "image/jpeg" })]);
        } catch (err) {
          showNotice("Could not load the example picture. Choose a photo of your own instead.");
        }
      });
    });
  }
  dropzone.addEventListener("click", function () { chooser.click(); });
  document.getElementById("camera-button").addEventListener("click", function () { camera.click(); });
  document.getElementById("clear").addEventListener("click", clearResults);
  [chooser, camera].forEach(function (input) {
    input.addEventListener("change", function () {
      addFiles(input.files);
      input.value = ""; // choosing the same photo again still fires "change"
    });
  });
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    addFiles(chooser.files);
  });

  // Dropped anywhere on the page: a miss beside the drop zone must not navigate away to the file.
  let dragDepth = 0;
  function carriesFiles(event) {
    return event.dataTransfer && Array.from(event.dataTransfer.types || []).includes("Files");
  }
  document.addEventListener("dragenter", function (event) {
    if (!carriesFiles(event)) { return; }
    dragDepth += 1;
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", function (event) {
    if (!carriesFiles(event)) { return; }
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) { document.body.classList.remove("dragging"); }
  });
  document.addEventListener("dragover", function (event) {
    if (!carriesFiles(event)) { return; }
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", function (event) {
    dragDepth = 0;
    document.body.classList.remove("dragging");
    if (!event.dataTransfer || event.dataTransfer.files.length === 0) { return; }
    event.preventDefault();
    addFiles(event.dataTransfer.files);
  });

  document.addEventListener("paste", function (event) {
    const data = event.clipboardData;
    if (!data) { return; }
    let files = Array.from(data.files || []);
    if (files.length === 0 && data.items) { // some browsers list a copied image only as an item
      files = Array.from(data.items).filter((item) => item.kind === "file")
        .map((item) => item.getAsFile()).filter(Boolean);
    }
    if (files.length === 0) { return; } // pasted text goes where it was going
    event.preventDefault();
    addFiles(files);
  });
})();
