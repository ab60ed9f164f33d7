"""Self-contained HTML pages (no scripts fetched, nothing but the standard library).

Every page carries an error hook that records script errors on ``<html
data-js-errors>``, which a headless browser's DOM dump shows: the pages' tests read it.
Callers escape their own text (``html.escape``); ``page`` escapes only the title.
"""

from __future__ import annotations

import html

_HEAD = """<script>
window.addEventListener("error", function (e) {
  var el = document.documentElement;
  el.setAttribute("data-js-errors", (el.getAttribute("data-js-errors") || "") + e.message + ";");
});
</script>
<style>
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: .5em 0; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
pre { background: #f6f6f6; padding: .5em; }
.note { color: #666; font-size: 90%; }
</style>"""


def page(title: str, body: str) -> str:
  """A whole HTML document: ``title`` (escaped here) as <title> and <h1>, then ``body``."""
  t = html.escape(title)
  return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{t}</title>\n{_HEAD}'
          f"</head>\n<body><h1>{t}</h1>\n{body}\n</body></html>\n")
