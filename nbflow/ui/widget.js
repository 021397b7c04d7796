// nbflow's run widget in the browser (anywidget). The HTML comes from Python (widget.py); this
// places it and adds what needs the browser: sections that stay open or closed across updates,
// links that open notebooks inside the running Jupyter, a Cancel button that works while the
// kernel is busy (see widget.py's docstring for the three ways a cancel travels), and the
// "Rerun failed" button of a run that has ended (its static HTML; this sends its click).

function jupyterConfig() {
  const element = document.getElementById("jupyter-config-data");
  if (!element) return null;
  try {
    return JSON.parse(element.textContent || "{}");
  } catch (_error) {
    return null;
  }
}

function cookie(name) {
  const found = document.cookie.split("; ").find((c) => c.startsWith(name + "="));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
}

// "a/b" + "../c/d.ipynb" -> "a/c/d.ipynb"; null when it leaves the server's root
function joinPath(folder, relative) {
  const parts = folder ? folder.split("/").filter(Boolean) : [];
  for (const part of relative.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") {
      if (!parts.length) return null;
      parts.pop();
    } else {
      parts.push(part);
    }
  }
  return parts.join("/");
}

function encodePath(path) {
  return path.split("/").map(encodeURIComponent).join("/");
}

// The Jupyter server this page talks to, and the folder (server path) of this notebook.
function serverContext(kernelId) {
  const config = jupyterConfig();
  if (!config || !kernelId) return Promise.resolve(null);
  let base = config.baseUrl || "/";
  if (!base.endsWith("/")) base += "/";
  const request = (method, path, body) => {
    const headers = { "Content-Type": "application/json" };
    const xsrf = cookie("_xsrf");
    if (xsrf) headers["X-XSRFToken"] = xsrf;
    if (config.token) headers["Authorization"] = `token ${config.token}`;
    return fetch(base + path, {
      method, headers, credentials: "same-origin", body: body === undefined ? undefined : JSON.stringify(body),
    });
  };
  return request("GET", "api/sessions")
    .then((response) => (response.ok ? response.json() : []))
    .then((sessions) => {
      const session = sessions.find((s) => s.kernel && s.kernel.id === kernelId);
      if (!session) return null;
      const folder = session.path.includes("/") ? session.path.slice(0, session.path.lastIndexOf("/")) : "";
      return { request, folder, kernelId };
    })
    .catch(() => null);
}

const contexts = new Map(); // kernel id -> Promise of its server context, shared by the views

// A run that ended with failures is static HTML with a hidden "Rerun failed" button naming the run's
// rerun token; its model stays open in the kernel. A view of the model registers it here (on the page:
// the module may be loaded more than once), and the button, wherever it appears, is shown and sends
// its click to the model. A button whose model this page never saw (reloaded since) stays hidden.
const rerunModels = globalThis.__nbflowRerunModels || (globalThis.__nbflowRerunModels = new Map());
const RERUN = "button[data-nbflow-rerun]";

function revealRerun(node) {
  const buttons = node.matches && node.matches(RERUN) ? [node] : Array.from(node.querySelectorAll(RERUN));
  for (const button of buttons) {
    if (rerunModels.has(button.getAttribute("data-nbflow-rerun"))) {
      button.hidden = false; // hidden twice: a sanitizer may drop the attribute or the style, not both
      button.style.display = "";
    }
  }
}

function listenForRerun() {
  if (globalThis.__nbflowRerunListening) return;
  globalThis.__nbflowRerunListening = true;
  new MutationObserver((records) => {
    for (const record of records) {
      for (const node of record.addedNodes) if (node.nodeType === 1) revealRerun(node);
    }
  }).observe(document.body, { childList: true, subtree: true });
  document.addEventListener("click", (event) => {
    const button = event.target && event.target.closest ? event.target.closest(RERUN) : null;
    const model = button && rerunModels.get(button.getAttribute("data-nbflow-rerun"));
    if (!model || button.disabled) return;
    event.preventDefault();
    button.disabled = true;
    button.textContent = "Starting the rerun…";
    model.send({ rerun: true }); // arrives when the kernel is free; the rerun's widget replaces this output
  });
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "nbflow-widget";
  el.appendChild(root);
  const graph = document.createElement("div");
  graph.className = "nbflow-graph-live";
  const button = document.createElement("button");
  button.className = "nbflow-cancel jupyter-button";
  button.type = "button";
  const opened = new Map(); // data-key -> open, as the user left it
  let server = undefined; // undefined: not known yet; null: no Jupyter server to reach
  let clicked = false;

  root.addEventListener("toggle", (event) => {
    const key = event.target.getAttribute && event.target.getAttribute("data-key");
    if (key) opened.set(key, event.target.open);
  }, true);
  // The click that folds or unfolds is recorded too: its "toggle" event comes later, as a task of its own, and
  // an update waiting for the click (below) may have replaced the element by then, out of this listener's reach.
  root.addEventListener("click", (event) => {
    if (event.defaultPrevented || !event.target.closest) return; // the Cancel button in a summary: no folding
    const summary = event.target.closest("summary");
    if (!summary || event.target.closest("a, button, input, select, textarea")) return;
    const details = summary.parentElement;
    const key = details && details.tagName === "DETAILS" && details.getAttribute("data-key");
    if (key && root.contains(details)) opened.set(key, !details.open);
  });

  function linkFiles(container) {
    if (!server) return;
    for (const a of container.querySelectorAll("a[data-nbflow-path], svg a[href]")) {
      const relative = decodeURIComponent(a.getAttribute("data-nbflow-path") || a.getAttribute("href") || "");
      if (!relative || /^[a-z]+:/i.test(relative) || relative.startsWith("#")) continue;
      const path = joinPath(server.folder, relative);
      if (path === null) continue;
      // JupyterLab's and Notebook 7's CommandLinker opens it as a document, whatever the page's URL
      a.setAttribute("data-commandlinker-command", "docmanager:open");
      a.setAttribute("data-commandlinker-args", JSON.stringify({ path }));
    }
  }

  function showButton() {
    const controls = model.get("controls") || {};
    const slot = root.querySelector(":scope > details.nbflow-run .nbflow-actions"); // not an earlier run's
    if (!controls.attached || controls.finished) {
      button.remove();
      return;
    }
    if (slot && button.parentNode !== slot) slot.appendChild(button);
    const label = controls.label || "Cancel"; // a watch's widget says "Stop watching"
    if (controls.cancelling || clicked) {
      button.textContent = controls.busy_label || "Cancelling…";
      button.disabled = true;
      button.title = "The run stops: running kernels are stopped, notebooks saved";
    } else if (server === undefined) {
      button.textContent = label;
      button.disabled = true;
      button.title = "Finding the Jupyter server…";
    } else if (server && (requestPath(controls) !== null || controls.holds_kernel)) {
      // the request file through the server, or (a pipeline outside the server's folder) the kernel's interrupt
      button.textContent = label;
      button.disabled = false;
      button.title = "Stop the run, even while a cell runs: running kernels are stopped, notebooks saved";
    } else if (!controls.holds_kernel) {
      button.textContent = label;
      button.disabled = false;
      button.title = "Stop the run: the click reaches the kernel when no other cell keeps it busy";
    } else {
      button.textContent = "Interrupt the kernel (■) to cancel";
      button.disabled = true;
      button.title = "This front end has no Jupyter server to go through, and this cell holds the kernel: "
        + "interrupt the kernel to cancel cleanly, or run with background=True";
    }
  }

  function requestPath(controls) {
    return server && controls.cancel_path ? joinPath(server.folder, controls.cancel_path) : null;
  }

  button.addEventListener("click", (event) => {
    event.preventDefault(); // inside the summary: no folding
    event.stopPropagation();
    if (clicked) return;
    clicked = true;
    showButton();
    const controls = model.get("controls") || {};
    model.send({ cancel: true }); // arrives when the kernel reads its shell channel
    if (!server) return;
    const path = requestPath(controls);
    const write = path === null
      ? Promise.resolve(false)
      : server.request("PUT", "api/contents/" + encodePath(path),
        { type: "file", format: "text", content: "cancel\n" }).then((r) => r.ok).catch(() => false);
    write.then((written) => {
      if (!written && controls.holds_kernel) {
        server.request("POST", `api/kernels/${server.kernelId}/interrupt`).catch(() => undefined);
      }
    });
  });

  // A click is a press and a release on the same element: a body that came in between would replace that
  // element (the elapsed time changes every second, a running step's output more often) and the click would
  // be lost. So an update waits while a button is held inside the widget, and comes right after the click.
  // (Listened to on the window, first on every event's way: JupyterLab handles presses in notebooks itself.)
  let held = false;
  let waiting = false;
  const press = (event) => {
    if (root.contains(event.target)) held = true;
  };
  const release = () => {
    if (!held) return;
    held = false;
    if (waiting) setTimeout(update, 0); // after the click this release makes has been handled
  };
  window.addEventListener("pointerdown", press, true);
  window.addEventListener("pointerup", release, true);
  window.addEventListener("pointercancel", release, true);

  function update() {
    if (held) {
      waiting = true;
      return;
    }
    waiting = false;
    const scroll = root.querySelector(":scope > details.nbflow-run .nbflow-rows");
    const top = scroll ? scroll.scrollTop : 0;
    root.innerHTML = model.get("body");
    for (const details of root.querySelectorAll("details[data-key]")) {
      const key = details.getAttribute("data-key");
      if (opened.has(key)) details.open = opened.get(key);
    }
    const rows = root.querySelector(":scope > details.nbflow-run .nbflow-rows");
    if (rows) rows.scrollTop = top;
    const slot = root.querySelector(".nbflow-graph-slot");
    if (slot) slot.appendChild(graph);
    linkFiles(root);
    showButton();
  }

  function updateGraph() {
    graph.innerHTML = model.get("graph");
    linkFiles(graph);
  }

  const controls = model.get("controls") || {};
  if (controls.rerun_token) {
    rerunModels.set(controls.rerun_token, model);
    listenForRerun();
  }
  const kernelId = controls.kernel_id || "";
  if (!contexts.has(kernelId)) contexts.set(kernelId, serverContext(kernelId));
  contexts.get(kernelId).then((context) => {
    server = context;
    root.setAttribute("data-server", context ? "yes" : "no");
    linkFiles(root);
    showButton();
  });

  model.on("change:body", update);
  model.on("change:graph", updateGraph);
  model.on("change:controls", showButton);
  updateGraph();
  update();
  return () => {
    window.removeEventListener("pointerdown", press, true);
    window.removeEventListener("pointerup", release, true);
    window.removeEventListener("pointercancel", release, true);
    model.off("change:body", update);
    model.off("change:graph", updateGraph);
    model.off("change:controls", showButton);
  };
}

export default { render };
