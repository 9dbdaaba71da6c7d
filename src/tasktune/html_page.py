"""report.md → a self-contained report.html: the small markdown subset report.py writes (headings, lists,
tables, images, code, bold), images embedded as base64, no external requests, readable on a phone.

Tables scroll inside their own box, so a wide table never widens the page. A table that follows a paragraph
ending in "(sortable)" gets a filter box and sortable columns, from a few lines of plain JavaScript in the page.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body{font-family:system-ui,-apple-system,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;color:#1d1d1f;
 line-height:1.45;overflow-wrap:anywhere}
h1{font-size:1.5em}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
.headline{background:#f1f6ff;border:1px solid #c9dcff;border-radius:8px;padding:.8em 1em;margin:1em 0}
.headline .big{font-size:1.6em;font-weight:600}
.scroll{overflow-x:auto;max-width:100%;margin:1em 0}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
td,th{border:1px solid #d0d0d0;padding:4px 8px;text-align:right;vertical-align:top}
td:first-child,th:first-child{text-align:left}th{background:#f3f3f3;position:sticky;top:0}
tr:nth-child(even) td{background:#fafafa}
table.sortable th{cursor:pointer}table.sortable th::after{content:" \\2195";color:#999}
input.filter{width:100%;max-width:24em;padding:4px;margin:.5em 0;box-sizing:border-box}
img{max-width:100%;height:auto}figure{margin:1em 0}figcaption{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:0 .2em;border-radius:3px}pre{background:#f5f5f5;padding:1em;overflow:auto}
"""

# Sort by a clicked column (numbers numerically), and filter the rows of a sortable table by typed text.
SCRIPT = """
document.querySelectorAll('table.sortable').forEach(function(table){
  var body = table.tBodies[0], head = table.tHead.rows[0];
  Array.prototype.forEach.call(head.cells, function(cell, col){
    cell.addEventListener('click', function(){
      var rows = Array.prototype.slice.call(body.rows), asc = cell.dataset.asc !== '1';
      rows.sort(function(a, b){
        var x = a.cells[col].textContent, y = b.cells[col].textContent, nx = parseFloat(x), ny = parseFloat(y);
        var d = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
        return asc ? d : -d;
      });
      cell.dataset.asc = asc ? '1' : '0';
      rows.forEach(function(r){ body.appendChild(r); });
    });
  });
  var box = table.parentNode.previousElementSibling;
  if (box && box.classList.contains('filter')) box.addEventListener('input', function(){
    var q = box.value.toLowerCase();
    Array.prototype.forEach.call(body.rows, function(r){
      r.style.display = r.textContent.toLowerCase().indexOf(q) >= 0 ? '' : 'none';
    });
  });
});
"""


def inline(text: str) -> str:
    # report.md writes data as HTML entities (`&lt;script&gt;`): decode them once, then escape everything.
    text = html.escape(html.unescape(text))
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def table_html(lines: list[str], sortable: bool) -> str:
    rows = [r for r in lines if not re.fullmatch(r"\|[-:| ]+\|", r.strip())]
    cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", r.strip())[1:-1]] for r in rows]
    head = "<thead><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr></thead>"
    body = "<tbody>" + "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>"
                               for row in cells[1:]) + "</tbody>"
    table = f"<div class='scroll'><table{' class=sortable' if sortable else ''}>{head}{body}</table></div>"
    return ("<input class='filter' type='search' placeholder='filter rows' aria-label='filter rows'>" + table
            if sortable else table)


def markdown_to_html(markdown: str, run_dir: Path, headline: str | None = None) -> str:
    """The page. `headline` (HTML) is shown under the title: what a reader takes in at a glance."""
    out: list[str] = []
    table: list[str] = []
    items: list[str] = []
    in_code = False
    sortable = False

    def flush() -> None:
        nonlocal sortable
        if table:
            out.append(table_html(table, sortable))
            table.clear()
            sortable = False
        if items:
            out.append("<ul>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in markdown.splitlines():
        if line.startswith("```"):
            flush()
            out.append("</pre>" if in_code else "<pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            if table:
                flush()
            items.append(line[2:])
            continue
        flush()
        image = re.fullmatch(r"!\[(.*)\]\((.*)\)", line)
        if image:
            data = base64.b64encode((run_dir / image[2]).read_bytes()).decode()
            out.append(f'<figure><img alt="{html.escape(image[1])}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(image[1])}</figcaption></figure>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
            if level == 1 and headline:
                out.append(f"<div class='headline'>{headline}</div>")
        elif line.strip():
            sortable = line.rstrip().endswith("(sortable)")
            out.append(f"<p>{inline(line.replace('(sortable)', '').rstrip())}</p>")
    flush()
    title = html.escape(markdown.splitlines()[0].lstrip("# ")) if markdown else "tasktune report"
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{title}</title>"
            f"<style>{STYLE}</style></head><body>{''.join(out)}<script>{SCRIPT}</script></body></html>\n")
