"""Local Sphinx extension: keep every HTML page free of console errors, offline.

- sphinx-thebe adds its inline configuration script (``const THEBE_JS_URL = ...``) once per read of
  the sources; when Jupyter Book reads twice the page declares the constant twice and the browser
  throws ``SyntaxError: Identifier 'THEBE_JS_URL' has already been declared``. Duplicate scripts
  are dropped here, keeping the first.
- pydata-sphinx-theme reads ``default_mode`` from the page context and logs "Got invalid theme
  mode" when it is empty; ``auto`` (follow the reader's system setting) is what it falls back to.

- Launch button: a chapter page gets a rocket menu whose entry opens that chapter's notebook in the
  JupyterLab that ``make lab`` starts on this machine (``book_launch_url``, default
  ``http://localhost:8888/lab/tree/``). Binder and Colab buttons would need a network and a public
  repository, so the book has none.

tests/test_book.py::test_every_page_renders_offline_in_a_browser checks the first two,
tests/test_book.py::test_chapter_pages_launch_in_local_jupyterlab the third.
"""

from pathlib import Path


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


def _launch_button(app, pagename, templatename, context, doctree):
    source = Path(app.env.doc2path(pagename, base=False)) if pagename in app.env.all_docs else None
    if source is None or source.suffix != ".ipynb" or "header_buttons" not in context:
        return
    url = app.config.book_launch_url.rstrip("/") + "/" + source.as_posix()
    context["header_buttons"].append(
        {
            "type": "group",
            "tooltip": "Run this chapter",
            "icon": "fas fa-rocket",
            "label": "launch-buttons",
            "buttons": [
                {
                    "type": "link",
                    "text": "JupyterLab on this machine",
                    "tooltip": "Open this notebook in the JupyterLab that `make lab` starts",
                    "icon": "fas fa-laptop-code",
                    "url": url,
                    "label": "launch-local-lab",
                }
            ],
        }
    )


def setup(app):
    app.add_config_value("book_launch_url", "http://localhost:8888/lab/tree/", "html")
    # after sphinx-book-theme's own launch and source buttons (priority 501)
    app.connect("html-page-context", _launch_button, priority=502)
    # 'html-page-context' stops at the first handler that returns a template name: run early
    app.connect("html-page-context", _dedupe_scripts, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
