/* A small, safe Markdown renderer for card `detail` (GitHub Flavored Markdown subset).
 *
 * Safety first: every character of the input is HTML-escaped before any markup is added, and the
 * only tags produced are the ones below, so raw HTML in a card detail shows up as text. Links
 * keep only http(s), mailto and same-site URLs.
 *
 * Supported: paragraphs, hard line breaks, ATX headings, emphasis (* _ ** __ ~~), code spans,
 * fenced code blocks, links [text](url) and <url> / bare http(s) autolinks, bullet and numbered
 * lists (nested by indentation), block quotes, horizontal rules, GFM tables.
 *
 * Usage: RplMarkdown.render(markdown, {headingOffset: 3}) -> HTML string.
 */
(function (global) {
  "use strict";

  function escapeHtml(text) {
    return String(text)
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  // `url` arrives HTML-escaped; decode the one entity a URL commonly holds before checking it.
  function safeUrl(escapedUrl) {
    var url = escapedUrl.replace(/&amp;/g, "&").trim();
    if (/^(https?:\/\/|mailto:)/i.test(url)) return escapeHtml(url);
    if (/^(\/(?!\/)|#)/.test(url)) return escapeHtml(url);
    return null;
  }

  function anchor(href, label) {
    return '<a href="' + href + '" target="_blank" rel="noopener noreferrer">' + label + "</a>";
  }

  // Inline markup. Code spans and links are set aside as placeholders so that emphasis rules
  // never reach inside them.
  function inline(raw) {
    var saved = [];
    function keep(html) {
      saved.push(html);
      return "\u0000" + (saved.length - 1) + "\u0000";
    }
    var text = String(raw).replace(/\u0000/g, "");
    text = text.replace(/(`+)([\s\S]*?[^`])\1(?!`)/g, function (_, ticks, code) {
      return keep("<code>" + escapeHtml(code.trim()) + "</code>");
    });
    text = escapeHtml(text);
    text = text.replace(/\\([\\`*_{}\[\]()#+\-.!|~])/g, function (_, ch) {
      return keep(ch);
    });
    text = text.replace(/\[([^\]]+)\]\(\s*([^)\s]+)(?:\s+&quot;[^]*?&quot;)?\s*\)/g, function (_, label, url) {
      var href = safeUrl(url);
      return href ? keep(anchor(href, label)) : label;
    });
    text = text.replace(/&lt;((?:https?:\/\/|mailto:)[^\s]+?)&gt;/g, function (_, url) {
      var href = safeUrl(url);
      return href ? keep(anchor(href, url)) : url;
    });
    text = text.replace(/\bhttps?:\/\/[^\s<\u0000]+[^\s<\u0000.,;:!?)'"]/g, function (url) {
      var href = safeUrl(url);
      return href ? keep(anchor(href, url)) : url;
    });
    text = text
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
      .replace(/\*(?=\S)([\s\S]*?\S)\*/g, "<em>$1</em>")
      .replace(/(^|[^\w])_(?=\S)([\s\S]*?\S)_(?!\w)/g, "$1<em>$2</em>")
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
    text = text.replace(/( {2,}|\\)\n/g, "<br>\n");
    return text.replace(/\u0000(\d+)\u0000/g, function (_, i) {
      return saved[Number(i)];
    });
  }

  var FENCE = /^\s{0,3}(```+|~~~+)\s*([\w-]*)\s*$/;
  var HEADING = /^\s{0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  var RULE = /^\s{0,3}([-*_])(?:\s*\1){2,}\s*$/;
  var QUOTE = /^\s{0,3}>\s?(.*)$/;
  var ITEM = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  var TABLE_DELIMITER = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;

  function splitRow(line) {
    var row = line.trim().replace(/^\|/, "").replace(/\|$/, "");
    var cells = [];
    var current = "";
    for (var i = 0; i < row.length; i++) {
      if (row[i] === "\\" && row[i + 1] === "|") {
        current += "|";
        i++;
      } else if (row[i] === "|") {
        cells.push(current.trim());
        current = "";
      } else {
        current += row[i];
      }
    }
    cells.push(current.trim());
    return cells;
  }

  function startsBlock(lines, i) {
    var line = lines[i];
    return (
      FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) ||
      ITEM.test(line) || isTableStart(lines, i)
    );
  }

  function isTableStart(lines, i) {
    return (
      lines[i].indexOf("|") !== -1 && i + 1 < lines.length &&
      lines[i + 1].indexOf("-") !== -1 && TABLE_DELIMITER.test(lines[i + 1])
    );
  }

  function renderTable(lines, i, out) {
    var header = splitRow(lines[i]);
    var aligns = splitRow(lines[i + 1]).map(function (cell) {
      var left = cell.charAt(0) === ":";
      var right = cell.charAt(cell.length - 1) === ":";
      return left && right ? "center" : right ? "right" : left ? "left" : "";
    });
    function cellHtml(tag, content, col) {
      var align = aligns[col] ? ' class="align-' + aligns[col] + '"' : "";
      return "<" + tag + align + ">" + inline(content || "") + "</" + tag + ">";
    }
    var html = "<table><thead><tr>";
    header.forEach(function (cell, col) {
      html += cellHtml("th", cell, col);
    });
    html += "</tr></thead><tbody>";
    i += 2;
    while (i < lines.length && lines[i].trim() !== "" && lines[i].indexOf("|") !== -1) {
      var cells = splitRow(lines[i]);
      html += "<tr>";
      for (var col = 0; col < header.length; col++) html += cellHtml("td", cells[col], col);
      html += "</tr>";
      i++;
    }
    out.push(html + "</tbody></table>");
    return i;
  }

  // Lists: a stack of open lists; deeper indentation opens a nested list inside the last item.
  function renderList(lines, i, out, options) {
    var root = { children: [] };
    var stack = [];
    while (i < lines.length) {
      var line = lines[i];
      var match = ITEM.exec(line);
      if (match) {
        var indent = match[1].replace(/\t/g, "    ").length;
        var ordered = /\d/.test(match[2]);
        while (stack.length && indent < stack[stack.length - 1].indent) stack.pop();
        var top = stack[stack.length - 1];
        if (top && indent === top.indent && top.ordered !== ordered) {
          stack.pop();
          top = stack[stack.length - 1];
        }
        if (!top || indent > top.indent) {
          var parent = top ? top.items[top.items.length - 1] : root;
          var list = { indent: indent, ordered: ordered, start: parseInt(match[2], 10), items: [] };
          if (!top && stack.length) stack = [];
          (parent.children || (parent.children = [])).push(list);
          stack.push(list);
          top = list;
        }
        top.items.push({ text: match[3], children: [] });
        i++;
      } else if (line.trim() === "") {
        var next = lines[i + 1];
        if (next === undefined || !(ITEM.test(next) || /^\s{2,}\S/.test(next))) break;
        i++;
      } else if (stack.length && (/^\s+\S/.test(line) || !startsBlock(lines, i))) {
        var current = stack[stack.length - 1];
        current.items[current.items.length - 1].text += "\n" + line.trim();
        i++;
      } else {
        break;
      }
    }
    root.children.forEach(function (list) {
      out.push(listHtml(list, options));
    });
    return i;
  }

  function listHtml(list, options) {
    var tag = list.ordered ? "ol" : "ul";
    var start = list.ordered && list.start > 1 ? ' start="' + list.start + '"' : "";
    var html = "<" + tag + start + ">";
    list.items.forEach(function (item) {
      html += "<li>" + inline(item.text);
      item.children.forEach(function (child) {
        html += listHtml(child, options);
      });
      html += "</li>";
    });
    return html + "</" + tag + ">";
  }

  function renderBlocks(lines, options) {
    var out = [];
    var i = 0;
    while (i < lines.length) {
      var line = lines[i];
      var match;
      if (line.trim() === "") {
        i++;
      } else if ((match = FENCE.exec(line))) {
        var fence = match[1];
        var code = [];
        i++;
        while (i < lines.length && lines[i].trim().indexOf(fence) !== 0) code.push(lines[i++]);
        i++;
        out.push("<pre><code>" + escapeHtml(code.join("\n")) + "</code></pre>");
      } else if ((match = HEADING.exec(line))) {
        var level = Math.min(6, match[1].length + (options.headingOffset || 0));
        out.push("<h" + level + ">" + inline(match[2]) + "</h" + level + ">");
        i++;
      } else if (RULE.test(line)) {
        out.push("<hr>");
        i++;
      } else if (QUOTE.test(line)) {
        var quoted = [];
        while (i < lines.length && lines[i].trim() !== "") {
          var q = QUOTE.exec(lines[i]);
          quoted.push(q ? q[1] : lines[i]);
          i++;
        }
        out.push("<blockquote>" + renderBlocks(quoted, options) + "</blockquote>");
      } else if (isTableStart(lines, i)) {
        i = renderTable(lines, i, out);
      } else if (ITEM.test(line)) {
        i = renderList(lines, i, out, options);
      } else {
        var paragraph = [];
        while (i < lines.length && lines[i].trim() !== "" && (paragraph.length === 0 || !startsBlock(lines, i))) {
          paragraph.push(lines[i].replace(/^\s+/, ""));
          i++;
        }
        out.push("<p>" + inline(paragraph.join("\n")) + "</p>");
      }
    }
    return out.join("\n");
  }

  function render(markdown, options) {
    if (typeof markdown !== "string" || markdown === "") return "";
    var lines = markdown.replace(/\r\n?/g, "\n").split("\n");
    return renderBlocks(lines, options || {});
  }

  global.RplMarkdown = { render: render, escapeHtml: escapeHtml };
})(window);
