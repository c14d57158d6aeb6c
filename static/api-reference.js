// Renders /openapi.json as a readable page. No library, no inline code (the page's CSP allows
// scripts and fetches from this server only); text goes in through textContent, never as HTML.
"use strict";

function el(tag, attributes, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (name === "text") node.textContent = value; else node.setAttribute(name, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function refName(ref) {
  return ref.split("/").pop();
}

// A schema as a short type expression: "Classification", "array of LabelScore", "string (binary)".
function typeOf(schema) {
  if (!schema) return "any";
  if (schema.$ref) return refName(schema.$ref);
  if (schema.anyOf) return schema.anyOf.map(typeOf).join(" | ");
  if (schema.oneOf) return schema.oneOf.map(typeOf).join(" | ");
  if (schema.type === "array") return "array of " + typeOf(schema.items);
  if (schema.type === "object" && schema.additionalProperties) return "map of " + typeOf(schema.additionalProperties);
  let text = schema.type || "any";
  if (schema.contentMediaType) text += " (" + schema.contentMediaType + ")";
  else if (schema.format) text += " (" + schema.format + ")";
  if (schema.pattern) text += " matching " + schema.pattern;
  return text;
}

function schemaLink(schema) {
  if (schema && schema.$ref) return el("a", {href: "#schema-" + refName(schema.$ref), text: refName(schema.$ref)});
  return el("code", {text: typeOf(schema)});
}

function renderContent(content) {
  const list = el("ul");
  for (const [mediaType, media] of Object.entries(content || {})) {
    list.append(el("li", {}, el("code", {text: mediaType}), document.createTextNode(": "), schemaLink(media.schema)));
  }
  return list;
}

function renderOperation(path, method, op) {
  const id = op.operationId || (method + path);
  const section = el("section", {class: "operation", id: "op-" + id});
  section.append(el("h3", {}, el("span", {class: "method method-" + method, text: method}), document.createTextNode(" " + path)));
  section.append(el("p", {text: op.summary || ""}));
  if (op.description) section.append(el("p", {class: "small", text: op.description}));
  const params = (op.parameters || []);
  if (params.length) {
    const table = el("table", {}, el("tr", {}, el("th", {text: "parameter"}), el("th", {text: "in"}),
                                        el("th", {text: "type"}), el("th", {text: "required"})));
    for (const p of params) {
      table.append(el("tr", {}, el("td", {}, el("code", {text: p.name})), el("td", {text: p.in}),
                      el("td", {text: typeOf(p.schema)}), el("td", {text: p.required ? "yes" : "no"})));
    }
    section.append(table);
  }
  if (op.requestBody) {
    section.append(el("p", {text: "Request body" + (op.requestBody.required ? " (required)" : "") + ":"}));
    section.append(renderContent(op.requestBody.content));
  }
  const responses = el("dl", {class: "responses"});
  for (const [status, answer] of Object.entries(op.responses || {})) {
    const headers = Object.keys(answer.headers || {});
    responses.append(el("dt", {text: status + " " + (answer.description || "")}));
    responses.append(el("dd", {}, renderContent(answer.content),
                        headers.length ? el("p", {class: "small", text: "Headers: " + headers.join(", ")}) : null));
  }
  section.append(responses);
  return section;
}

function render(spec) {
  document.getElementById("title").textContent = (spec.info.title || "API") + " " + (spec.info.version || "") + " reference";
  const operations = document.getElementById("operations");
  operations.textContent = "";
  const byTag = new Map();
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags && op.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([path, method, op]);
    }
  }
  const toc = el("ul");
  for (const [tag, entries] of byTag) {
    operations.append(el("h2", {class: "tag-title", text: tag}));
    for (const [path, method, op] of entries) {
      operations.append(renderOperation(path, method, op));
      toc.append(el("li", {}, el("a", {href: "#op-" + (op.operationId || method + path), text: method.toUpperCase() + " " + path})));
    }
  }
  document.getElementById("toc").append(toc);
  const schemas = (spec.components && spec.components.schemas) || {};
  document.getElementById("schemas-title").hidden = false;
  const box = document.getElementById("schemas");
  for (const [name, schema] of Object.entries(schemas)) {
    box.append(el("h3", {id: "schema-" + name, text: name}));
    if (schema.description) box.append(el("p", {class: "small", text: schema.description}));
    box.append(el("pre", {text: JSON.stringify(schema, null, 2)}));
  }
}

fetch("/openapi.json", {headers: {Accept: "application/json"}})
  .then((response) => {
    if (!response.ok) throw new Error("GET /openapi.json answered " + response.status);
    return response.json();
  })
  .then(render)
  .catch((error) => {
    const operations = document.getElementById("operations");
    operations.textContent = "";
    operations.append(el("p", {class: "error", text: "Could not load the API description: " + error.message}));
  });
