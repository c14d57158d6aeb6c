// Starts Swagger UI (served by this app from /docs/assets/) on /openapi.json. A file of its own,
// not an inline script: the page's CSP allows scripts from this origin only.
"use strict";

window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout",        // no top bar: the document is this server's, not a URL to type
    // No deep links: they put a link inside each operation's toggle button (nested controls, which
    // screen readers cannot reach); an operation opens with a click or Enter.
    deepLinking: false,
    validatorUrl: null,          // never send the document to an outside validator
    requestSnippetsEnabled: true,  // each executed request also as curl (bash, cmd, PowerShell)
    displayRequestDuration: true,
    defaultModelsExpandDepth: 0,
    docExpansion: "list",
    syntaxHighlight: false,      // its colour theme has too little contrast; answers show as plain text
  });

  // Swagger UI's file pickers (try-it on POST /file/) come without a label: name them for
  // screen readers from the field they fill. Its answer boxes scroll: keyboards must reach them.
  new MutationObserver(() => {
    for (const box of document.querySelectorAll("#swagger-ui .highlight-code > pre:not([tabindex])")) {
      box.setAttribute("tabindex", "0");
    }
    for (const input of document.querySelectorAll("#swagger-ui input[type=file]:not([aria-label])")) {
      const row = input.closest("tr");
      const name = row && row.querySelector(".parameter__name");
      input.setAttribute("aria-label", (name ? name.textContent.replace(/[*\s]|required/g, "") : "file") + ": choose a file");
    }
  }).observe(document.getElementById("swagger-ui"), {childList: true, subtree: true});
});
