"""A minimal Chrome DevTools Protocol client over ``--remote-debugging-pipe``.

The pipe needs no network at all, so Chromium can run inside a network namespace that has none
(``unshare -n``) and still be driven from here: commands go to Chromium's fd 3, replies and events
come back on its fd 4, each message a JSON object ending with a NUL byte. Used by
tests/test_book.py to open every page of the built book offline.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


class Chromium:
    """Headless Chromium with one page, driven through the DevTools protocol.

    >>> # with Chromium(binary, profile_dir) as browser:
    >>> #     report = browser.open(Path("_build/html/index.html"))
    """

    def __init__(self, binary: str, profile: Path, *, prefix: Sequence[str] = (), size: tuple[int, int] = (1280, 900)):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds() -> None:  # runs in the child: put the pipe ends on fds 3 and 4
            read_end, write_end = os.dup(to_browser_r), os.dup(from_browser_w)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        flags = [
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--window-size={size[0]},{size[1]}", f"--user-data-dir={profile}", "--remote-debugging-pipe",
            "about:blank",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            [*prefix, binary, *flags],
            preexec_fn=child_fds,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._id = 0
        self.events: list[dict] = []
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=self.session)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)

    def _pump(self, deadline: float) -> None:
        ready, _, _ = select.select([self._from_browser], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError("Chromium did not answer in time")
        chunk = os.read(self._from_browser, 1 << 20)
        if not chunk:
            raise RuntimeError("Chromium closed the DevTools pipe (did it start?)")
        self._buffer += chunk
        *messages, self._buffer = self._buffer.split(b"\0")
        self.events += [json.loads(m) for m in messages]

    def send(self, method: str, params: dict | None = None, *, session: str | None = None, timeout: float = 60):
        """Send one command and return its result; events that arrive meanwhile are kept in ``events``."""
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("id") == self._id:
                    self.events.pop(i)
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m.get("result", {})
            self._pump(deadline)

    def wait_for(self, event: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self.events):
                if m.get("method") == event:
                    return self.events.pop(i)
            self._pump(deadline)

    def evaluate(self, expression: str, *, await_promise: bool = False):
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": await_promise, "returnByValue": True},
            session=self.session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def open(self, page: Path, *, screenshot: Path | None = None) -> dict:
        """Load a page, wait for MathJax, and report what went wrong on it.

        Returns:
            ``{"errors": [...], "failed_requests": [...], "broken_images": [...], "untypeset_math": int,
            "typeset_math": int, "widgets": int, "unrendered_widgets": int}``: ``widgets`` counts the
            stored widget views on the page, ``unrendered_widgets`` those the widget manager did not draw.
        """
        url = page.resolve().as_uri()
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=self.session)
        # A load event of the previous page (e.g. a meta-refresh redirect) may still be in flight:
        # wait until this very document has finished loading, then until MathJax has typeset it.
        deadline = time.monotonic() + 60
        while self.evaluate(f"location.href === {json.dumps(url)} && document.readyState === 'complete'") is not True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{page.name} did not finish loading")
            time.sleep(0.05)
        self.events = [m for m in self.events if m.get("method") != "Page.loadEventFired"]
        self.evaluate(
            """new Promise(resolve => {
              const start = Date.now();
              (function poll() {
                if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
                  MathJax.startup.promise.then(() => resolve(1));
                } else if (!document.querySelector('.math') || Date.now() - start > 30000) {
                  resolve(0);
                } else {
                  setTimeout(poll, 100);
                }
              })();
            })""",
            await_promise=True,
        )
        # the widget manager renders stored widgets asynchronously after the load event
        self.evaluate(
            """new Promise(resolve => {
              const start = Date.now();
              (function poll() {
                const views = [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')];
                const drawn = views.filter(s => s.previousElementSibling
                                               && s.previousElementSibling.classList.contains('widget-subarea'));
                if (drawn.length === views.length || Date.now() - start > 15000) resolve(drawn.length);
                else setTimeout(poll, 100);
              })();
            })""",
            await_promise=True,
        )
        checks = self.evaluate(
            """const VIEWS = 'script[type="application/vnd.jupyter.widget-view+json"]';
            (() => ({
              broken_images: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
              untypeset_math: [...document.querySelectorAll('.math')]
                  .filter(e => !e.querySelector('mjx-container')).length,
              typeset_math: document.querySelectorAll('mjx-container').length,
              widgets: document.querySelectorAll(VIEWS).length,
              // the HTML manager renders each stored view into a .widget-subarea just before its script
              unrendered_widgets: [...document.querySelectorAll(VIEWS)].filter(s => {
                  const w = s.previousElementSibling;
                  return !(w && w.classList.contains('widget-subarea') && w.getBoundingClientRect().height > 0
                           && (w.textContent.trim() || w.querySelector('img, svg, canvas, input')));
              }).length,
            }))()"""
        )
        if screenshot is not None:
            import base64

            screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = self.send("Page.captureScreenshot", {"format": "png"}, session=self.session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        errors, failed = [], []
        for m in self.events:
            method, params = m.get("method"), m.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                errors.append(details.get("exception", {}).get("description") or details.get("text"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                errors.append(f"{params['entry']['text']} ({params['entry'].get('url', '')})")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                failed.append(f"{params.get('type')}: {params.get('errorText')}")
        return {"errors": errors, "failed_requests": failed, **checks}
