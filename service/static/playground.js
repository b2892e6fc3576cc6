/* The playground page: load a scenario, build a real CDS Hooks request (server-side helper),
 * POST it to the real /cds-services/<id> endpoint, render the cards the way an EHR shows them,
 * and send real feedback (accept / override) to /cds-services/<id>/feedback.
 * Every text from the service is inserted as text or through RplMarkdown (which escapes HTML). */
(function () {
  "use strict";

  var config = JSON.parse(document.getElementById("playground-config").textContent);
  var T = config.text;
  var INDICATOR_ORDER = { critical: 0, warning: 1, info: 2 };
  var INDICATOR_ICON = { critical: "\u26D4", warning: "\u26A0", info: "\u2139" };

  var form = document.getElementById("hook-form");
  var scenarioSelect = document.getElementById("scenario");
  var scenarioDescription = document.getElementById("scenario-description");
  var bundleArea = document.getElementById("bundle");
  var ordersBlock = document.getElementById("orders-block");
  var ordersArea = document.getElementById("draft-orders");
  var selectionsBlock = document.getElementById("selections-block");
  var selectionsInput = document.getElementById("selections");
  var statusLine = document.getElementById("status");
  var cardList = document.getElementById("cards");
  var notesBox = document.getElementById("notes");
  var notesList = document.getElementById("notes-list");
  var requestJson = document.getElementById("request-json");
  var responseJson = document.getElementById("response-json");
  var requestSummary = document.getElementById("raw-request-summary");
  var runButton = document.getElementById("run");

  var scenario = null; // the loaded scenario (dates shifted to today)
  var lastCall = null; // {serviceId, language}

  function format(template, values) {
    return template.replace(/\{(\w+)\}/g, function (whole, key) {
      return Object.prototype.hasOwnProperty.call(values, key) ? String(values[key]) : whole;
    });
  }

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      if (key === "text") node.textContent = attrs[key];
      else if (key === "className") node.className = attrs[key];
      else node.setAttribute(key, attrs[key]);
    });
    (children || []).forEach(function (child) {
      if (child) node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    });
    return node;
  }

  function setStatus(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
    statusLine.setAttribute("role", isError ? "alert" : "status");
  }

  function pretty(value) {
    return JSON.stringify(value, null, 2);
  }

  function selectedHook() {
    var checked = form.querySelector('input[name="hook"]:checked');
    return checked ? checked.value : "patient-view";
  }

  function selectedLanguage() {
    var checked = form.querySelector('input[name="language"]:checked');
    return checked ? checked.value : document.documentElement.lang;
  }

  function outcomeMessage(body) {
    if (body && body.resourceType === "OperationOutcome" && Array.isArray(body.issue)) {
      return body.issue
        .map(function (issue) {
          return (issue.details && issue.details.text) || issue.diagnostics || issue.code;
        })
        .join(" ");
    }
    return "";
  }

  async function readJson(response) {
    var text = await response.text();
    try {
      return text ? JSON.parse(text) : null;
    } catch (error) {
      return { _text: text };
    }
  }

  // --- scenario and hook choice ------------------------------------------------------------

  function scenarioHookEntry(hook) {
    if (!scenario || !Array.isArray(scenario.hooks)) return null;
    var exact = scenario.hooks.filter(function (h) { return h.hook === hook; })[0];
    if (exact) return exact;
    if (hook === "patient-view") return null;
    return scenario.hooks.filter(function (h) { return Array.isArray(h.draftOrders) && h.draftOrders.length; })[0] || null;
  }

  function fillOrdersFromScenario() {
    var hook = selectedHook();
    var entry = scenarioHookEntry(hook);
    if (scenario) {
      ordersArea.value = entry && entry.draftOrders ? pretty(entry.draftOrders) : "[]";
      selectionsInput.value = entry && hook === "order-select" && entry.selections ? entry.selections.join(", ") : "";
    }
  }

  function showOrdersBlock() {
    var hook = selectedHook();
    ordersBlock.hidden = hook === "patient-view";
    selectionsBlock.hidden = hook !== "order-select";
  }

  async function loadScenario(name) {
    if (!name) {
      scenario = null;
      scenarioDescription.textContent = "";
      document.getElementById("bundle-details").open = true;
      return;
    }
    var response = await fetch(config.scenarioUrl.replace("__NAME__", encodeURIComponent(name)), {
      headers: { Accept: "application/json" },
    });
    var body = await readJson(response);
    if (!response.ok) {
      setStatus(format(T.status_error, { status: response.status, message: outcomeMessage(body) }), true);
      return;
    }
    scenario = body;
    var lang = document.documentElement.lang;
    var description = body.description ? body.description[lang] || body.description.en || "" : "";
    scenarioDescription.textContent = description;
    bundleArea.value = pretty(body.bundle);
    fillOrdersFromScenario();
    var title = body.title ? body.title[lang] || body.title.en || body.name : body.name;
    setStatus(format(T.status_scenario_loaded, { title: title }));
    document.body.setAttribute("data-scenario", body.name);
  }

  // --- running a hook ----------------------------------------------------------------------

  function parseField(area, label) {
    var text = area.value.trim();
    if (!text) return null;
    try {
      return JSON.parse(text);
    } catch (error) {
      throw new Error(format(T.status_bad_json, { field: label, message: error.message }));
    }
  }

  async function runHook(event) {
    if (event) event.preventDefault();
    var hook = selectedHook();
    var language = selectedLanguage();
    var buildBody;
    try {
      buildBody = {
        hook: hook,
        language: language,
        bundle: parseField(bundleArea, "Bundle"),
        draftOrders: hook === "patient-view" ? [] : parseField(ordersArea, "draftOrders") || [],
      };
    } catch (error) {
      setStatus(error.message, true);
      return;
    }
    var selections = selectionsInput.value.split(",").map(function (s) { return s.trim(); }).filter(Boolean);
    if (hook === "order-select" && selections.length) buildBody.selections = selections;

    runButton.disabled = true;
    cardList.replaceChildren();
    setStatus(T.status_building);
    try {
      var built = await fetch(config.buildUrl, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(buildBody),
      });
      var builtBody = await readJson(built);
      if (!built.ok) {
        setStatus(format(T.status_error, { status: built.status, message: outcomeMessage(builtBody) }), true);
        return;
      }
      showNotes(builtBody.notes || []);
      var url = config.serviceUrl.replace("__ID__", encodeURIComponent(builtBody.serviceId));
      requestSummary.textContent = format(T.raw_request, { url: url });
      requestJson.textContent = pretty(builtBody.request);
      responseJson.textContent = "";
      setStatus(T.status_calling);
      var started = performance.now();
      var response = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(builtBody.request),
      });
      var body = await readJson(response);
      var ms = Math.round(performance.now() - started);
      responseJson.textContent = body && body._text !== undefined ? body._text : pretty(body);
      if (response.status === 401) {
        setStatus(T.status_auth, true);
        return;
      }
      if (!response.ok) {
        setStatus(format(T.status_error, { status: response.status, message: outcomeMessage(body) }), true);
        return;
      }
      lastCall = { serviceId: builtBody.serviceId, language: language };
      var cards = (body && body.cards) || [];
      renderCards(cards, language);
      setStatus(format(cards.length ? T.status_done : T.status_no_cards, {
        count: cards.length, status: response.status, ms: ms,
      }));
    } catch (error) {
      setStatus(format(T.status_error, { status: "-", message: error.message }), true);
    } finally {
      runButton.disabled = false;
    }
  }

  function showNotes(notes) {
    notesList.replaceChildren();
    notes.forEach(function (note) {
      notesList.appendChild(el("li", { text: note }));
    });
    notesBox.hidden = notes.length === 0;
  }

  // --- card rendering ----------------------------------------------------------------------

  function renderCards(cards, language) {
    cardList.replaceChildren();
    cardList.setAttribute("lang", language);
    var ordered = cards.map(function (card, index) { return { card: card, index: index }; });
    ordered.sort(function (a, b) {
      var rank = (INDICATOR_ORDER[a.card.indicator] ?? 3) - (INDICATOR_ORDER[b.card.indicator] ?? 3);
      return rank || a.index - b.index;
    });
    ordered.forEach(function (item) {
      cardList.appendChild(renderCard(item.card, item.index));
    });
  }

  function renderCard(card, index) {
    var indicator = INDICATOR_ORDER[card.indicator] !== undefined ? card.indicator : "info";
    var headingId = "card-" + index + "-summary";
    var topic = (card.source && card.source.topic) || {};
    var article = el("article", {
      className: "cds-card cds-card--" + indicator,
      "aria-labelledby": headingId,
      "data-indicator": card.indicator || "",
      "data-rule": topic.code || "",
      "data-uuid": card.uuid || "",
    });
    var badge = el("span", { className: "indicator indicator--" + indicator }, [
      el("span", { "aria-hidden": "true", text: INDICATOR_ICON[indicator] + " " }),
      T["indicator_" + indicator] || card.indicator,
    ]);
    article.appendChild(el("header", { className: "cds-card__header" }, [
      badge,
      el("h3", { id: headingId, className: "cds-card__summary", text: card.summary || "" }),
    ]));
    if (card.detail) {
      var detail = el("div", { className: "cds-card__detail markdown" });
      detail.innerHTML = window.RplMarkdown.render(card.detail, { headingOffset: 3 });
      article.appendChild(detail);
    }
    article.appendChild(renderSource(card.source || {}));
    if (Array.isArray(card.links) && card.links.length) article.appendChild(renderLinks(card.links));
    var feedbackLine = el("p", { className: "cds-card__feedback", role: "status", "aria-live": "polite" });
    if (Array.isArray(card.suggestions) && card.suggestions.length) {
      article.appendChild(renderSuggestions(card, index, feedbackLine));
    }
    article.appendChild(renderOverride(card, index, feedbackLine));
    article.appendChild(feedbackLine);
    return article;
  }

  function renderSource(source) {
    var parts = [el("span", { className: "label", text: T.source + ": " })];
    var safe = /^https?:\/\//i.test(source.url || "");
    parts.push(safe
      ? el("a", { href: source.url, target: "_blank", rel: "noopener noreferrer", text: source.label || source.url })
      : el("span", { text: source.label || "" }));
    if (source.topic) {
      parts.push(el("span", { className: "topic" }, [
        " · " + T.topic + ": ",
        el("code", { text: source.topic.code || "" }),
        source.topic.display ? " (" + source.topic.display + ")" : "",
      ]));
    }
    return el("p", { className: "cds-card__source" }, parts);
  }

  function renderLinks(links) {
    var list = el("ul", { className: "cds-card__links", "aria-label": T.links });
    links.forEach(function (link) {
      var item;
      if (link.type === "absolute" && /^https?:\/\//i.test(link.url || "")) {
        item = el("a", { href: link.url, target: "_blank", rel: "noopener noreferrer", text: link.label || link.url });
      } else {
        item = el("span", { className: "smart-link", title: T.smart_link, text: (link.label || link.url) + " — " + T.smart_link });
      }
      list.appendChild(el("li", {}, [item]));
    });
    return list;
  }

  function renderSuggestions(card, index, feedbackLine) {
    var box = el("div", { className: "cds-card__suggestions", role: "group", "aria-label": T.suggestions });
    card.suggestions.forEach(function (suggestion, s) {
      var button = el("button", { type: "button", className: "suggestion", "data-uuid": suggestion.uuid || "" }, [
        suggestion.label || "",
      ]);
      if (suggestion.isRecommended) {
        button.appendChild(el("span", { className: "recommended", text: " (" + T.recommended + ")" }));
      }
      var actions = el("ul", { className: "actions", id: "card-" + index + "-suggestion-" + s + "-actions" });
      (suggestion.actions || []).forEach(function (action) {
        var target = action.resourceId || (action.resource && action.resource.resourceType
          ? action.resource.resourceType + "/" + (action.resource.id || "") : "");
        actions.appendChild(el("li", {}, [
          el("span", { className: "action-type", text: T["action_" + action.type] || action.type }),
          ": " + (action.description || ""),
          target ? el("code", { text: " " + target }) : null,
        ]));
      });
      button.setAttribute("aria-describedby", actions.id);
      button.addEventListener("click", function () {
        acceptSuggestion(card, suggestion, box.closest("article"), feedbackLine);
      });
      box.appendChild(el("div", { className: "suggestion-row" }, [button, actions]));
    });
    return box;
  }

  function renderOverride(card, index, feedbackLine) {
    var reasonId = "card-" + index + "-override-reason";
    var commentId = "card-" + index + "-override-comment";
    var select = el("select", { id: reasonId });
    select.appendChild(el("option", { value: "", text: T.override_no_reason }));
    (card.overrideReasons || []).forEach(function (reason, r) {
      select.appendChild(el("option", { value: String(r), text: reason.display || reason.code }));
    });
    var comment = el("input", { type: "text", id: commentId, autocomplete: "off" });
    var button = el("button", { type: "submit", className: "override", text: T.override_button });
    var overrideForm = el("form", { className: "cds-card__override" }, [
      el("fieldset", {}, [
        el("legend", { text: T.override_legend }),
        el("div", { className: "override-fields" }, [
          el("div", {}, [el("label", { for: reasonId, text: T.override_reason }), select]),
          el("div", {}, [el("label", { for: commentId, text: T.override_comment }), comment]),
          button,
        ]),
      ]),
    ]);
    overrideForm.addEventListener("submit", function (event) {
      event.preventDefault();
      var reason = select.value === "" ? null : card.overrideReasons[Number(select.value)];
      overrideCard(card, reason, comment.value.trim(), overrideForm.closest("article"), feedbackLine);
    });
    return overrideForm;
  }

  // --- feedback and actions ----------------------------------------------------------------

  function finishCard(article, outcome) {
    article.classList.add("cds-card--" + outcome);
    article.setAttribute("data-outcome", outcome);
    article.querySelectorAll("button, select, input").forEach(function (control) {
      control.disabled = true;
    });
  }

  async function sendFeedback(item, feedbackLine, doneText) {
    if (!item.card) {
      feedbackLine.textContent = T.feedback_no_uuid;
      return;
    }
    feedbackLine.textContent = T.feedback_sending;
    var url = config.serviceUrl.replace("__ID__", encodeURIComponent(lastCall.serviceId)) + "/feedback";
    try {
      var response = await fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ feedback: [item] }),
      });
      var body = await readJson(response);
      if (response.ok) {
        feedbackLine.textContent = doneText;
        feedbackLine.setAttribute("data-feedback", "recorded");
      } else if (response.status === 404) {
        feedbackLine.textContent = T.feedback_unavailable;
        feedbackLine.setAttribute("data-feedback", "unavailable");
      } else {
        feedbackLine.textContent = format(T.feedback_failed, { status: response.status, message: outcomeMessage(body) });
        feedbackLine.setAttribute("data-feedback", "failed");
      }
    } catch (error) {
      feedbackLine.textContent = format(T.feedback_failed, { status: "-", message: error.message });
      feedbackLine.setAttribute("data-feedback", "failed");
    }
  }

  function acceptSuggestion(card, suggestion, article, feedbackLine) {
    finishCard(article, "accepted");
    applyActions(suggestion.actions || []);
    var item = { card: card.uuid, outcome: "accepted", outcomeTimestamp: new Date().toISOString() };
    if (suggestion.uuid) item.acceptedSuggestions = [{ id: suggestion.uuid }];
    return sendFeedback(item, feedbackLine, T.feedback_accepted);
  }

  function overrideCard(card, reason, comment, article, feedbackLine) {
    finishCard(article, "overridden");
    var item = { card: card.uuid, outcome: "overridden", outcomeTimestamp: new Date().toISOString() };
    var overrideReason = {};
    if (reason) overrideReason.reason = { code: reason.code, system: reason.system, display: reason.display };
    if (comment) overrideReason.userComment = comment;
    if (Object.keys(overrideReason).length) item.overrideReason = overrideReason;
    return sendFeedback(item, feedbackLine, T.feedback_overridden);
  }

  // What an EHR does with an accepted suggestion: apply its actions to the draft orders.
  function applyActions(actions) {
    var orders;
    try {
      var parsed = JSON.parse(ordersArea.value || "[]");
      orders = Array.isArray(parsed) ? parsed : (parsed.entry || []).map(function (e) { return e.resource; });
    } catch (error) {
      return;
    }
    var changes = [];
    function ref(resource) {
      return resource.resourceType + "/" + resource.id;
    }
    actions.forEach(function (action) {
      if (action.type === "delete" && action.resourceId) {
        var before = orders.length;
        orders = orders.filter(function (o) { return ref(o) !== action.resourceId; });
        if (orders.length < before) changes.push(T.action_delete + " " + action.resourceId);
      } else if (action.type === "create" && action.resource) {
        orders.push(action.resource);
        changes.push(T.action_create + " " + ref(action.resource));
      } else if (action.type === "update" && action.resource) {
        orders = orders.map(function (o) { return ref(o) === ref(action.resource) ? action.resource : o; });
        changes.push(T.action_update + " " + ref(action.resource));
      }
    });
    if (!changes.length) return;
    ordersArea.value = pretty(orders);
    var remaining = orders.map(ref);
    selectionsInput.value = selectionsInput.value.split(",").map(function (s) { return s.trim(); })
      .filter(function (s) { return s && remaining.indexOf(s) !== -1; }).join(", ");
    showNotes([format(T.orders_updated, { changes: changes.join(", ") })]);
  }

  // --- wiring ------------------------------------------------------------------------------

  form.addEventListener("submit", runHook);
  scenarioSelect.addEventListener("change", function () {
    loadScenario(scenarioSelect.value);
  });
  form.querySelectorAll('input[name="hook"]').forEach(function (radio) {
    radio.addEventListener("change", function () {
      showOrdersBlock();
      fillOrdersFromScenario();
    });
  });
  showOrdersBlock();
  if (scenarioSelect.value) loadScenario(scenarioSelect.value);
  document.body.setAttribute("data-ready", "true");
})();
