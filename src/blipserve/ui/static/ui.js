// blipserve's try-it page. Plain JavaScript, no build step, no third-party code.
// Everything the server or the user supplies reaches the DOM through textContent or
// attributes, never as HTML. The API key lives only in its input field.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const ROUTES = {
    ready: new URL("../ready", location.href).href,
    score: new URL("../score", location.href).href,
    v1: new URL("../v1", location.href).href,
  };
  const SHOWN_CHARS = 40; // of a long base64 string in the displayed snippets
  const LONG = 120; // strings longer than this (and base64-like) are shortened on screen

  // What each model family does with a row's text (the /ready route's "kind").
  const KINDS = {
    "blip-caption": {
      name: "BLIP captioning",
      question: "Caption with a prefix",
      textLabel: "Caption prefix",
      textHelp: "BLIP captioning continues your text: the caption starts with it.",
      captionAllowed: true,
    },
    "blip-vqa": {
      name: "BLIP question answering",
      question: "Question",
      textLabel: "Question",
      textHelp: "Sent as the row's text.",
      captionAllowed: false,
    },
    "blip-itm": {
      name: "BLIP image-text matching",
      question: "Match a text",
      textLabel: "Text to match",
      textHelp: "The answer is the probability that the text describes the image.",
      captionAllowed: false,
    },
    "blip2-itm": {
      name: "BLIP-2 image-text matching",
      question: "Match a text",
      textLabel: "Text to match",
      textHelp: "The answer is the probability that the text describes the image.",
      captionAllowed: false,
    },
    blip2: {
      name: "BLIP-2",
      question: "Question",
      textLabel: "Question",
      textHelp:
        "BLIP-2 gets it as “Question: … Answer:” (text that already holds “Answer:” is sent as it is).",
      captionAllowed: true,
      wrapQuestion: true,
    },
  };

  const state = {
    model: null, // from /ready
    kind: null,
    images: [], // {id, name, file?, url?, preview}
    nextId: 1,
    snippets: null, // full texts, for the copy buttons
    busy: false,
  };

  // -- small DOM helpers ------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "text") node.textContent = value;
      else if (key === "className") node.className = value;
      else node.setAttribute(key, value);
    }
    node.append(...children);
    return node;
  }
  window.blipserveDom = { el }; // (jobs.js builds its table with it)

  function showStatus(text) {
    $("status").textContent = text;
  }

  function showError(text) {
    $("error").textContent = text;
  }

  function clearMessages() {
    showStatus("");
    showError("");
  }

  // -- the model ----------------------------------------------------------------------

  let readyTimer = null;

  async function checkReady() {
    clearTimeout(readyTimer);
    let response;
    let body = null;
    try {
      response = await fetch(ROUTES.ready, { cache: "no-store" });
      body = await response.json().catch(() => null);
    } catch (err) {
      $("model-status").textContent = "Cannot reach the server; retrying…";
      readyTimer = setTimeout(checkReady, 5000);
      return false;
    }
    if (response.ok && body && typeof body.kind === "string") {
      state.model = String(body.model);
      state.kind = body.kind;
      const family = KINDS[body.kind] ? KINDS[body.kind].name : body.kind;
      $("model-status").textContent = `Model ${state.model} (${family}) is ready.`;
      applyKind();
      return true;
    }
    const why = body && typeof body.message === "string" ? body.message : "the model is loading";
    $("model-status").textContent = `Not ready yet (${why}); checking again…`;
    readyTimer = setTimeout(checkReady, 2000);
    return false;
  }

  function applyKind() {
    const kind = KINDS[state.kind] || KINDS.blip2;
    $("mode-question-label").textContent = kind.question;
    $("question-label").textContent = kind.textLabel;
    $("question-help").textContent = kind.textHelp;
    const caption = $("mode-caption");
    caption.disabled = !kind.captionAllowed;
    if (!kind.captionAllowed) {
      $("mode-question").checked = true;
      $("mode-help").textContent = `${kind.name} needs a text for every image.`;
    } else {
      $("mode-help").textContent = "";
    }
    applyMode();
  }

  function mode() {
    return $("mode-question").checked ? "question" : "caption";
  }

  function applyMode() {
    $("question-box").hidden = mode() !== "question";
  }

  // The row text for a question, as the chat route and `blipserve ask` build it.
  function promptFor(question) {
    const kind = KINDS[state.kind];
    if (kind && kind.wrapQuestion && !/answer\s*:/i.test(question)) {
      return `Question: ${question} Answer:`;
    }
    return question;
  }

  // -- choosing images ----------------------------------------------------------------

  function addFiles(files) {
    for (const file of files) {
      state.images.push({
        id: state.nextId++,
        name: file.name || "pasted image",
        file,
        preview: URL.createObjectURL(file),
      });
    }
    renderPicked();
  }

  function addUrl(raw) {
    const text = raw.trim();
    if (!text) return false;
    let url;
    try {
      url = new URL(text);
    } catch (err) {
      showError(`“${text}” is not a URL: type a full http(s) address, e.g. https://example.com/a.jpg`);
      return false;
    }
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      showError(`Only http and https URLs can be fetched by the server, not ${url.protocol}`);
      return false;
    }
    state.images.push({ id: state.nextId++, name: url.href, url: url.href, preview: url.href });
    renderPicked();
    return true;
  }

  function removeImage(id) {
    const at = state.images.findIndex((image) => image.id === id);
    if (at < 0) return;
    const [gone] = state.images.splice(at, 1);
    if (gone.file) URL.revokeObjectURL(gone.preview);
    renderPicked();
  }

  function renderPicked() {
    const list = $("picked");
    list.replaceChildren(
      ...state.images.map((image, row) => {
        const remove = el("button", {
          type: "button",
          className: "secondary small",
          "aria-label": `Remove ${image.name}`,
          text: "Remove",
        });
        remove.addEventListener("click", () => {
          removeImage(image.id);
          $("file-input").focus();
        });
        return el(
          "li",
          { className: "picked-item" },
          el("img", { src: image.preview, alt: "", className: "thumb" }),
          el("span", { className: "picked-name", text: `${row}: ${image.name}` }),
          remove,
        );
      }),
    );
    const n = state.images.length;
    $("picked-summary").textContent =
      n === 0 ? "No images yet." : `${n} image${n === 1 ? "" : "s"} chosen (one row each).`;
    $("clear-images").hidden = n === 0;
  }

  function readBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => {
        const url = String(reader.result);
        resolve(url.slice(url.indexOf(",") + 1)); // drop the "data:...;base64," prefix
      };
      reader.onerror = () => reject(reader.error || new Error("could not read the file"));
      reader.readAsDataURL(file);
    });
  }

  // -- running ------------------------------------------------------------------------

  function intField(id) {
    const value = $(id).value.trim();
    return value === "" ? null : Number(value);
  }

  async function run(event) {
    event.preventDefault();
    if (state.busy) return;
    clearMessages();
    if ($("url-input").value.trim()) {
      if (!addUrl($("url-input").value)) {
        $("url-input").focus();
        return;
      }
      $("url-input").value = "";
    }
    if (state.images.length === 0) {
      showError("Add an image first: choose, drop or paste one, or type its URL.");
      $("file-input").focus();
      return;
    }
    if (!state.kind) await checkReady();
    const asking = mode() === "question";
    const question = $("question").value.trim();
    if (asking && !question) {
      showError(`Type the ${$("question-label").textContent.toLowerCase()} first.`);
      $("question").focus();
      return;
    }

    state.busy = true;
    $("run").disabled = true;
    $("output").setAttribute("aria-busy", "true");
    showStatus("Running…");
    try {
      const images = state.images.slice();
      const values = [];
      for (const image of images) {
        values.push(image.file ? await readBase64(image.file) : image.url);
      }
      const text = asking ? promptFor(question) : null;
      const body = {
        input_data: {
          columns: text === null ? ["image"] : ["image", "text"],
          index: values.map((_, i) => i),
          data: values.map((value) => (text === null ? [value] : [value, text])),
        },
      };
      const params = {};
      const maxNewTokens = intField("max-new-tokens");
      const numBeams = intField("num-beams");
      if (maxNewTokens !== null) params.max_new_tokens = maxNewTokens;
      if (numBeams !== null) params.num_beams = numBeams;
      if (Object.keys(params).length) body.params = params;

      const key = $("api-key").value.trim();
      const headers = { "Content-Type": "application/json" };
      if (key) headers.Authorization = `Bearer ${key}`;

      showSnippets({
        body,
        images,
        values,
        question: asking ? question : null,
        params,
        withKey: Boolean(key),
      });
      const started = performance.now();
      let response;
      try {
        response = await fetch(ROUTES.score, {
          method: "POST",
          headers,
          body: JSON.stringify(body),
          cache: "no-store",
        });
      } catch (err) {
        $("results").replaceChildren();
        showStatus("");
        showError(`Could not reach the server: ${err.message}`);
        return;
      }
      const raw = await response.text();
      const ms = Math.round(performance.now() - started);
      let answer = null;
      try {
        answer = JSON.parse(raw);
      } catch (err) {
        answer = null;
      }
      if (!response.ok) {
        showFailure(response, answer, raw, images, ms);
        return;
      }
      if (!Array.isArray(answer) || answer.length !== images.length) {
        $("results").replaceChildren();
        showStatus("");
        showError(`The server answered ${response.status} with an unexpected body: ${raw.slice(0, 300)}`);
        return;
      }
      showResults(images, answer, asking ? question : null, ms);
    } catch (err) {
      showStatus("");
      showError(`Something went wrong in this page: ${err.message}`);
    } finally {
      state.busy = false;
      $("run").disabled = false;
      $("output").removeAttribute("aria-busy");
    }
  }

  function showFailure(response, answer, raw, images, ms) {
    $("results").replaceChildren();
    showStatus(`Failed after ${ms} ms.`);
    const message =
      answer && typeof answer.message === "string"
        ? answer.message
        : raw.trim().slice(0, 300) || response.statusText;
    if (response.status === 401) {
      showError(
        `This server needs an API key (${message}). ` +
          "Enter it in the “API key” field and press Run again.",
      );
      $("api-key").focus();
      return;
    }
    // Name the image behind a row error ("row 2 (index 2): ...").
    const row = /^row (\d+)\b/.exec(message);
    const image = row ? images[Number(row[1])] : null;
    const which = image && images.length > 1 ? ` [row ${row[1]} is ${image.name}]` : "";
    showError(`Error ${response.status}: ${message}${which}`);
  }

  function showResults(images, answer, question, ms) {
    const n = images.length;
    const what = question === null ? "Captioned" : "Answered";
    showStatus(`${what} ${n} image${n === 1 ? "" : "s"} in ${ms} ms (round trip).`);
    $("results").replaceChildren(
      ...images.map((image, i) => {
        const item = answer[i] || {};
        const caption = el("figcaption", {});
        if (question !== null) caption.append(el("p", { className: "asked", text: question }));
        caption.append(el("p", { className: "result-text", text: String(item.text ?? "") }));
        if (typeof item.score === "number") {
          caption.append(el("p", { className: "hint", text: `score ${item.score.toFixed(4)}` }));
        }
        return el(
          "li",
          { className: "result" },
          el(
            "figure",
            {},
            el("img", { src: image.preview, alt: `Image ${i}: ${image.name}` }),
            caption,
          ),
        );
      }),
    );
  }

  // -- the same request as code -------------------------------------------------------

  function isBase64Like(value) {
    if (/^data:[^,]*;base64,/.test(value)) return true;
    return /^[A-Za-z0-9+/=\s]+$/.test(value);
  }

  function shorten(value) {
    if (typeof value === "string") {
      if (value.length > LONG && isBase64Like(value)) {
        const more = value.length - SHOWN_CHARS;
        return `${value.slice(0, SHOWN_CHARS)}…[${more} more characters]`;
      }
      return value;
    }
    if (Array.isArray(value)) return value.map(shorten);
    if (value && typeof value === "object") {
      return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, shorten(v)]));
    }
    return value;
  }

  // JSON, indented, with arrays of plain values on one line. It is also a Python literal
  // for what the page sends (strings, integers, lists, dicts).
  function pretty(value, indent = "") {
    const inner = `${indent}    `;
    if (Array.isArray(value)) {
      if (value.every((v) => v === null || typeof v !== "object")) {
        const flat = `[${value.map((v) => JSON.stringify(v)).join(", ")}]`;
        if (flat.length <= 80 || value.every((v) => typeof v === "number")) return flat;
      }
      return `[\n${value.map((v) => inner + pretty(v, inner)).join(",\n")}\n${indent}]`;
    }
    if (value && typeof value === "object") {
      const entries = Object.entries(value);
      if (entries.length === 0) return "{}";
      const lines = entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${pretty(v, inner)}`);
      return `{\n${lines.join(",\n")}\n${indent}}`;
    }
    return JSON.stringify(value);
  }

  function curlSnippet(body, withKey) {
    const lines = [
      `curl -sS ${ROUTES.score} \\`,
      "  -H 'Content-Type: application/json' \\",
    ];
    if (withKey) lines.push('  -H "Authorization: Bearer $BLIPSERVE_API_KEY" \\');
    lines.push("  --data-binary @- <<'JSON'", pretty(body), "JSON");
    return lines.join("\n");
  }

  function requestsSnippet(body, withKey, fromFiles) {
    const lines = [];
    if (withKey) lines.push("import os", "");
    lines.push("import requests", "");
    if (fromFiles) {
      lines.push(
        "# Each file image is its bytes in base64, e.g.",
        '# base64.b64encode(pathlib.Path("photo.png").read_bytes()).decode()',
      );
    }
    lines.push(`body = ${pretty(body)}`);
    lines.push("response = requests.post(", `    ${JSON.stringify(ROUTES.score)},`, "    json=body,");
    if (withKey) {
      lines.push('    headers={"Authorization": f"Bearer {os.environ[\'BLIPSERVE_API_KEY\']}"},');
    }
    lines.push(
      "    timeout=120,",
      ")",
      'print(response.status_code, response.json())  # errors are {"message": "..."}',
    );
    return lines.join("\n");
  }

  function openaiSnippet({ images, values, question, params, withKey }, shortenIt) {
    const urls = images.map((image, i) => {
      if (!image.file) return values[i];
      const type = image.file.type || "application/octet-stream";
      return `data:${type};base64,${values[i]}`;
    });
    const shown = shortenIt ? urls.map(shorten) : urls;
    const lines = [];
    if (withKey) lines.push("import os", "");
    lines.push("from openai import OpenAI", "");
    if (!withKey) lines.push("# This server takes no key (the client wants one all the same).");
    const key = withKey ? 'os.environ["BLIPSERVE_API_KEY"]' : '"none"';
    lines.push(`client = OpenAI(base_url=${JSON.stringify(ROUTES.v1)}, api_key=${key})`);
    const several = shown.length > 1;
    if (several) {
      lines.push("# The chat route takes one image per request.");
      lines.push(`images = ${pretty(shown)}`, "for url in images:");
    } else {
      lines.push(`url = ${JSON.stringify(shown[0])}`);
    }
    const pad = several ? "    " : "";
    const content = ['{"type": "image_url", "image_url": {"url": url}}'];
    if (question !== null) content.push(`{"type": "text", "text": ${JSON.stringify(question)}}`);
    lines.push(
      `${pad}reply = client.chat.completions.create(`,
      `${pad}    model=${JSON.stringify(state.model || "blip")},`,
      `${pad}    messages=[{"role": "user", "content": [`,
      ...content.map((part) => `${pad}        ${part},`),
      `${pad}    ]}],`,
    );
    if (params.max_new_tokens !== undefined) {
      lines.push(`${pad}    max_tokens=${params.max_new_tokens},`);
    }
    if (params.num_beams !== undefined) {
      lines.push(`${pad}    extra_body={"num_beams": ${params.num_beams}},`);
    }
    lines.push(`${pad})`, `${pad}print(reply.choices[0].message.content)`);
    return lines.join("\n");
  }

  function showSnippets(sent) {
    const fromFiles = sent.images.some((image) => image.file);
    const shown = shorten(sent.body);
    state.snippets = {
      curl: curlSnippet(sent.body, sent.withKey),
      requests: requestsSnippet(sent.body, sent.withKey, fromFiles),
      openai: openaiSnippet(sent, false),
    };
    $("code-curl").textContent = curlSnippet(shown, sent.withKey);
    $("code-requests").textContent = requestsSnippet(shown, sent.withKey, fromFiles);
    $("code-openai").textContent = openaiSnippet(sent, true);
    $("copy-status").textContent = "";
    $("code").hidden = false;
  }

  async function copySnippet(name) {
    const text = state.snippets && state.snippets[name];
    if (!text) return;
    let done = false;
    if (navigator.clipboard && window.isSecureContext) {
      try {
        await navigator.clipboard.writeText(text);
        done = true;
      } catch (err) {
        done = false;
      }
    }
    if (!done) {
      // Plain http on another host has no clipboard API: the old way still works.
      const area = el("textarea", { className: "visually-hidden", "aria-hidden": "true" });
      area.value = text;
      document.body.append(area);
      area.select();
      try {
        done = document.execCommand("copy");
      } catch (err) {
        done = false;
      }
      area.remove();
    }
    $("copy-status").textContent = done
      ? `Copied the full ${name} snippet (${text.length} characters).`
      : "Could not copy: select the text and copy it by hand (long base64 is shortened there).";
  }

  // -- tabs (WAI-ARIA tabs pattern: arrows move, Home/End jump) ---------------------------

  function selectTab(tab, focus) {
    for (const other of document.querySelectorAll('[role="tab"]')) {
      const selected = other === tab;
      other.setAttribute("aria-selected", String(selected));
      other.tabIndex = selected ? 0 : -1;
      $(other.getAttribute("aria-controls")).hidden = !selected;
    }
    if (focus) tab.focus();
  }

  function onTabKey(event) {
    const tabs = Array.from(document.querySelectorAll('[role="tab"]'));
    const at = tabs.indexOf(event.currentTarget);
    const moves = {
      ArrowRight: (at + 1) % tabs.length,
      ArrowLeft: (at - 1 + tabs.length) % tabs.length,
      Home: 0,
      End: tabs.length - 1,
    };
    if (!(event.key in moves)) return;
    event.preventDefault();
    selectTab(tabs[moves[event.key]], true);
  }

  // -- wiring -------------------------------------------------------------------------

  function imageFiles(list) {
    return Array.from(list || []);
  }

  function init() {
    $("form").addEventListener("submit", run);
    $("file-input").addEventListener("change", (event) => {
      addFiles(imageFiles(event.target.files));
      event.target.value = ""; // so choosing the same file again adds it again
    });
    $("add-url").addEventListener("click", () => {
      clearMessages();
      if (addUrl($("url-input").value)) $("url-input").value = "";
      $("url-input").focus();
    });
    $("url-input").addEventListener("keydown", (event) => {
      if (event.key !== "Enter") return;
      event.preventDefault(); // Enter adds the URL rather than running
      $("add-url").click();
    });
    $("clear-images").addEventListener("click", () => {
      for (const image of state.images) if (image.file) URL.revokeObjectURL(image.preview);
      state.images = [];
      renderPicked();
      $("file-input").focus();
    });
    for (const radio of document.querySelectorAll('input[name="mode"]')) {
      radio.addEventListener("change", () => {
        applyMode();
        if (mode() === "question") $("question").focus();
      });
    }

    // Dropping anywhere on the page adds the images; the drop zone shows where.
    const zone = $("drop-zone");
    document.addEventListener("dragover", (event) => {
      event.preventDefault();
      zone.classList.add("dragging");
    });
    document.addEventListener("dragleave", (event) => {
      if (event.relatedTarget === null) zone.classList.remove("dragging");
    });
    document.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("dragging");
      clearMessages();
      const data = event.dataTransfer;
      const files = imageFiles(data && data.files);
      if (files.length) {
        addFiles(files);
      } else if (data) {
        const link = (data.getData("text/uri-list") || data.getData("text/plain") || "")
          .split("\n")
          .find((line) => line.trim() && !line.startsWith("#"));
        if (link) addUrl(link);
      }
    });
    document.addEventListener("paste", (event) => {
      const files = imageFiles(event.clipboardData && event.clipboardData.files).filter((f) =>
        f.type.startsWith("image/"),
      );
      if (!files.length) return; // text pastes go where they were going
      event.preventDefault();
      clearMessages();
      addFiles(files);
    });

    for (const tab of document.querySelectorAll('[role="tab"]')) {
      tab.addEventListener("click", () => selectTab(tab, false));
      tab.addEventListener("keydown", onTabKey);
    }
    for (const button of document.querySelectorAll("button.copy")) {
      button.addEventListener("click", () => copySnippet(button.dataset.snippet));
    }
    applyMode();
    checkReady();
  }

  init();
})();
