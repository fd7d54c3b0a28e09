// The Surfaces view: live A2UI surfaces, rendered by a small renderer of our own.
//
// Why our own and not @a2ui/lit: the published renderer is built from TypeScript with Lit
// and the A2UI web core as dependencies; vendoring it means shipping a bundle we cannot
// read or patch, produced by a build step we do not run. The dashboard needs a read-only
// view of surfaces and a way to send clicks and inputs back, which fits in this one file.
//
// Safety: a surface is data from a remote agent. Nothing from it is ever parsed as HTML:
// every string goes through textContent or an attribute, component types are an allow
// list (anything else is a labelled placeholder), images load only from data: URLs (the
// page's Content-Security-Policy allows nothing else), and actions that would run a
// function (openUrl, ...) are not run: only named events are sent, as a2ui.action.
//
// Loaded before app.js, which calls refreshSurfaces() when the view opens and on the
// "a2ui.*" host events. Everything else stays inside this file's own scope (the page's
// scripts share one global scope: app.js has functions of the same names).
"use strict";

const refreshSurfaces = (() => {

  const surfaceState = {
    list: [], // the surfaces, as /api/surfaces gives them
    models: new Map(), // surfaceId -> the data model as the user edited it locally
    tabs: new Map(), // `${surfaceId}/${componentId}` -> selected tab index
    lastRoute: null,
  };

  const RENDERED = new Set([
    "Text", "Row", "Column", "List", "Card", "Divider", "Button", "TextField", "CheckBox",
    "Select", "ChoicePicker", "Image", "Badge", "Tabs", "Spacer",
  ]);

  function surfaceEl(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children) {
      if (child !== null && child !== undefined) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  // ------------------------------------------------------------------ data binding

  function pointerGet(model, path) {
    if (!path || path === "/") return model;
    let node = model;
    for (const raw of path.replace(/^\//, "").split("/")) {
      const key = raw.replace(/~1/g, "/").replace(/~0/g, "~");
      if (node === null || typeof node !== "object") return undefined;
      node = node[key];
    }
    return node;
  }

  function pointerSet(model, path, value) {
    const keys = path.replace(/^\//, "").split("/").map((k) => k.replace(/~1/g, "/").replace(/~0/g, "~"));
    let node = model;
    for (const key of keys.slice(0, -1)) {
      if (node[key] === null || typeof node[key] !== "object") node[key] = {};
      node = node[key];
    }
    node[keys[keys.length - 1]] = value;
  }

  // A path relative to the item a List template renders is joined to that item's path.
  function absolute(path, scope) {
    if (path.startsWith("/")) return path;
    return `${scope || ""}/${path}`;
  }

  // A dynamic value: a literal, `{path}` bound to the data model, or a function call (not run).
  function resolve(ctx, value) {
    if (value && typeof value === "object" && !Array.isArray(value)) {
      if (typeof value.path === "string") return pointerGet(ctx.model, absolute(value.path, ctx.scope));
      if (typeof value.call === "string" || typeof value["@call"] === "string") return "";
    }
    return value;
  }

  function text(ctx, value) {
    const resolved = resolve(ctx, value);
    if (resolved === undefined || resolved === null) return "";
    return typeof resolved === "string" ? resolved : JSON.stringify(resolved);
  }

  function boundPath(ctx, value) {
    return value && typeof value === "object" && typeof value.path === "string"
      ? absolute(value.path, ctx.scope)
      : null;
  }

  // ------------------------------------------------------------------ actions

  async function sendAction(surfaceId, body) {
    const status = document.getElementById("surface-result");
    try {
      const response = await api("/api/surfaces/action", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ surfaceId, ...body }),
      });
      const route = response.route || {};
      surfaceState.lastRoute = route;
      status.dataset.route = route.status || "";
      if (route.status === "delivered") {
        status.textContent = `Sent “${body.name}” to the agent's A2A task` +
          (route.taskState ? ` (${route.taskState.replace("TASK_STATE_", "").toLowerCase()})` : "") + ".";
      } else if (route.status === "failed") {
        status.textContent = `“${body.name}” was recorded, but the agent could not be reached: ${route.error}`;
      } else {
        status.textContent = `“${body.name}” was sent to the subscribers of this surface.`;
      }
    } catch (e) {
      status.dataset.route = "error";
      status.textContent = `Could not send “${body.name}”: ${e.message}`;
    }
    refreshSurfaces();
  }

  function actionContext(ctx, context) {
    const out = {};
    for (const [key, value] of Object.entries(context || {})) out[key] = resolve(ctx, value);
    return out;
  }

  // An input changed: the local data model takes the value, and the agent hears of it.
  function inputChanged(ctx, component, path, value) {
    if (path) pointerSet(ctx.model, path, value);
    sendAction(ctx.surfaceId, {
      name: "input",
      sourceComponentId: component.id,
      context: { path: path || "", value },
    });
  }

  // ------------------------------------------------------------------ components

  function renderChildren(ctx, children) {
    if (Array.isArray(children)) return children.map((id) => renderComponent(ctx, id));
    if (children && typeof children === "object" && typeof children.componentId === "string") {
      // A template: the component once per item of the list at `path`.
      const path = absolute(children.path || "", ctx.scope);
      const items = pointerGet(ctx.model, path);
      if (!Array.isArray(items)) return [];
      return items.slice(0, 200).map((_, i) =>
        renderComponent({ ...ctx, scope: `${path}/${i}` }, children.componentId),
      );
    }
    return [];
  }

  function placeholder(component, why) {
    return surfaceEl(
      "div",
      { class: "a2ui-placeholder", "data-component": component.component || "?", role: "note" },
      `${component.component || "Unknown"} component`,
      why ? ` (${why})` : " (not rendered in the dashboard)",
    );
  }

  function renderComponent(ctx, id) {
    const component = ctx.byId.get(id);
    if (!component) return surfaceEl("div", { class: "a2ui-placeholder", role: "note" }, `Missing component ${id}`);
    if (ctx.depth > 40) return placeholder(component, "nested too deeply");
    const inner = { ...ctx, depth: ctx.depth + 1 };
    const node = renderKnown(inner, component);
    node.dataset.componentId = component.id;
    if (!node.classList.contains("a2ui-placeholder")) node.dataset.component = component.component;
    return node;
  }

  function renderKnown(ctx, c) {
    if (!RENDERED.has(c.component)) return placeholder(c);
    switch (c.component) {
      case "Text": {
        const tag = { h1: "h3", h2: "h4", h3: "h5", h4: "h6", h5: "h6" }[c.variant] || "p";
        return surfaceEl(tag, { class: `a2ui-text a2ui-${c.variant || "body"}`, text: text(ctx, c.text) });
      }
      case "Row":
      case "Column":
        return surfaceEl(
          "div",
          { class: `a2ui-${c.component.toLowerCase()}`, "data-justify": c.justify, "data-align": c.align },
          ...renderChildren(ctx, c.children),
        );
      case "List":
        return surfaceEl(
          "ul",
          { class: `a2ui-list a2ui-${c.direction || "vertical"}` },
          ...renderChildren(ctx, c.children).map((child) => surfaceEl("li", {}, child)),
        );
      case "Card":
        return surfaceEl("div", { class: "a2ui-card" }, renderComponent(ctx, c.child));
      case "Divider":
        return surfaceEl("hr", { class: "a2ui-divider" });
      case "Spacer":
        return surfaceEl("div", { class: "a2ui-spacer", "aria-hidden": "true" });
      case "Badge":
        return surfaceEl("span", { class: `a2ui-badge a2ui-badge-${String(c.variant || "default").replace(/[^a-z]/gi, "")}`, text: text(ctx, c.text) });
      case "Button": {
        const button = surfaceEl("button", { type: "button", class: `a2ui-button a2ui-${c.variant || "default"}` });
        button.append(renderComponent(ctx, c.child));
        const event = c.action && c.action.event;
        if (event && typeof event.name === "string") {
          button.addEventListener("click", () =>
            sendAction(ctx.surfaceId, {
              name: event.name,
              sourceComponentId: c.id,
              context: actionContext(ctx, event.context),
            }),
          );
        } else {
          button.disabled = true;
          button.title = "This button runs a function; the dashboard does not run agent functions.";
        }
        return button;
      }
      case "TextField": {
        const path = boundPath(ctx, c.value);
        const input = surfaceEl("input", {
          type: c.variant === "obscured" ? "password" : c.variant === "number" ? "number" : "text",
          value: text(ctx, c.value),
        });
        if (c.variant === "longText") input.setAttribute("data-long", "");
        input.addEventListener("change", () => inputChanged(ctx, c, path, input.value));
        return surfaceEl("label", { class: "a2ui-field" }, surfaceEl("span", { text: text(ctx, c.label) }), input);
      }
      case "CheckBox": {
        const path = boundPath(ctx, c.value);
        const box = surfaceEl("input", { type: "checkbox" });
        box.checked = resolve(ctx, c.value) === true;
        box.addEventListener("change", () => inputChanged(ctx, c, path, box.checked));
        return surfaceEl("label", { class: "a2ui-check" }, box, surfaceEl("span", { text: text(ctx, c.label) }));
      }
      case "Select":
      case "ChoicePicker": {
        const path = boundPath(ctx, c.value);
        const chosen = resolve(ctx, c.value);
        const selected = new Set(Array.isArray(chosen) ? chosen : [chosen]);
        const multiple = c.variant === "multipleSelection";
        const select = surfaceEl("select", { multiple });
        for (const option of Array.isArray(c.options) ? c.options : []) {
          const item = surfaceEl("option", { value: option.value, text: text(ctx, option.label) });
          item.selected = selected.has(option.value);
          select.append(item);
        }
        select.addEventListener("change", () => {
          const values = [...select.selectedOptions].map((o) => o.value);
          inputChanged(ctx, c, path, values);
        });
        return surfaceEl("label", { class: "a2ui-field" }, surfaceEl("span", { text: text(ctx, c.label) }), select);
      }
      case "Image": {
        const url = text(ctx, c.url);
        if (/^data:image\/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/=]+$/.test(url)) {
          return surfaceEl("img", { class: `a2ui-image a2ui-${c.variant || "mediumFeature"}`, src: url, alt: text(ctx, c.description) || "" });
        }
        return surfaceEl(
          "figure",
          { class: "a2ui-placeholder", "data-component": "Image", role: "note" },
          "Image (not loaded: the dashboard shows embedded images only): ",
          surfaceEl("code", { text: url.slice(0, 200) }),
        );
      }
      case "Tabs": {
        const key = `${ctx.surfaceId}/${c.id}`;
        const tabs = Array.isArray(c.tabs) ? c.tabs : [];
        const current = Math.min(surfaceState.tabs.get(key) || 0, Math.max(tabs.length - 1, 0));
        const bar = surfaceEl("div", { class: "a2ui-tabbar", role: "tablist" });
        tabs.forEach((tab, i) => {
          const button = surfaceEl("button", {
            type: "button",
            role: "tab",
            "aria-selected": i === current ? "true" : "false",
            text: text(ctx, tab.title),
          });
          button.addEventListener("click", () => {
            surfaceState.tabs.set(key, i);
            renderSurfaces();
          });
          bar.append(button);
        });
        const panel = surfaceEl("div", { class: "a2ui-tabpanel", role: "tabpanel" });
        if (tabs[current]) panel.append(renderComponent(ctx, tabs[current].child));
        return surfaceEl("div", { class: "a2ui-tabs" }, bar, panel);
      }
      default:
        return placeholder(c);
    }
  }

  // ------------------------------------------------------------------ surfaces

  function ownerLine(surface) {
    const owner = surface.owner || {};
    if (owner.kind === "a2a") {
      return `A2A task ${owner.taskId || "?"} at ${owner.endpoint || "?"}` +
        (surface.hasRouteAuth ? " · route credential held by the server" : "");
    }
    if (owner.kind === "agent") return `attached agent ${owner.agentId}`;
    return "a local session";
  }

  function renderSurface(surface) {
    const byId = new Map((surface.components || []).map((c) => [c.id, c]));
    if (!surfaceState.models.has(surface.surfaceId) || surfaceState.models.get(surface.surfaceId).updatedAt !== surface.updatedAt) {
      surfaceState.models.set(surface.surfaceId, {
        updatedAt: surface.updatedAt,
        model: JSON.parse(JSON.stringify(surface.dataModel ?? {})),
      });
    }
    const ctx = {
      surfaceId: surface.surfaceId,
      byId,
      model: surfaceState.models.get(surface.surfaceId).model,
      scope: "",
      depth: 0,
    };
    const titleId = `surface-${surface.surfaceId}`;
    const body = byId.has("root")
      ? renderComponent(ctx, "root")
      : surfaceEl("p", { class: "empty", text: "This surface has no root component yet." });
    return surfaceEl(
      "li",
      { class: "surface", "data-surface-id": surface.surfaceId, "aria-labelledby": titleId },
      surfaceEl("h3", { id: titleId }, surfaceEl("code", { text: surface.surfaceId })),
      surfaceEl("p", { class: "meta", text: `From ${ownerLine(surface)} · updated ${time(surface.updatedAt)}` }),
      surfaceEl("div", { class: "a2ui-surface" }, body),
    );
  }

  function renderSurfaces() {
    const list = document.getElementById("surfaces");
    list.replaceChildren(...surfaceState.list.map(renderSurface));
    document.getElementById("no-surfaces").hidden = surfaceState.list.length !== 0;
  }

  async function refreshSurfaces() {
    try {
      surfaceState.list = (await api("/api/surfaces")).surfaces;
    } catch (e) {
      return;
    }
    renderSurfaces();
  }

  return refreshSurfaces;
})();
