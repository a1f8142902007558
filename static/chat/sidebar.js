/*
 * The sidebar of conversations: the phone-width toggle, the search over titles, rename and
 * delete (through PATCH / DELETE /api/conversations/<id>/ with the session and its CSRF
 * token). chat.js tells it of a first message sent (GrizzSidebar.conversationSent) and of a
 * title the model wrote (GrizzSidebar.conversationTitled); settings.js saves through its
 * `api` (GrizzSidebar.api).
 */
(function () {
  "use strict";

  const sidebar = document.getElementById("sidebar");
  if (!sidebar) {
    return;
  }

  // The same rule as chat/sidebar.py's title_from_message.
  const TITLE_WORDS = 8;
  const TITLE_CHARS = 60;

  const els = {
    app: sidebar.parentElement,
    toggle: document.getElementById("sidebar-toggle"),
    backdrop: document.getElementById("sidebar-backdrop"),
    search: document.getElementById("conversation-search"),
    list: document.getElementById("conversation-list"),
    empty: document.getElementById("conversation-search-empty"),
    dialog: document.getElementById("delete-dialog"),
  };
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
  const currentId = (document.getElementById("chat") || { dataset: {} }).dataset.conversationId;

  function titleFromMessage(content) {
    const words = content.split(/\s+/).filter(Boolean);
    let title = words.slice(0, TITLE_WORDS).join(" ");
    if (title.length > TITLE_CHARS) {
      title = title.slice(0, TITLE_CHARS - 1).trimEnd();
    }
    return title + (title !== words.join(" ") ? "…" : "");
  }

  function api(method, id, body) {
    return fetch("/api/conversations/" + encodeURIComponent(id) + "/", {
      method: method,
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  }

  function itemOf(element) {
    return element.closest(".conversation-item");
  }

  function titleOf(item) {
    return item.querySelector(".conversation-title").textContent;
  }

  function setTitle(item, title) {
    item.querySelector(".conversation-title").textContent = title;
    item.querySelector('[data-action="rename"]').setAttribute("aria-label", "Rename " + title);
    item.querySelector('[data-action="delete"]').setAttribute("aria-label", "Delete " + title);
    if (item.dataset.conversationId === currentId) {
      const heading = document.getElementById("chat-title");
      if (heading) {
        heading.textContent = title;
      }
      document.title = title + " · Grizz";
    }
  }

  // ---------------------------------------------------------------------------------------
  // Phone width: the sidebar slides over the page behind a toggle.

  function setOpen(open) {
    els.app.classList.toggle("sidebar-open", open);
    els.toggle.setAttribute("aria-expanded", String(open));
    els.backdrop.hidden = !open;
    if (open) {
      els.search.focus();
    }
  }

  // ---------------------------------------------------------------------------------------
  // Search: filters the list by title as one types.

  function filter() {
    const query = els.search.value.trim().toLowerCase();
    let shown = 0;
    for (const item of els.list.children) {
      const match = !query || titleOf(item).toLowerCase().includes(query);
      item.hidden = !match;
      shown += match ? 1 : 0;
    }
    els.empty.textContent = els.list.children.length ? "No title matches." : "No conversations yet.";
    els.empty.hidden = shown > 0;
  }

  // ---------------------------------------------------------------------------------------
  // Rename: the title becomes a field; Enter saves, Escape (or leaving it) cancels.

  function startRename(item) {
    if (item.querySelector(".rename-input")) {
      return;
    }
    const link = item.querySelector(".conversation-link");
    const input = document.createElement("input");
    input.type = "text";
    input.className = "rename-input";
    input.maxLength = 200;
    input.value = item.hasAttribute("data-untitled") ? "" : titleOf(item);
    input.placeholder = titleOf(item);
    input.setAttribute("aria-label", "New title");
    link.hidden = true;
    link.after(input);
    input.focus();
    input.select();
    let settled = false;
    const finish = function (save) {
      if (settled) {
        return;
      }
      settled = true;
      input.remove();
      link.hidden = false;
      if (save) {
        saveTitle(item, input.value.trim());
      }
      item.querySelector('[data-action="rename"]').focus();
    };
    input.addEventListener("keydown", function (event) {
      if (event.key === "Enter") {
        event.preventDefault();
        finish(true);
      } else if (event.key === "Escape") {
        event.preventDefault();
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(false));
  }

  async function saveTitle(item, title) {
    if (!title || title === titleOf(item)) {
      return;
    }
    const before = titleOf(item);
    setTitle(item, title);
    item.removeAttribute("data-untitled");
    item.setAttribute("data-renamed", ""); // A title from the model comes too late now.
    try {
      const response = await api("PATCH", item.dataset.conversationId, { title: title });
      if (!response.ok) {
        throw new Error(String(response.status));
      }
    } catch (error) {
      setTitle(item, before);
      window.alert("The conversation could not be renamed. Try again.");
    }
  }

  // ---------------------------------------------------------------------------------------
  // Delete, after a confirmation in a modal dialog.

  function confirmDelete(item) {
    const dialog = els.dialog;
    dialog.querySelector(".delete-dialog-name").textContent = titleOf(item);
    dialog.querySelector(".delete-dialog-error").hidden = true;
    dialog.returnValue = "";
    dialog.onclose = function () {
      if (dialog.returnValue === "delete") {
        deleteConversation(item);
      } else {
        item.querySelector('[data-action="delete"]').focus();
      }
    };
    dialog.showModal();
  }

  async function deleteConversation(item) {
    const id = item.dataset.conversationId;
    let response;
    try {
      response = await api("DELETE", id);
    } catch (error) {
      response = null;
    }
    if (!response || (!response.ok && response.status !== 404)) {
      const error = els.dialog.querySelector(".delete-dialog-error");
      error.textContent = "The conversation could not be deleted. Try again.";
      error.hidden = false;
      els.dialog.showModal();
      return;
    }
    if (id === currentId) {
      window.location.assign("/");
      return;
    }
    const next = item.nextElementSibling || item.previousElementSibling;
    item.remove();
    filter();
    (next ? next.querySelector(".conversation-link") : els.search).focus();
  }

  // ---------------------------------------------------------------------------------------
  // Told by chat.js: a message was sent in the open conversation.

  function itemFor(id) {
    return els.list.querySelector(
      '.conversation-item[data-conversation-id="' + CSS.escape(String(id)) + '"]'
    );
  }

  function conversationSent(id, content) {
    const item = itemFor(id);
    if (!item) {
      return;
    }
    if (item.hasAttribute("data-untitled")) {
      item.removeAttribute("data-untitled");
      setTitle(item, titleFromMessage(content));
    }
    els.list.prepend(item); // Newest first: it is now the most recently active.
    filter();
  }

  // Told by chat.js: the conversation has a title (the model's, or one given elsewhere). A
  // name the user gave it on this page meanwhile wins, as it does on the server.
  function conversationTitled(id, title) {
    const item = itemFor(id);
    if (item && title && !item.hasAttribute("data-renamed")) {
      item.removeAttribute("data-untitled");
      setTitle(item, title);
      filter();
    }
  }

  function bindEvents() {
    els.toggle.addEventListener("click", function () {
      setOpen(!els.app.classList.contains("sidebar-open"));
    });
    els.backdrop.addEventListener("click", () => setOpen(false));
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape" && els.app.classList.contains("sidebar-open")) {
        setOpen(false);
        els.toggle.focus();
      }
    });
    els.search.addEventListener("input", filter);
    els.list.addEventListener("click", function (event) {
      const button = event.target.closest("button[data-action]");
      if (!button) {
        return;
      }
      const item = itemOf(button);
      if (button.dataset.action === "rename") {
        startRename(item);
      } else {
        confirmDelete(item);
      }
    });
  }

  bindEvents();
  window.GrizzSidebar = {
    conversationSent: conversationSent,
    conversationTitled: conversationTitled,
    api: api,
  };
})();
