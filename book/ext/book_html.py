"""Local Sphinx extension: keep every HTML page free of console errors, offline.

- sphinx-thebe adds its inline configuration script (``const THEBE_JS_URL = ...``) once per read of
  the sources; when Jupyter Book reads twice the page declares the constant twice and the browser
  throws ``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``. Duplicate scripts
  are dropped here, keeping the first.
- pydata-sphinx-theme reads ``default_mode`` from the page context and logs "Got invalid theme
  mode" when it is empty; ``auto`` (follow the reader's system setting) is what it falls back to.

tests/test_book.py::test_every_page_renders_offline_in_a_browser checks both.
"""


def _dedupe_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if isinstance(scripts, list):
        seen, kept = set(), []
        for script in scripts:
            # the same inline script comes once with filename None and once with '': compare contents
            attributes = tuple(sorted((k, str(v)) for k, v in getattr(script, "attributes", {}).items()))
            key = (getattr(script, "filename", str(script)) or "", getattr(script, "priority", 0), attributes)
            if key not in seen:
                seen.add(key)
                kept.append(script)
        scripts[:] = kept  # in place: the builder's own list, which later handlers may extend
    if not context.get("default_mode"):
        context["default_mode"] = "auto"


def setup(app):
    # 'html-page-context' stops at the first handler that returns a template name: run early
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
