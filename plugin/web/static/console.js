// radgate console: the operator's buttons. A button with data-action POSTs JSON to the API with the
// session's CSRF token, shows the answer in #flash, and asks the page's htmx fragments to refresh.
// A <details> that was open stays open when htmx replaces the fragment it is in.
(function () {
  "use strict";

  let open = [];
  document.addEventListener("htmx:beforeSwap", function (event) {
    open = [...event.detail.target.querySelectorAll("details[open][id]")].map((d) => d.id);
  });
  document.addEventListener("htmx:afterSwap", function () {
    for (const id of open) {
      const details = document.getElementById(id);
      if (details) details.open = true;
    }
  });

  function csrfToken() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  }

  function show(text, ok) {
    const flash = document.getElementById("flash");
    if (!flash) return;
    flash.textContent = text;
    flash.className = ok ? "ok" : "error";
  }

  function describe(answer, response) {
    if (!response.ok) {
      const detail = answer.detail;
      if (typeof detail === "string") return detail;
      if (Array.isArray(detail)) return detail.map((d) => d.msg).join("; ");
      return "HTTP " + response.status;
    }
    if (answer.message) return answer.message;
    if (answer.detail) return answer.detail;
    return "done";
  }

  document.addEventListener("click", async function (event) {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    event.preventDefault();
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    const body = button.dataset.body ? JSON.parse(button.dataset.body) : {};
    if (button.dataset.field) {
      const field = document.getElementById(button.dataset.field);
      body[field.name] = field.value;
    }
    if (button.dataset.form) {  // every field of the form that has a value
      for (const [name, value] of new FormData(document.getElementById(button.dataset.form))) {
        if (value !== "") body[name] = value;
      }
    }
    button.disabled = true;
    try {
      const response = await fetch(button.dataset.action, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrfToken() },
        body: JSON.stringify(body),
      });
      const answer = await response.json().catch(() => ({}));
      const ok = response.ok && answer.ok !== false;
      show(describe(answer, response), ok);
    } catch (err) {
      show("the console did not answer: " + err, false);
    } finally {
      button.disabled = false;
      if (window.htmx) window.htmx.trigger(document.body, "refresh");
    }
  });
})();
