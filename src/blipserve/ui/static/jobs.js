// blipserve's try-it page: the server's batch jobs (GET /jobs), polled every 2 s while
// the page is visible, with a Cancel button for the jobs not finished. Plain JavaScript,
// no build step; as in ui.js, what the server sends reaches the DOM through textContent
// or attributes only, and the API key is read from its input field, never kept.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const JOBS = new URL("../jobs", location.href).href;
  const POLL_MS = 2000;
  const RETRY_MS = 5000; // after the server could not be reached, or answered oddly
  const PAGE = 20; // jobs asked for at a time (GET /jobs?top=)
  const MAX_TOP = 100; // the most the server lists at once
  const COLUMNS = 9;
  const FINISHED = new Set(["Completed", "Failed", "Canceled"]);
  // How each status looks: a tone (its colours) and an icon beside its name.
  const LOOKS = {
    Queued: { tone: "waiting", icon: "◷", label: "Queued" },
    Starting: { tone: "running", spinner: true, label: "Starting" },
    Running: { tone: "running", spinner: true, label: "Running" },
    CancelRequested: { tone: "waiting", icon: "…", label: "Cancel requested" },
    Completed: { tone: "ok", icon: "✓", label: "Completed" },
    Failed: { tone: "failed", icon: "✕", label: "Failed" },
    Canceled: { tone: "ended", icon: "⊘", label: "Canceled" },
  };
  const numbers = new Intl.NumberFormat(document.documentElement.lang || undefined);

  const state = {
    top: PAGE,
    shown: "", // what the table shows now, as JSON (redrawn only when it changes)
    canceling: new Set(), // names of jobs whose cancel request is under way
    timer: null,
    polling: false,
    again: false, // poll once more as soon as the request in flight ends
  };

  const { el } = window.blipserveDom; // (ui.js's, loaded first)

  function headers() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function showError(text) {
    $("jobs-error").textContent = text;
  }

  function messageOf(response, body) {
    if (body && typeof body.message === "string") return body.message;
    return `${response.status} ${response.statusText}`.trim();
  }

  // One of: "table", "empty" (no job yet: how to start one), "none" (a message only).
  function showView(view, message) {
    // (the same text again is not set again: a screen reader would say it again)
    if ($("jobs-message").textContent !== message) $("jobs-message").textContent = message;
    $("jobs-table-wrap").hidden = view !== "table";
    $("jobs-empty").hidden = view !== "empty";
    if (view !== "table") {
      $("jobs-more").hidden = true;
      state.shown = "";
    }
  }

  // -- polling ----------------------------------------------------------------------------

  function pollSoon() {
    clearTimeout(state.timer);
    state.timer = null;
    if (state.polling) state.again = true;
    else poll();
  }

  async function poll() {
    if (document.hidden) return; // visibilitychange polls again
    state.polling = true;
    let wait = POLL_MS;
    try {
      wait = await refresh();
    } catch (err) {
      showError(`Something went wrong in this page: ${err.message}`);
    } finally {
      state.polling = false;
      if (state.again) {
        state.again = false;
        wait = 0;
      }
      if (wait !== null && !document.hidden) state.timer = setTimeout(poll, wait);
    }
  }

  // Asks for the jobs and shows them; the wait before the next poll (null: no more).
  async function refresh() {
    let response;
    let body = null;
    try {
      response = await fetch(`${JOBS}?top=${state.top}`, { headers: headers(), cache: "no-store" });
      body = await response.json().catch(() => null);
    } catch (err) {
      showError("Cannot reach the server to list its batch jobs; retrying…");
      return RETRY_MS;
    }
    if (response.status === 404) {
      // Jobs are off until the server restarts with --jobs-dir: stop asking.
      showError("");
      showView("none", `Batch jobs are off on this server: ${messageOf(response, body)}`);
      return null;
    }
    if (response.status === 401) {
      showError("");
      showView(
        "none",
        `This server needs an API key for its jobs (${messageOf(response, body)}). ` +
          "Enter it in the “API key” field above; the list then shows here.",
      );
      return POLL_MS;
    }
    if (!response.ok || !body || !Array.isArray(body.value)) {
      showError(`Could not list the batch jobs: error ${response.status}: ${messageOf(response, body)}`);
      return RETRY_MS;
    }
    showError("");
    showJobs(body);
    return POLL_MS;
  }

  // -- the table --------------------------------------------------------------------------

  function showJobs(body) {
    const jobs = body.value;
    const count = typeof body.count === "number" ? body.count : jobs.length;
    if (count === 0) {
      $("jobs-curl").textContent = curlExample(Boolean($("api-key").value.trim()));
      showView("empty", "No batch jobs yet.");
      return;
    }
    const shown = JSON.stringify([jobs, count, body.nextLink, [...state.canceling]]);
    if (shown === state.shown) return;
    showView("table", summary(jobs, count));
    state.shown = shown;
    const focused = document.activeElement;
    const focusedJob = $("jobs-rows").contains(focused) ? focused.dataset.cancel : null;
    $("jobs-rows").replaceChildren(...jobs.flatMap(jobRows));
    if (focusedJob !== null && focusedJob !== undefined) {
      // Redrawn: keep the keyboard where it was, or on the summary if that job has ended.
      const again = $("jobs-rows").querySelector(`button[data-cancel="${CSS.escape(focusedJob)}"]`);
      (again || $("jobs-message")).focus();
    }
    const more = $("jobs-more");
    const hadFocus = document.activeElement === more;
    more.hidden = !body.nextLink || state.top >= MAX_TOP;
    if (more.hidden && hadFocus) $("jobs-message").focus(); // (all are shown)
  }

  function summary(jobs, count) {
    const counts = new Map();
    for (const job of jobs) {
      const label = lookOf(job).label.toLowerCase();
      counts.set(label, (counts.get(label) || 0) + 1);
    }
    const parts = [...counts].map(([label, n]) => `${n} ${label}`).join(", ");
    const what = count === 1 ? "1 batch job" : `${count} batch jobs`;
    const which = jobs.length < count ? ` (the newest ${jobs.length} shown)` : "";
    return `${what}${which}: ${parts}.`;
  }

  function lookOf(job) {
    const status = String((job.properties || {}).status ?? "unknown");
    return LOOKS[status] || { tone: "other", icon: "•", label: status };
  }

  // "batchjob-fa20f831-c7df-…" -> "fa20f831": enough to tell a page of jobs apart.
  function shortName(name) {
    const id = name.replace(/^batchjob-/, "");
    return id.length > 12 ? id.slice(0, 8) : id;
  }

  function jobRows(job) {
    const p = job.properties || {};
    const name = String(job.name ?? job.id ?? "");
    const short = shortName(name);
    const look = lookOf(job);
    const progress = p.progress || {};
    const row = el(
      "tr",
      { className: `job tone-${look.tone}`, "data-job": name },
      el("td", { className: "job-name" }, el("code", { title: name, text: short })),
      el("td", { className: "job-status" }, badge(look), progressBar(p.status, progress, short)),
      el("td", { className: "job-input path", text: inputUri(p) }),
      el("td", { className: "job-output path", text: p.outputFile ? String(p.outputFile) : "–" }),
      el("td", { className: "job-rows" }, ...rowCounts(progress)),
      el("td", { className: "job-rate num", text: rate(p.status, progress) }),
      el("td", { className: "job-start" }, when(p.startTime)),
      el("td", { className: "job-end" }, when(p.endTime)),
      el("td", { className: "job-actions" }, ...cancelButton(p.status, name, short)),
    );
    const error = p.error && typeof p.error === "object" ? p.error : null;
    if (!error || !error.message) return [row];
    // A failed job's reason; a job still running may carry the error it is retrying after.
    const lead = p.status === "Failed" ? "Failed" : "Last error, retrying";
    const code = error.code ? ` (${error.code})` : "";
    const text = `${lead}${code}: ${error.message}`;
    return [
      row,
      el(
        "tr",
        { className: "job-error-row", "data-error-of": name },
        el("td", { colspan: String(COLUMNS) }, el("p", { className: "job-error", text })),
      ),
    ];
  }

  function badge(look) {
    const mark = look.spinner
      ? el("span", { className: "spinner", "aria-hidden": "true" })
      : el("span", { className: "icon", "aria-hidden": "true", text: look.icon });
    const label = el("span", { className: "status-label", text: look.label });
    return el("span", { className: "badge" }, mark, label);
  }

  function progressBar(status, progress, short) {
    if (status !== "Running" && status !== "Starting") return "";
    const total = progress.rowsTotal;
    const bar = el("progress", { "aria-label": `Job ${short}: rows answered` });
    if (typeof total === "number" && total > 0) {
      const seen = (progress.rowsDone || 0) + (progress.rowsFailed || 0) + (progress.rowsSkipped || 0);
      bar.max = total;
      bar.value = Math.min(seen, total);
    }
    return bar; // without a total: indeterminate
  }

  function inputUri(p) {
    const inputs = Object.values(p.InputData || {});
    return inputs.length && inputs[0] && inputs[0].Uri ? String(inputs[0].Uri) : "–";
  }

  function count(n) {
    return numbers.format(typeof n === "number" ? n : 0);
  }

  function rowCounts(progress) {
    const total = progress.rowsTotal;
    const done =
      typeof total === "number"
        ? `${count(progress.rowsDone)} of ${count(total)} done`
        : `${count(progress.rowsDone)} done`;
    const failed = progress.rowsFailed || 0;
    const rest = `${count(failed)} failed, ${count(progress.rowsSkipped)} skipped`;
    return [
      el("span", { className: "rows-done", text: done }),
      el("span", { className: failed ? "rows-rest rows-failed" : "rows-rest", text: rest }),
    ];
  }

  function rate(status, progress) {
    if (status === "Queued" || typeof progress.rowsPerSecond !== "number") return "–";
    return progress.rowsPerSecond.toFixed(1);
  }

  function when(iso) {
    if (!iso) return "–";
    const at = new Date(iso);
    if (Number.isNaN(at.getTime())) return String(iso);
    const today = at.toDateString() === new Date().toDateString();
    const text = today ? at.toLocaleTimeString() : at.toLocaleString();
    return el("time", { datetime: String(iso), title: String(iso), text });
  }

  function cancelButton(status, name, short) {
    if (FINISHED.has(status) || status === "CancelRequested") return [];
    const busy = state.canceling.has(name);
    const button = el("button", {
      type: "button",
      className: "secondary small",
      "aria-label": `Cancel job ${short}`,
      "data-cancel": name,
      text: busy ? "Canceling…" : "Cancel",
    });
    button.disabled = busy;
    button.addEventListener("click", () => cancel(name, short, button));
    return [button];
  }

  async function cancel(name, short, button) {
    const hadFocus = document.activeElement === button;
    state.canceling.add(name);
    button.disabled = true;
    button.textContent = "Canceling…";
    showError("");
    try {
      const response = await fetch(`${JOBS}/${encodeURIComponent(name)}/cancel`, {
        method: "POST",
        headers: headers(),
        cache: "no-store",
      });
      const body = await response.json().catch(() => null);
      if (!response.ok) {
        showError(`Could not cancel job ${short}: error ${response.status}: ${messageOf(response, body)}`);
      }
    } catch (err) {
      showError(`Could not reach the server to cancel job ${short}: ${err.message}`);
    } finally {
      state.canceling.delete(name);
      state.shown = ""; // redraw, with the job as it is now
      // Its button goes (or was disabled): the keyboard waits on the summary, which says
      // what the job does now.
      if (hadFocus) $("jobs-message").focus();
      pollSoon();
    }
  }

  // -- no job yet: how to start one ------------------------------------------------------------

  // JSON on one line, spaced as Python's json.dumps spaces it.
  function oneLine(value) {
    if (!value || typeof value !== "object") return JSON.stringify(value);
    const entries = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${oneLine(v)}`);
    return `{${entries.join(", ")}}`;
  }

  function curlExample(withKey) {
    const input = { images: { JobInputType: "UriFolder", Uri: "/path/to/images" } };
    const output = { captions: { JobOutputType: "UriFolder", Uri: "/path/to/captions" } };
    const lines = [`curl -sS ${JOBS} \\`, "  -H 'Content-Type: application/json' \\"];
    if (withKey) lines.push('  -H "Authorization: Bearer $BLIPSERVE_API_KEY" \\');
    lines.push(
      "  --data-binary @- <<'JSON'",
      '{"properties": {',
      `  "InputData": ${oneLine(input)},`,
      `  "OutputData": ${oneLine(output)}`,
      "}}",
      "JSON",
    );
    return lines.join("\n");
  }

  // -- wiring -------------------------------------------------------------------------

  function init() {
    $("jobs-more").addEventListener("click", () => {
      state.top = Math.min(state.top + PAGE, MAX_TOP);
      pollSoon();
    });
    $("api-key").addEventListener("change", pollSoon);
    document.addEventListener("visibilitychange", () => {
      if (document.hidden) {
        clearTimeout(state.timer);
        state.timer = null;
      } else {
        pollSoon();
      }
    });
    poll();
  }

  init();
})();
