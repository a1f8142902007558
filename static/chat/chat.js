/*
 * Grizz chat page.
 *
 * Speaks the chat WebSocket protocol (/ws/chat/<conversation_id>/):
 *   server -> client: hello, queued, user_message, regenerated, delta, restart, done, error,
 *                     pong
 *   client -> server: message, regenerate, ping, cancel, resume
 *
 * The transcript is rendered by the server; this file keeps it up to date. A user's text
 * goes into the page as a text node, never as HTML; an answer is rendered as Markdown by
 * markdown.js (GrizzMarkdown), which shows raw HTML as text and sanitises what it renders,
 * so an answer containing "<script>" is shown literally and nothing in it runs.
 */
(function () {
  "use strict";

  const root = document.getElementById("chat");
  if (!root) {
    return;
  }

  const PING_INTERVAL_MS = 30000;
  // No frame at all (not even a pong) for this long: the connection is dead even if the
  // browser has not noticed yet (e.g. a laptop that slept or a phone that changed networks).
  const DEAD_SOCKET_MS = 2 * PING_INTERVAL_MS + 15000;
  const RECONNECT_MIN_MS = 500;
  const RECONNECT_MAX_MS = 10000;
  // A delta that arrives ahead of a missing one waits this long for the gap to fill before
  // the client asks the server to replay from the last seq it has.
  const GAP_RESUME_MS = 2000;
  // "At the bottom" tolerance for auto-scroll, so a few pixels off still counts.
  const STICK_TO_BOTTOM_PX = 80;

  // Close codes after which reconnecting cannot help.
  const FATAL_CLOSES = {
    4401: {
      status: "Signed out",
      message: "You have been signed out. Sign in again to go on with this conversation.",
      action: { label: "Sign in", run: () => window.location.assign(root.dataset.loginUrl) },
    },
    4403: { status: "No access", message: "You do not have access to this conversation." },
    4404: { status: "Not found", message: "This conversation does not exist any more." },
  };

  // Used when an error frame carries no human-readable message.
  const ERROR_TEXTS = {
    invalid: "The server rejected that message.",
    too_long: "That message is too long.",
    busy: "Wait for the current reply to finish before sending another message.",
    llm_error: "The model failed to answer.",
    unavailable: "The service is unavailable right now. Try again shortly.",
    rate_limited: "You are sending messages too fast. Wait a moment.",
    overloaded: "The service is busy. Try again in a moment.",
    llm_unavailable: "The model provider is unavailable; your reply will continue when it is back.",
    timeout: "The model stopped answering.",
  };

  // Must match the labels in templates/chat/conversation_detail.html.
  const STATUS_LABELS = {
    sending: "sending…",
    queued: "waiting…",
    streaming: "writing…",
    complete: "",
    cancelled: "stopped",
    failed: "failed",
  };

  const ACTIVE_STATUSES = new Set(["queued", "streaming"]);

  // What the line above the composer says while a reply is on its way, or how it ended.
  const COMPOSER_STATES = {
    sending: "Sending…",
    queued: "Waiting for the model…",
    streaming: "Grizz is writing…",
    stopping: "Stopping…",
    cancelled: "Stopped. The part written so far is kept.",
    failed: "The reply failed.",
  };

  function isActive(status) {
    return ACTIVE_STATUSES.has(status);
  }

  const els = {
    transcript: document.getElementById("transcript"),
    empty: document.getElementById("transcript-empty"),
    status: document.getElementById("connection-status"),
    notice: document.getElementById("notice"),
    noticeText: document.querySelector("#notice .notice-text"),
    noticeClose: document.querySelector("#notice .notice-close"),
    noticeRetry: document.querySelector("#notice .notice-retry"),
    banner: document.getElementById("connection-banner"),
    bannerText: document.querySelector("#connection-banner .connection-banner-text"),
    bannerRetry: document.querySelector("#connection-banner .connection-retry"),
    composerStatus: document.getElementById("composer-status"),
    form: document.getElementById("composer"),
    input: document.getElementById("composer-input"),
    send: document.getElementById("send-button"),
    stop: document.getElementById("stop-button"),
    regenerate: regenerateButton(),
  };

  const CLOSE_UNAUTHENTICATED = 4401;
  // When the server gave no renewal time, or a renewal failed for another reason than a
  // sign-out (offline, a server error): try again after this long.
  const SESSION_REFRESH_FALLBACK_MS = 60000;
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;

  const state = {
    wsUrl: websocketUrl(root.dataset.wsPath),
    sessionTimer: null,
    // When the last 4401 made the page check its session; cleared by the next hello.
    sessionRecheckedAt: null,
    socket: null,
    connected: false, // "hello" received on the current socket
    helloCount: 0,
    reconnectAttempt: 0,
    reconnectTimer: null,
    pingTimer: null,
    lastFrameAt: 0,
    fatal: false,
    // The job whose reply is being generated in this conversation (ours or another tab's).
    activeJobId: null,
    cancelRequestedFor: null,
    // The message we sent whose "queued" has not arrived: {clientMsgId, content, element}.
    pending: null,
    // The answer whose regenerate we sent, until its "queued" (or refusal) arrives.
    regenerating: null,
    // Per job: {lastSeq, buffer: Map(seq -> frame), finished, gapTimer}.
    jobs: new Map(),
    // How the last reply ended, for the composer's line: "cancelled", "failed" or null.
    lastOutcome: null,
    queuePosition: null,
    noticeTimer: null,
  };

  // Each answer's Markdown renderer (GrizzMarkdown.StreamRenderer), by its element.
  const renderers = new WeakMap();

  // ---------------------------------------------------------------------------------------
  // Connection

  function websocketUrl(path) {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + window.location.host + path;
  }

  function connect() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    setConnectionStatus("connecting", state.helloCount ? "Reconnecting…" : "Connecting…");
    let socket;
    try {
      socket = new WebSocket(state.wsUrl);
    } catch (error) {
      scheduleReconnect();
      return;
    }
    state.socket = socket;
    // Events of a socket we have abandoned must not touch the state of its successor.
    socket.addEventListener("open", () => socket === state.socket && onOpen());
    socket.addEventListener("message", (event) => socket === state.socket && onFrame(event.data));
    socket.addEventListener("close", (event) => socket === state.socket && onClose(event));
  }

  function onOpen() {
    state.lastFrameAt = Date.now();
    state.pingTimer = setInterval(pingOrGiveUp, PING_INTERVAL_MS);
    // Send stays disabled until "hello" tells us whether a reply is in flight.
  }

  function onClose(event) {
    forgetSocket();
    if (event.code === CLOSE_UNAUTHENTICATED && !state.sessionRecheckedAt) {
      // Signed out, or a session that lapsed: one renewal attempt says which.
      state.sessionRecheckedAt = Date.now();
      refreshSession().then((renewed) => (renewed ? scheduleReconnect() : signedOut()));
      return;
    }
    const fatal = FATAL_CLOSES[event.code];
    if (fatal) {
      state.fatal = true;
      els.banner.hidden = true;
      setConnectionStatus("closed", fatal.status);
      showNotice(fatal.message, fatal.action && { retry: fatal.action.run, label: fatal.action.label });
      updateControls();
      return;
    }
    scheduleReconnect();
  }

  function signedOut() {
    onClose({ code: CLOSE_UNAUTHENTICATED });
  }

  // ---------------------------------------------------------------------------------------
  // Session: the socket signs in with the page's session cookie, and only reads it. The page
  // renews the session at half its remaining life (the server says when), so that a page
  // left open does not sign its user out; a renewal refused means the user has been.

  function refreshSession() {
    return fetch("/session/refresh/", {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRFToken": csrfToken },
    })
      .then((response) => {
        if (response.status === 401) {
          return false; // signed out: the socket's next opening says so
        }
        return response.ok ? response.json().then(sessionRenewed) : renewalPostponed();
      })
      .catch(renewalPostponed);
  }

  // Offline, a server error, a refused CSRF token: not a sign-out; try again later.
  function renewalPostponed() {
    scheduleSessionRefresh();
    return true;
  }

  function sessionRenewed(body) {
    scheduleSessionRefresh(body.refresh_in_ms);
    return true;
  }

  function scheduleSessionRefresh(delayMs) {
    clearTimeout(state.sessionTimer);
    const delay = Number.isFinite(delayMs) && delayMs > 0 ? delayMs : SESSION_REFRESH_FALLBACK_MS;
    state.sessionTimer = setTimeout(refreshSession, delay);
  }

  function forgetSocket() {
    clearInterval(state.pingTimer);
    state.pingTimer = null;
    state.socket = null;
    state.connected = false;
    updateControls();
  }

  function scheduleReconnect() {
    if (state.fatal || state.reconnectTimer) {
      return;
    }
    // 0.5 s doubling to 10 s, +-25 % jitter so that many tabs do not reconnect in lockstep
    // after a server restart.
    const base = Math.min(RECONNECT_MAX_MS, RECONNECT_MIN_MS * 2 ** state.reconnectAttempt);
    const delay = Math.min(RECONNECT_MAX_MS, base * (0.75 + Math.random() * 0.5));
    state.reconnectAttempt = Math.min(state.reconnectAttempt + 1, 10);
    const seconds = Math.ceil(delay / 1000);
    setConnectionStatus("reconnecting", "Disconnected, retrying in " + seconds + " s");
    showBanner("Connection lost. Reconnecting in " + seconds + " s…");
    state.reconnectTimer = setTimeout(connect, delay);
  }

  function reconnectNow() {
    if (state.reconnectTimer) {
      state.reconnectAttempt = 0;
      connect();
    }
  }

  function pingOrGiveUp() {
    if (Date.now() - state.lastFrameAt > DEAD_SOCKET_MS) {
      abandonSocket();
      return;
    }
    sendFrame({ type: "ping" });
  }

  // A half-open socket may take minutes to report "close"; drop it and start a new one now.
  function abandonSocket() {
    const socket = state.socket;
    forgetSocket();
    try {
      socket.close(4000, "no response");
    } catch (error) {
      // Already closing: nothing to do.
    }
    scheduleReconnect();
  }

  function sendFrame(frame) {
    const socket = state.socket;
    if (!socket || socket.readyState !== WebSocket.OPEN) {
      return false;
    }
    try {
      socket.send(JSON.stringify(frame));
      return true;
    } catch (error) {
      return false; // The close event follows; the reconnect logic takes over.
    }
  }

  function onFrame(data) {
    state.lastFrameAt = Date.now();
    let frame;
    try {
      frame = JSON.parse(data);
    } catch (error) {
      return;
    }
    const handler = FRAME_HANDLERS[frame && frame.type];
    if (handler) {
      handler(frame);
    }
  }

  // ---------------------------------------------------------------------------------------
  // Server frames

  const FRAME_HANDLERS = {
    hello: onHello,
    queued: onQueued,
    user_message: onUserMessage,
    regenerated: onRegenerated,
    delta: onStreamFrame,
    restart: onStreamFrame,
    done: onDone,
    error: onError,
    title: onTitle,
    pong: function () {},
  };

  function onHello(frame) {
    state.sessionRecheckedAt = null;
    const isReconnect = state.helloCount > 0;
    state.helloCount += 1;
    state.connected = true;
    // Reset on hello, not on open: a server that accepts and then closes must still back off.
    state.reconnectAttempt = 0;
    setConnectionStatus("open", "Connected");
    els.banner.hidden = true;
    // A cancel sent just before the drop may be lost: let the user press Stop again.
    state.cancelRequestedFor = null;

    const activeJobId = frame.active_job_id || null;
    // jobState() also registers the active job, so that the loop below resumes it.
    state.activeJobId = activeJobId && !jobState(activeJobId).finished ? activeJobId : null;
    // The server replays every frame after the last seq we have, then continues live. A
    // reply we still show as unfinished that is no longer active finished while we were not
    // listening: resuming it replays its end (or sends its "done" from the database).
    for (const [jobId, job] of state.jobs) {
      if (!job.finished) {
        sendFrame({ type: "resume", job_id: jobId, after: job.lastSeq });
      }
    }
    if (state.pending) {
      // Its "queued" never arrived. The same client_msg_id lets the server answer with the
      // original job if it did store the message, instead of storing it twice.
      sendFrame(messageFrame(state.pending));
    }
    // Not sent again: if the server stored it, its reply is the active job resumed above,
    // and the resync below hides the answer it replaced.
    state.regenerating = null;
    // While we were away other tabs may have sent messages, whose "user_message" we missed:
    // fetch the transcript the server has now and merge it in.
    if (isReconnect) {
      resyncTranscript();
    }
    updateControls();
  }

  function onQueued(frame) {
    const pending = state.pending;
    state.pending = null;
    state.regenerating = null;
    state.queuePosition = Number.isInteger(frame.queue_position) ? frame.queue_position : null;
    if (pending) {
      if (findMessageElement(frame.message_id)) {
        pending.element.remove(); // Already shown, by a transcript resync.
      } else {
        pending.element.dataset.messageId = frame.message_id;
        setMessageStatus(pending.element, "complete");
      }
    }
    removeAnswer(frame.superseded_reply_id);
    startReply(frame.job_id, frame.reply_id);
  }

  // Another tab regenerated the last answer: its new reply takes the old one's place.
  function onRegenerated(frame) {
    removeAnswer(frame.superseded_reply_id);
    startReply(frame.job_id, frame.reply_id);
  }

  // An answer replaced by a regenerated one: the server keeps it for review, the page does
  // not show it.
  function removeAnswer(replyId) {
    const element = findMessageElement(replyId);
    if (!element) {
      return;
    }
    // The Regenerate button had the focus (or lost it when disabled): keep it on the page.
    const focused = document.activeElement;
    const refocus = focused === document.body || element.contains(focused);
    element.remove();
    if (refocus) {
      els.input.focus();
    }
  }

  // Another tab of this conversation sent a message.
  function onUserMessage(frame) {
    if (!findMessageElement(frame.message_id)) {
      const stick = isNearBottom();
      appendMessage({
        role: "user",
        messageId: frame.message_id,
        status: "complete",
        content: frame.content || "",
      });
      if (stick) {
        scrollToBottom();
      }
    }
    startReply(frame.job_id, frame.reply_id);
  }

  // The model titled the conversation, after its first answer.
  function onTitle(frame) {
    if (window.GrizzSidebar) {
      window.GrizzSidebar.conversationTitled(frame.conversation_id, frame.title);
    }
  }

  function startReply(jobId, replyId) {
    if (!jobId) {
      updateControls();
      return;
    }
    const job = jobState(jobId);
    const stick = isNearBottom();
    ensureReplyElement(jobId, replyId);
    if (!job.finished) {
      state.activeJobId = jobId;
    }
    updateControls();
    if (stick) {
      scrollToBottom();
    }
  }

  // "delta" and "restart" share one numbering; applying them strictly in seq order makes
  // replays, duplicates and live frames that overtake a replay all come out right.
  function onStreamFrame(frame) {
    const job = jobState(frame.job_id);
    if (job.finished || !Number.isInteger(frame.seq) || frame.seq <= job.lastSeq) {
      return;
    }
    job.buffer.set(frame.seq, frame);
    if (!state.activeJobId) {
      state.activeJobId = frame.job_id; // E.g. the page loaded while the reply was streaming.
    }
    applyBufferedFrames(frame.job_id, job);
    updateControls();
  }

  function applyBufferedFrames(jobId, job) {
    const element = ensureReplyElement(jobId);
    const stick = isNearBottom();
    let next = job.buffer.get(job.lastSeq + 1);
    while (next) {
      job.buffer.delete(next.seq);
      job.lastSeq = next.seq;
      if (next.type === "restart") {
        setMessageContent(element, "");
      } else if (next.type === "error") {
        // llm_unavailable: the reply waits for the provider and goes on; only a notice.
        const wait = Number(next.retry_after) > 0 ? " (about " + Math.ceil(next.retry_after) + " s)" : "";
        showNotice((next.message || ERROR_TEXTS.llm_unavailable) + wait);
      } else {
        appendMessageContent(element, next.content || "");
      }
      next = job.buffer.get(job.lastSeq + 1);
    }
    if (job.lastSeq > 0 && element.dataset.status !== "streaming") {
      setMessageStatus(element, "streaming");
    }
    if (job.buffer.size > 0) {
      scheduleGapResume(jobId, job);
    }
    if (stick) {
      scrollToBottom();
    }
  }

  function scheduleGapResume(jobId, job) {
    if (job.gapTimer) {
      return;
    }
    job.gapTimer = setTimeout(function () {
      job.gapTimer = null;
      if (!job.finished && job.buffer.size > 0) {
        sendFrame({ type: "resume", job_id: jobId, after: job.lastSeq });
      }
    }, GAP_RESUME_MS);
  }

  function onDone(frame) {
    const element = ensureReplyElement(frame.job_id, frame.reply_id);
    const stick = isNearBottom();
    // "content" is the whole answer: it wins over whatever the deltas assembled.
    setMessageContent(element, frame.content || "");
    const status = frame.status === "cancelled" ? "cancelled" : "complete";
    setMessageStatus(element, status);
    if (frame.job_id === state.activeJobId) {
      state.lastOutcome = status === "cancelled" ? "cancelled" : null;
    }
    setMessageUsage(element, frame.usage);
    finishJob(frame.job_id);
    if (stick) {
      scrollToBottom();
    }
  }

  function onError(frame) {
    if (frame.code === "llm_unavailable" && frame.job_id) {
      // Not the end of the reply: it has a seq and goes through the seq buffer.
      onStreamFrame(frame);
      return;
    }
    const text = frame.message || ERROR_TEXTS[frame.code] || "Something went wrong.";
    if (frame.code === "finished") {
      // The cancel came too late: the reply's own end (done, or the resync) says how.
      state.cancelRequestedFor = null;
      updateControls();
    } else if (frame.job_id) {
      // The reply failed (llm_error, timeout): said in it, with a retry.
      if (!jobState(frame.job_id).finished) {
        const element = ensureReplyElement(frame.job_id);
        setMessageStatus(element, "failed");
        setMessageError(element, text);
        state.lastOutcome = "failed";
      }
      finishJob(frame.job_id);
    } else if (state.pending) {
      // An error without a job answers the message we are waiting on (only one can be
      // waiting): the server did not store it, so give the text back to the user, with a
      // retry once the wait the server asks for (rate_limited, overloaded) is over.
      rejectPending();
      showNotice(text, { retry: sendMessage, retryAfter: frame.retry_after });
    } else if (state.regenerating) {
      // The regenerate was refused (busy, invalid, rate_limited...): nothing changed.
      const replyId = state.regenerating;
      state.regenerating = null;
      updateControls();
      showNotice(text, { retry: () => regenerate(replyId), retryAfter: frame.retry_after });
    } else {
      showNotice(text);
      if (state.cancelRequestedFor) {
        // Most likely the cancel was refused: let the user try again.
        state.cancelRequestedFor = null;
        updateControls();
      }
    }
  }

  function finishJob(jobId) {
    const job = jobState(jobId);
    const element = findReplyElement(jobId);
    if (element && renderers.has(element)) {
      renderers.get(element).flush();
    }
    job.finished = true;
    job.buffer.clear();
    clearTimeout(job.gapTimer);
    job.gapTimer = null;
    if (state.activeJobId === jobId) {
      state.activeJobId = null;
    }
    updateControls();
  }

  function jobState(jobId) {
    let job = state.jobs.get(jobId);
    if (!job) {
      job = { lastSeq: 0, buffer: new Map(), finished: false, gapTimer: null };
      state.jobs.set(jobId, job);
    }
    return job;
  }

  // ---------------------------------------------------------------------------------------
  // Sending

  function sendMessage() {
    if (els.send.disabled) {
      return;
    }
    const content = els.input.value.trim();
    if (!content) {
      return;
    }
    const pending = { clientMsgId: newClientMsgId(), content: content, element: null };
    pending.element = appendMessage({ role: "user", status: "sending", content: content });
    state.pending = pending;
    state.lastOutcome = null;
    state.queuePosition = null;
    if (window.GrizzSidebar) {
      window.GrizzSidebar.conversationSent(root.dataset.conversationId, content);
    }
    sendFrame(messageFrame(pending)); // If the socket just dropped, hello resends it.
    els.input.value = "";
    resizeInput();
    hideNotice();
    updateControls();
    scrollToBottom();
  }

  function messageFrame(pending) {
    return { type: "message", content: pending.content, client_msg_id: pending.clientMsgId };
  }

  function rejectPending() {
    const pending = state.pending;
    state.pending = null;
    pending.element.remove();
    if (!els.input.value) {
      els.input.value = pending.content;
      resizeInput();
    }
    updateEmptyHint();
    updateControls();
  }

  function regenerate(replyId) {
    if (!replyId || state.regenerating || state.pending || state.activeJobId) {
      return;
    }
    if (sendFrame({ type: "regenerate", reply_id: replyId })) {
      state.regenerating = replyId;
      state.lastOutcome = null;
      state.queuePosition = null;
      hideNotice();
      updateControls();
    }
  }

  function requestStop() {
    const jobId = state.activeJobId;
    if (jobId && sendFrame({ type: "cancel", job_id: jobId })) {
      // The reply ends with a "done" (status cancelled) frame; until then, do not resend.
      state.cancelRequestedFor = jobId;
      updateControls();
    }
  }

  // crypto.randomUUID() exists only on https or localhost; getRandomValues works everywhere.
  function newClientMsgId() {
    const bytes = new Uint8Array(16);
    window.crypto.getRandomValues(bytes);
    return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
  }

  // ---------------------------------------------------------------------------------------
  // Transcript resync: after a reconnect, fetch this page again and merge its transcript in.

  async function resyncTranscript() {
    // Taken before the fetch: the page rendered after it has every message whose id we
    // knew by then, unless a regenerate in another tab replaced it meanwhile.
    const shownAnswers = Array.from(
      els.transcript.querySelectorAll("li.msg-assistant[data-message-id]"),
      (item) => item.dataset.messageId
    );
    let html;
    try {
      const response = await fetch(window.location.pathname, {
        credentials: "same-origin",
        cache: "no-store",
        headers: { Accept: "text/html" },
      });
      if (!response.ok || response.redirected) {
        return; // E.g. redirected to the login page; the socket will report that.
      }
      html = await response.text();
    } catch (error) {
      return;
    }
    // DOMParser builds an inert document (no scripts run); only data attributes and
    // textContent are read out of it.
    const doc = new DOMParser().parseFromString(html, "text/html");
    const fresh = doc.getElementById("transcript");
    if (fresh) {
      const records = readMessages(fresh);
      const kept = new Set(records.map((record) => record.messageId));
      shownAnswers.filter((id) => !kept.has(id)).forEach(removeAnswer);
      mergeTranscript(records);
    }
    // A title frame sent while we were away: the page as rendered now has the title.
    const titled = doc.querySelector(".conversation-item.is-current:not([data-untitled])");
    if (titled) {
      onTitle({
        conversation_id: root.dataset.conversationId,
        title: titled.querySelector(".conversation-title").textContent,
      });
    }
  }

  function readMessages(list) {
    return Array.from(list.querySelectorAll("li.msg"), function (item) {
      const error = item.querySelector(".msg-error");
      return {
        role: item.dataset.role,
        messageId: item.dataset.messageId || null,
        jobId: item.dataset.jobId || null,
        status: item.dataset.status,
        content: item.querySelector(".msg-content").textContent,
        error: error ? error.textContent : "",
      };
    });
  }

  function mergeTranscript(records) {
    const stick = isNearBottom();
    let previous = null;
    for (const record of records) {
      let element = findMessageElement(record.messageId) || findReplyElement(record.jobId);
      if (!element) {
        element = createMessage(record);
        if (previous) {
          previous.after(element);
        } else {
          els.transcript.prepend(element);
        }
        if (record.jobId) {
          const job = jobState(record.jobId);
          if (!isActive(record.status)) {
            job.finished = true;
          } else {
            // A reply we had not heard of: fetch its frames from the start.
            sendFrame({ type: "resume", job_id: record.jobId, after: job.lastSeq });
          }
        }
      } else if (isActive(element.dataset.status) && !isActive(record.status)) {
        // Finished while we were away and its "done" was lost.
        setMessageContent(element, record.content);
        setMessageStatus(element, record.status);
        if (record.error) {
          setMessageError(element, record.error);
        }
        if (record.jobId) {
          finishJob(record.jobId);
        }
      }
      if (record.messageId && !element.dataset.messageId) {
        element.dataset.messageId = record.messageId;
      }
      previous = element;
    }
    updateEmptyHint();
    updateControls();
    if (stick) {
      scrollToBottom();
    }
  }

  // ---------------------------------------------------------------------------------------
  // Transcript DOM

  function createMessage(record) {
    const item = document.createElement("li");
    item.className = "msg msg-" + record.role;
    item.dataset.role = record.role;
    if (record.messageId) {
      item.dataset.messageId = record.messageId;
    }
    if (record.jobId) {
      item.dataset.jobId = record.jobId;
    }

    const meta = document.createElement("div");
    meta.className = "msg-meta";
    const author = document.createElement("span");
    author.className = "msg-author";
    author.textContent = record.role === "user" ? "You" : "Grizz";
    const label = document.createElement("span");
    label.className = "msg-state";
    meta.append(author, label);

    const content = document.createElement("div");
    content.className = "msg-content";
    content.textContent = record.content || "";

    item.append(meta, content);
    if (record.role === "assistant") {
      decorateAnswer(item, isActive(record.status) ? "" : record.content || "");
    }
    setMessageStatus(item, record.status || "complete");
    if (record.status === "failed") {
      setMessageError(item, record.error || "The reply failed.");
    }
    return item;
  }

  function appendMessage(record) {
    const item = createMessage(record);
    els.transcript.append(item);
    updateEmptyHint();
    return item;
  }

  // The bubble of a job's reply, created at the end of the transcript if it is not there yet.
  function ensureReplyElement(jobId, replyId) {
    let element = findReplyElement(jobId);
    if (!element) {
      element = appendMessage({
        role: "assistant",
        messageId: replyId,
        jobId: jobId,
        status: "queued",
        content: "",
      });
    } else if (replyId && !element.dataset.messageId) {
      element.dataset.messageId = replyId;
    }
    return element;
  }

  function findMessageElement(messageId) {
    if (!messageId) {
      return null;
    }
    const selector = 'li.msg[data-message-id="' + CSS.escape(String(messageId)) + '"]';
    return els.transcript.querySelector(selector);
  }

  function findReplyElement(jobId) {
    if (!jobId) {
      return null;
    }
    const selector = 'li.msg[data-job-id="' + CSS.escape(String(jobId)) + '"]';
    return els.transcript.querySelector(selector);
  }

  function contentNode(element) {
    return element.querySelector(".msg-content");
  }

  // An answer's Markdown renderer, and its Copy button.
  function decorateAnswer(element, text) {
    const renderer = new window.GrizzMarkdown.StreamRenderer(contentNode(element));
    renderer.finish(text);
    renderer.around = function (work) {
      const stick = isNearBottom();
      work();
      if (stick) {
        scrollToBottom();
      }
    };
    renderers.set(element, renderer);
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy-button copy-answer";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy answer");
    element.querySelector(".msg-meta").append(copy);
  }

  function setMessageContent(element, text) {
    const renderer = renderers.get(element);
    if (!renderer) {
      contentNode(element).textContent = text;
    } else if (text) {
      renderer.finish(text);
    } else {
      renderer.reset(""); // "restart": the reply is written again from the start
    }
  }

  // An answer is rendered at most once per frame, its finished blocks kept (markdown.js).
  // A user's text goes to one text node: rebuilding textContent per delta would be quadratic.
  function appendMessageContent(element, text) {
    if (!text) {
      return;
    }
    const renderer = renderers.get(element);
    if (renderer) {
      renderer.append(text);
      return;
    }
    const content = contentNode(element);
    const last = content.lastChild;
    if (last && last.nodeType === Node.TEXT_NODE) {
      last.appendData(text);
    } else {
      content.append(document.createTextNode(text));
    }
  }

  // What the provider counted for the answer, as the page shows it after a reload.
  function setMessageUsage(element, usage) {
    if (!usage || usage.total_tokens == null) {
      return;
    }
    let label = element.querySelector(".msg-usage");
    if (!label) {
      label = document.createElement("span");
      label.className = "msg-usage";
      const meta = element.querySelector(".msg-meta");
      meta.insertBefore(label, meta.querySelector(".copy-answer")); // null: at the end
    }
    label.textContent = usage.total_tokens + " tokens";
    label.title = usage.prompt_tokens + " in, " + usage.completion_tokens + " out";
  }

  function setMessageStatus(element, status) {
    element.dataset.status = status;
    element.querySelector(".msg-state").textContent = STATUS_LABELS[status] || "";
  }

  function setMessageError(element, text) {
    let error = element.querySelector(".msg-error");
    if (!error) {
      error = document.createElement("p");
      error.className = "msg-error";
      element.append(error);
    }
    error.textContent = text + " ";
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "link-button retry-button";
    retry.textContent = "Retry";
    error.append(retry);
  }

  // Retry of a failed answer: the question before it is sent again, as a new turn.
  function retryFailed(element) {
    let question = element.previousElementSibling;
    while (question && question.dataset.role !== "user") {
      question = question.previousElementSibling;
    }
    if (!question || els.send.disabled) {
      return;
    }
    els.input.value = contentNode(question).textContent;
    sendMessage();
  }

  // Copies to the clipboard, with a fallback for pages not in a secure context.
  async function copyText(button, text) {
    try {
      await navigator.clipboard.writeText(text);
    } catch (error) {
      const scratch = document.createElement("textarea");
      scratch.value = text;
      document.body.append(scratch);
      scratch.select();
      document.execCommand("copy");
      scratch.remove();
    }
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => (button.textContent = label), 1500);
  }

  function onTranscriptClick(event) {
    const button = event.target.closest("button");
    if (!button) {
      return;
    }
    const item = button.closest("li.msg");
    if (button.classList.contains("copy-answer")) {
      copyText(button, renderers.get(item).source);
    } else if (button.classList.contains("copy-code")) {
      copyText(button, button.closest(".code-block").querySelector("pre").textContent);
    } else if (button.classList.contains("retry-button")) {
      retryFailed(item);
    } else if (button === els.regenerate) {
      regenerate(item.dataset.messageId);
    }
  }

  function updateEmptyHint() {
    els.empty.hidden = els.transcript.children.length > 0;
  }

  // ---------------------------------------------------------------------------------------
  // Page chrome: controls, status, notices, scrolling

  function updateControls() {
    const replyActive =
      Boolean(state.activeJobId) || Boolean(state.pending) || Boolean(state.regenerating);
    els.send.disabled = !state.connected || replyActive;
    updateRegenerateButton(replyActive);
    els.stop.hidden = !state.activeJobId;
    const stopping = state.activeJobId !== null && state.cancelRequestedFor === state.activeJobId;
    els.stop.disabled = !state.connected || stopping;
    els.stop.textContent = stopping ? "Stopping…" : "Stop";
    updateComposerStatus(stopping);
  }

  function updateComposerStatus(stopping) {
    let name = state.lastOutcome;
    if (state.pending || state.regenerating) {
      name = "sending";
    } else if (stopping) {
      name = "stopping";
    } else if (state.activeJobId) {
      const reply = findReplyElement(state.activeJobId);
      name = reply && reply.dataset.status === "streaming" ? "streaming" : "queued";
    }
    let text = COMPOSER_STATES[name] || "";
    if (name === "queued" && state.queuePosition !== null) {
      text = "Waiting in the queue: position " + state.queuePosition + "…";
    }
    els.composerStatus.dataset.state = name || "idle";
    if (els.composerStatus.textContent !== text) {
      els.composerStatus.textContent = text;
    }
  }

  // One Regenerate button, on the last answer alone once it has finished (complete, stopped
  // or failed), disabled while a reply is on its way. Moved, not made per answer: this runs
  // on every frame of a streaming answer.
  function regenerateButton() {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "copy-button regenerate-button";
    button.textContent = "Regenerate";
    button.setAttribute("aria-label", "Regenerate answer");
    return button;
  }

  function updateRegenerateButton(replyActive) {
    const last = els.transcript.lastElementChild;
    const finishedAnswer =
      last &&
      last.dataset.role === "assistant" &&
      last.dataset.messageId &&
      !isActive(last.dataset.status);
    if (!finishedAnswer) {
      els.regenerate.remove();
      return;
    }
    const meta = last.querySelector(".msg-meta");
    if (els.regenerate.parentNode !== meta) {
      meta.append(els.regenerate);
    }
    els.regenerate.disabled = !state.connected || replyActive;
  }

  function setConnectionStatus(name, text) {
    els.status.dataset.state = name;
    els.status.textContent = text;
  }

  // A notice with a retry action offers it once the server's wait (retry_after, seconds) is
  // over, counting it down meanwhile.
  function showNotice(text, options) {
    const retry = options && options.retry;
    clearInterval(state.noticeTimer);
    els.noticeRetry.hidden = !retry;
    els.noticeRetry.textContent = (options && options.label) || "Retry";
    els.noticeRetry.onclick = retry
      ? function () {
          hideNotice();
          retry();
        }
      : null;
    let wait = Math.ceil((options && options.retryAfter) || 0);
    const tick = function () {
      els.noticeText.textContent = wait > 0 ? text + " Try again in " + wait + " s." : text;
      els.noticeRetry.disabled = wait > 0;
      wait -= 1;
      if (wait < 0) {
        clearInterval(state.noticeTimer);
      }
    };
    tick();
    if (wait >= 0) {
      state.noticeTimer = setInterval(tick, 1000);
    }
    els.notice.hidden = false;
  }

  function hideNotice() {
    if (!state.fatal) {
      clearInterval(state.noticeTimer);
      els.notice.hidden = true;
    }
  }

  function showBanner(text) {
    els.bannerText.textContent = text;
    els.banner.hidden = false;
  }

  function isNearBottom() {
    const page = document.documentElement;
    return window.innerHeight + window.scrollY >= page.scrollHeight - STICK_TO_BOTTOM_PX;
  }

  function scrollToBottom() {
    window.scrollTo(0, document.documentElement.scrollHeight);
  }

  // Grow the textarea with its content, up to a third of the screen.
  function resizeInput() {
    els.input.style.height = "auto";
    const limit = Math.max(120, Math.floor(window.innerHeight / 3));
    els.input.style.height = Math.min(els.input.scrollHeight + 2, limit) + "px";
  }

  // ---------------------------------------------------------------------------------------
  // Start-up

  function readServerRenderedReplies() {
    for (const item of els.transcript.querySelectorAll("li.msg[data-role='assistant']")) {
      decorateAnswer(item, isActive(item.dataset.status) ? "" : contentNode(item).textContent);
    }
    for (const item of els.transcript.querySelectorAll("li.msg[data-job-id]")) {
      const job = jobState(item.dataset.jobId);
      if (item.dataset.status === "failed") {
        setMessageError(item, item.querySelector(".msg-error").textContent);
      }
      if (isActive(item.dataset.status)) {
        // Its content is empty in the database until it finishes: "hello" + resume fill it.
        state.activeJobId = item.dataset.jobId;
      } else {
        job.finished = true;
      }
    }
  }

  function bindEvents() {
    els.form.addEventListener("submit", function (event) {
      event.preventDefault();
      sendMessage();
    });
    els.input.addEventListener("keydown", function (event) {
      // Enter sends, Shift+Enter is a newline; an Enter that confirms an IME composition
      // (keyCode 229 in older browsers) is neither.
      const composing = event.isComposing || event.keyCode === 229;
      if (event.key !== "Enter" || event.shiftKey || composing) {
        return;
      }
      event.preventDefault();
      sendMessage();
    });
    els.input.addEventListener("input", resizeInput);
    els.stop.addEventListener("click", requestStop);
    els.noticeClose.addEventListener("click", function () {
      hideNotice();
    });
    els.bannerRetry.addEventListener("click", reconnectNow);
    els.transcript.addEventListener("click", onTranscriptClick);
    // Back online: no point waiting out the backoff.
    window.addEventListener("online", reconnectNow);
  }

  readServerRenderedReplies();
  updateEmptyHint();
  updateControls();
  bindEvents();
  scrollToBottom();
  scheduleSessionRefresh(Number(root.dataset.sessionRefreshMs));
  connect();
})();
