/*
 * The conversation's settings panel: its model and system prompt, saved through
 * PATCH /api/conversations/<id>/ (GrizzSidebar.api: the session and its CSRF token). The
 * server checks them (chat/services.py conversation_settings_check) and says what it
 * refused; the next reply uses them, as its worker reads them when it starts.
 */
(function () {
  "use strict";

  const dialog = document.getElementById("settings-dialog");
  if (!dialog) {
    return;
  }

  const els = {
    button: document.getElementById("settings-button"),
    form: document.getElementById("settings-form"),
    model: document.getElementById("settings-model"),
    prompt: document.getElementById("settings-system-prompt"),
    error: dialog.querySelector(".settings-error"),
    save: dialog.querySelector(".settings-save"),
    cancel: dialog.querySelector(".settings-cancel"),
    shown: document.getElementById("system-prompt"),
  };
  const conversationId = document.getElementById("chat").dataset.conversationId;

  // Opened on the saved values: reset() goes back to the defaults, which a save moves.
  function open() {
    els.form.reset();
    els.error.hidden = true;
    dialog.showModal();
  }

  function showError(text) {
    els.error.textContent = text;
    els.error.hidden = false;
  }

  async function save(event) {
    event.preventDefault();
    els.save.disabled = true;
    let response = null;
    try {
      response = await window.GrizzSidebar.api("PATCH", conversationId, {
        model: els.model.value,
        system_prompt: els.prompt.value,
      });
    } catch (error) {
      response = null;
    }
    els.save.disabled = false;
    const body = response ? await response.json().catch(() => null) : null;
    if (!response || !response.ok || !body) {
      const refused = body && body.error && body.error.message;
      showError(refused || "The settings could not be saved. Try again.");
      return;
    }
    settle(body);
    dialog.close();
  }

  // What the server saved becomes what the panel opens on and what the page shows.
  function settle(conversation) {
    for (const option of els.model.options) {
      option.defaultSelected = option.value === conversation.model;
    }
    els.prompt.defaultValue = conversation.system_prompt;
    els.shown.querySelector(".pre").textContent = conversation.system_prompt;
    els.shown.hidden = !conversation.system_prompt;
  }

  els.button.addEventListener("click", open);
  els.form.addEventListener("submit", save);
  els.cancel.addEventListener("click", () => dialog.close());
  // However it closes (Save, Cancel, Escape), focus goes back to where it came from.
  dialog.addEventListener("close", () => els.button.focus());
})();
