/*
 * Grizz's Markdown rendering of model answers (static/vendor/: marked, DOMPurify, highlight.js).
 *
 * Safety: model output is untrusted. Raw HTML in it is shown as text (the html renderer
 * escapes it), images become links (a remote image would fetch a URL the model chose, which
 * is how injected prompts leak a conversation), and DOMPurify cleans whatever marked
 * produced anyway (javascript: URLs, event handlers), so nothing the model writes can run.
 *
 * Cost: a streamed answer is rendered at most once per animation frame, and only its last
 * blocks, which may still change, are parsed again; finished blocks stay in the DOM as
 * they were rendered (StreamRenderer). The whole answer is parsed once more when it ends,
 * so that the final rendering is exactly what a single parse gives.
 */
(function () {
  "use strict";

  const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

  function escapeHtml(text) {
    return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
  }

  const markdown = new window.marked.Marked({ gfm: true, breaks: false });
  markdown.use({
    renderer: {
      html(token) {
        return escapeHtml(token.text);
      },
      image(token) {
        const label = escapeHtml(token.text || token.href);
        return '<a href="' + escapeHtml(token.href) + '">' + label + "</a>";
      },
    },
  });

  const PURIFY_CONFIG = {
    FORBID_TAGS: ["style", "img", "svg", "math", "form", "input", "button", "textarea"],
    FORBID_ATTR: ["style"],
    RETURN_DOM_FRAGMENT: true,
  };

  window.DOMPurify.addHook("afterSanitizeAttributes", function (node) {
    if (node.tagName === "A" && node.hasAttribute("href")) {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });

  window.hljs.configure({ ignoreUnescapedHTML: true });

  // Time spent rendering, for the browser tests' measurement of a long answer.
  const stats = { renders: 0, ms: 0, maxMs: 0 };

  function fragmentOf(tokens, { highlight }) {
    const fragment = window.DOMPurify.sanitize(markdown.parser(tokens), PURIFY_CONFIG);
    decorateCode(fragment, highlight);
    return fragment;
  }

  // Copy buttons (and highlighting) are added to the sanitised DOM, not written as HTML.
  function decorateCode(fragment, highlight) {
    for (const pre of fragment.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      const language = code && /language-([\w+#-]+)/.exec(code.className);
      if (highlight && language && window.hljs.getLanguage(language[1])) {
        window.hljs.highlightElement(code);
      }
      const block = document.createElement("div");
      block.className = "code-block";
      const head = document.createElement("div");
      head.className = "code-head";
      const name = document.createElement("span");
      name.textContent = language ? language[1] : "code";
      const copy = document.createElement("button");
      copy.type = "button";
      copy.className = "copy-button copy-code";
      copy.textContent = "Copy";
      copy.setAttribute("aria-label", "Copy code");
      head.append(name, copy);
      pre.replaceWith(block);
      block.append(head, pre);
    }
  }

  function render(text) {
    return fragmentOf(markdown.lexer(text), { highlight: true });
  }

  function measured(work) {
    const started = performance.now();
    work();
    const spent = performance.now() - started;
    stats.renders += 1;
    stats.ms += spent;
    stats.maxMs = Math.max(stats.maxMs, spent);
  }

  // How many of the last blocks may still change: the unfinished one, and the one before
  // it (a line of "---" turns the paragraph above into a heading).
  const OPEN_BLOCKS = 2;

  class StreamRenderer {
    constructor(container) {
      this.container = container;
      this.source = "";
      this.stable = 0; // source[0:stable] is rendered for good
      this.tail = null;
      this.frame = 0;
      // Wraps each render of a frame: the page keeps its scroll at the bottom through it.
      this.around = (work) => work();
    }

    append(text) {
      this.source += text.replace(/\r\n?/g, "\n");
      this.schedule();
    }

    reset(text) {
      this.cancel();
      this.source = text.replace(/\r\n?/g, "\n");
      this.stable = 0;
      this.tail = null;
      this.container.replaceChildren();
      this.schedule();
    }

    // The whole answer is known: one full parse, the same as a page load would show.
    finish(text) {
      this.cancel();
      this.source = text.replace(/\r\n?/g, "\n");
      measured(() => this.container.replaceChildren(render(this.source)));
      this.stable = this.source.length;
      this.tail = null;
    }

    schedule() {
      if (!this.frame) {
        this.frame = window.requestAnimationFrame(() => {
          this.frame = 0;
          this.around(() => measured(() => this.renderOpen()));
        });
      }
    }

    cancel() {
      if (this.frame) {
        window.cancelAnimationFrame(this.frame);
        this.frame = 0;
      }
    }

    flush() {
      if (this.frame) {
        this.cancel();
        measured(() => this.renderOpen());
      }
    }

    renderOpen() {
      const rest = this.source.slice(this.stable);
      let tokens = markdown.lexer(rest);
      const open = openFrom(tokens);
      const done = tokens.slice(0, open);
      const raw = done.map((token) => token.raw).join("");
      // The lexer's raw texts add up to its input; if they ever do not, render it all open.
      if (done.length && rest.startsWith(raw)) {
        this.ensureTail().before(fragmentOf(done, { highlight: true }));
        this.stable += raw.length;
        tokens = tokens.slice(open);
      }
      this.ensureTail().replaceChildren(fragmentOf(tokens, { highlight: false }));
    }

    ensureTail() {
      if (!this.tail) {
        this.tail = document.createElement("div");
        this.tail.className = "md-open";
        this.container.append(this.tail);
      }
      return this.tail;
    }
  }

  // The index of the first token that may still change.
  function openFrom(tokens) {
    let seen = 0;
    for (let index = tokens.length - 1; index >= 0; index -= 1) {
      if (tokens[index].type !== "space") {
        seen += 1;
        if (seen === OPEN_BLOCKS) {
          return index;
        }
      }
    }
    return 0;
  }

  window.GrizzMarkdown = { render, StreamRenderer, stats };
})();
