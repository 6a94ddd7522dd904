// A small, safe Markdown renderer for chat replies.
//
// Safety comes from the order: the whole source is HTML-escaped first, and the rules below only ever add
// a fixed set of tags (p, br, h1-h6, ul, ol, li, blockquote, hr, pre, code, strong, em, del, a, and a
// table's div, table, thead, tbody, tr, th, td) around escaped text. Links are kept only for http(s) URLs;
// a table cell's alignment is one of three fixed classes. Nothing from the source can become a tag or an
// attribute of its own. A reply is re-rendered whole on each update, so an unclosed code fence simply
// runs to the end of the text until its closing line arrives.

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}&gt; ?/;
const ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])[ \t]+(.*)$/;
const BLANK = /^\s*$/;
// A table's delimiter row (GitHub's tables): cells of dashes, each with an optional colon on either side.
const TABLE_DELIMITER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(?:\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

/** Render Markdown source to an HTML string that is safe to assign to innerHTML. */
export function renderMarkdown(source) {
  const text = String(source ?? "")
    .replace(/\r\n?/g, "\n")
    .replace(/\u0000/g, "");
  return blocks(escapeHtml(text).split("\n"), false);
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line);
}

// A row's cells: split on pipes not escaped as \|, without the optional pipes at either end.
function cells(line) {
  const row = line.trim().replace(/^\|/, "").replace(/(^|[^\\])\|$/, "$1");
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

// A table starts at lines[i]: a row with a pipe, then a delimiter row with as many cells.
function startsTable(lines, i) {
  const next = lines[i + 1];
  if (!lines[i].includes("|") || next === undefined || !TABLE_DELIMITER.test(next)) return false;
  return cells(next).length === cells(lines[i]).length;
}

// The table starting at lines[start]; returns the index after it. Body rows run to a blank line or another block.
function table(lines, start, out) {
  const header = cells(lines[start]);
  const aligns = cells(lines[start + 1]).map((cell) => {
    const left = cell.startsWith(":");
    const right = cell.endsWith(":");
    const align = left && right ? "center" : right ? "right" : left ? "left" : "";
    return align ? ` class="align-${align}"` : ""; // a class: the page's CSP refuses inline styles
  });
  const row = (values, tag) =>
    `<tr>${header.map((_, n) => `<${tag}${aligns[n]}>${inline(values[n] ?? "")}</${tag}>`).join("")}</tr>`;
  const body = [];
  let i = start + 2;
  while (i < lines.length && !BLANK.test(lines[i]) && !startsBlock(lines[i])) {
    body.push(row(cells(lines[i]), "td"));
    i += 1;
  }
  const tbody = body.length ? `<tbody>${body.join("")}</tbody>` : "";
  out.push(`<div class="table"><table><thead>${row(header, "th")}</thead>${tbody}</table></div>`);
  return i;
}

// Lines are already escaped. `tight` leaves paragraphs unwrapped (list items with no blank line).
function blocks(lines, tight) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (BLANK.test(line)) {
      i += 1;
    } else if ((m = line.match(FENCE))) {
      const marker = m[1];
      const closing = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}\\s*$`);
      const body = [];
      i += 1;
      while (i < lines.length && !closing.test(lines[i])) body.push(lines[i++]);
      i += 1; // the closing fence, or past the end while it is still streaming
      const language = m[2] ? ` class="language-${m[2]}"` : "";
      out.push(`<pre><code${language}>${body.join("\n")}</code></pre>`);
    } else if ((m = line.match(HEADING))) {
      out.push(`<h${m[1].length}>${inline(m[2])}</h${m[1].length}>`);
      i += 1;
    } else if (RULE.test(line)) {
      out.push("<hr>");
      i += 1;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < lines.length && QUOTE.test(lines[i])) body.push(lines[i++].replace(QUOTE, ""));
      out.push(`<blockquote>${blocks(body, false)}</blockquote>`);
    } else if ((m = line.match(ITEM))) {
      i = list(lines, i, out);
    } else if (startsTable(lines, i)) {
      i = table(lines, i, out);
    } else {
      const body = [];
      while (
        i < lines.length &&
        !BLANK.test(lines[i]) &&
        (body.length === 0 || !(startsBlock(lines[i]) || startsTable(lines, i)))
      ) {
        body.push(lines[i++].trim());
      }
      out.push(tight ? inline(body.join("\n")) : `<p>${inline(body.join("\n"))}</p>`);
    }
  }
  return out.join("");
}

// One list starting at lines[start]; returns the index after it. Items continue on lines indented past
// their marker, and nested lists are such indented lines.
function list(lines, start, out) {
  const first = lines[start].match(ITEM);
  const ordered = /\d/.test(first[2]);
  const baseIndent = first[1].length;
  const items = [];
  let i = start;
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (!m || m[1].length !== baseIndent || /\d/.test(m[2]) !== ordered) break;
    const contentIndent = m[1].length + m[2].length + 1;
    const body = [m[3]];
    i += 1;
    while (i < lines.length) {
      const line = lines[i];
      const indent = line.match(/^ */)[0].length;
      if (BLANK.test(line)) {
        // A blank line continues the item only when an indented line follows it.
        const next = lines[i + 1];
        if (next === undefined || BLANK.test(next) || next.match(/^ */)[0].length < contentIndent) break;
        body.push("");
      } else if (indent >= Math.min(contentIndent, baseIndent + 2)) {
        body.push(line.slice(Math.min(indent, contentIndent)));
      } else if (!startsBlock(line) && !BLANK.test(lines[i - 1])) {
        body.push(line.trim()); // a lazy continuation of the item's paragraph
      } else {
        break;
      }
      i += 1;
    }
    items.push(`<li>${blocks(body, !body.includes(""))}</li>`);
    while (i < lines.length && BLANK.test(lines[i]) && lines[i + 1] !== undefined && ITEM.test(lines[i + 1])) {
      const next = lines[i + 1].match(ITEM);
      if (next[1].length !== baseIndent) break;
      i += 1; // blank lines between items of the same list
    }
  }
  const number = ordered ? parseInt(first[2], 10) : 1;
  const tag = ordered ? "ol" : "ul";
  const startAttr = ordered && number !== 1 ? ` start="${number}"` : "";
  out.push(`<${tag}${startAttr}>${items.join("")}</${tag}>`);
  return i;
}

// Inline rules over escaped text. Code spans and links are set aside first (as \u0000n\u0000) so that
// emphasis rules cannot reach into code or into a URL.
function inline(text) {
  const stash = [];
  const keep = (html) => `\u0000${stash.push(html) - 1}\u0000`;
  let s = text.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, _ticks, code) => keep(`<code>${code}</code>`));
  s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, (_, label, url) => keep(link(url, emphasis(label))));
  s = s.replace(/https?:\/\/(?:(?!&(?:lt|gt|quot|#39);)[^\s\u0000])+/g, (url) => {
    const trail = url.match(/[.,:;!?)\]]+$/);
    const bare = trail ? url.slice(0, -trail[0].length) : url;
    return keep(link(bare, bare)) + (trail ? trail[0] : "");
  });
  s = emphasis(s).replace(/\n/g, "<br>");
  for (let round = 0; round < 3 && s.includes("\u0000"); round += 1) {
    s = s.replace(/\u0000(\d+)\u0000/g, (_, n) => stash[Number(n)]);
  }
  return s;
}

function link(url, label) {
  return `<a href="${url}" target="_blank" rel="noopener noreferrer nofollow">${label}</a>`;
}

function emphasis(s) {
  return s
    .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, "$1<strong>$2</strong>")
    .replace(/(^|[^\w*])\*([^\s*]|[^\s*][^*\n]*?[^\s*])\*(?![\w*])/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_([^\s_]|[^\s_][^_\n]*?[^\s_])_(?!\w)/g, "$1<em>$2</em>")
    .replace(/~~(?=\S)([\s\S]*?\S)~~/g, "<del>$1</del>");
}
