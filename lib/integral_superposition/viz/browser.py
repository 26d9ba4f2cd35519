"""Open generated pages in headless Chromium and report what happened.

A small DevTools-protocol client (over ``websockets``) that loads a page and records every
network request, JavaScript dialog (``alert``), console message and uncaught exception, and
can evaluate expressions, dump the DOM and take screenshots. The tests use it to prove that
dashboards render hostile tokens as text, run no injected script and fetch nothing; the
benchmark uses it to time the index page.

Chromium is found as ``$CHROMIUM``, ``chromium``, ``chromium-browser``, ``google-chrome``.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["HeadlessChromium", "PageVisit", "find_chromium"]

_CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome binary, or None."""
    env = os.environ.get("CHROMIUM")
    if env and shutil.which(env):
        return shutil.which(env)
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageVisit:
    """What loading one page did."""

    url: str
    requests: list[str] = field(default_factory=list)
    """URLs of every request the page made (the page itself included)."""
    dialogs: list[str] = field(default_factory=list)
    """Messages of JavaScript dialogs (alert/confirm/prompt) the page opened."""
    console: list[tuple[str, str]] = field(default_factory=list)
    """``(level, text)`` of console and log messages (CSP violations appear here)."""
    exceptions: list[str] = field(default_factory=list)
    load_s: float = float("nan")
    """Seconds from navigation to the load event (wall clock, measured by the client)."""

    @property
    def foreign_requests(self) -> list[str]:
        """Requests other than the page itself and ``data:`` URLs."""
        return [u for u in self.requests if u != self.url and not u.startswith("data:")]


class HeadlessChromium:
    """``with HeadlessChromium() as b: visit = b.open(path)``; then ``b.evaluate(js)``,
    ``b.dom()``, ``b.screenshot()`` on the page last opened."""

    def __init__(
        self,
        binary: str | None = None,
        timeout: float = 30.0,
        window: tuple[int, int] = (1280, 900),
    ):
        self.binary = binary or find_chromium()
        if self.binary is None:
            raise FileNotFoundError(
                "no chromium binary found (install Debian's 'chromium' or set $CHROMIUM)"
            )
        self.timeout = timeout
        self.window = window
        self._ids = itertools.count(1)
        self._proc: subprocess.Popen | None = None
        self._ws = None
        self._session: str | None = None
        self._events: list[dict[str, Any]] = []
        self._visit: PageVisit | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def __enter__(self) -> HeadlessChromium:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> None:
        from websockets.sync.client import connect

        self._profile = tempfile.mkdtemp(prefix="isup-chromium-")
        args = [
            self.binary,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--no-first-run",
            "--no-default-browser-check",
            "--metrics-recording-only",
            "--mute-audio",
            f"--window-size={self.window[0]},{self.window[1]}",
            f"--user-data-dir={self._profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self._profile) / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if self._proc.poll() is not None:
                raise RuntimeError(
                    f"chromium exited with code {self._proc.returncode} before it listened"
                )
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        self._ws = connect(
            f"ws://127.0.0.1:{port.strip()}{path.strip()}", max_size=None, open_timeout=self.timeout
        )
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Network", "Runtime", "Log"):
            self._call(f"{domain}.enable", session=True)

    def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                self._call("Browser.close")
            with contextlib.suppress(Exception):
                self._ws.close()
            self._ws = None
        if self._proc is not None:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait(timeout=5)
            self._proc = None
        if getattr(self, "_profile", None):
            shutil.rmtree(self._profile, ignore_errors=True)

    # -- protocol ------------------------------------------------------------------------------
    def _call(
        self, method: str, params: dict | None = None, session: bool = False
    ) -> dict[str, Any]:
        msg_id = next(self._ids)
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = self._session
        self._ws.send(json.dumps(msg))
        deadline = time.monotonic() + self.timeout
        while True:
            data = json.loads(self._ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if data.get("id") == msg_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})
            self._event(data)

    def _event(self, data: dict[str, Any]) -> None:
        method = data.get("method")
        if method is None:
            return
        self._events.append(data)
        v = self._visit
        p = data.get("params", {})
        if v is None:
            return
        if method == "Network.requestWillBeSent":
            v.requests.append(p["request"]["url"])
        elif method == "Page.javascriptDialogOpening":
            v.dialogs.append(p.get("message", ""))
            # answer the dialog later (we are inside _call's receive loop)
            self._pending_dialog = True
        elif method == "Runtime.consoleAPICalled":
            text = " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
            )
            v.console.append((p.get("type", ""), text))
        elif method == "Log.entryAdded":
            e = p.get("entry", {})
            v.console.append((e.get("level", ""), e.get("text", "")))
        elif method == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            v.exceptions.append(d.get("exception", {}).get("description") or d.get("text", ""))

    def _wait_event(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if any(e.get("method") == name for e in self._events):
                return
            self._dismiss_dialog()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} within {timeout:.0f}s")
            try:
                data = json.loads(self._ws.recv(timeout=min(left, 0.2)))
            except TimeoutError:
                continue
            self._event(data)

    def _dismiss_dialog(self) -> None:
        if getattr(self, "_pending_dialog", False):
            self._pending_dialog = False
            with contextlib.suppress(RuntimeError):
                self._call("Page.handleJavaScriptDialog", {"accept": True}, session=True)

    # -- pages ---------------------------------------------------------------------------------
    def open(self, target: str | os.PathLike, settle_s: float = 0.3) -> PageVisit:
        """Load a file path or URL, wait for its load event and ``settle_s`` more; return the visit."""
        url = str(target)
        if "://" not in url:
            url = Path(url).resolve().as_uri()
        self._events = []
        self._visit = PageVisit(url)
        t0 = time.perf_counter()
        self._call("Page.navigate", {"url": url}, session=True)
        self._wait_event("Page.loadEventFired", self.timeout)
        self._visit.load_s = time.perf_counter() - t0
        end = time.monotonic() + settle_s
        while time.monotonic() < end:
            self._dismiss_dialog()
            try:
                self._event(json.loads(self._ws.recv(timeout=max(0.01, end - time.monotonic()))))
            except TimeoutError:
                break
        self._dismiss_dialog()
        return self._visit

    def evaluate(self, expression: str) -> Any:
        """Evaluate a JavaScript expression in the page; returns its JSON value."""
        r = self._call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True
        )
        if "exceptionDetails" in r:
            raise RuntimeError(f"evaluate({expression!r}): {r['exceptionDetails'].get('text')}")
        return r.get("result", {}).get("value")

    def dom(self) -> str:
        """The current DOM as HTML."""
        return self.evaluate("document.documentElement.outerHTML")

    def screenshot(self, full_page: bool = True) -> bytes:
        """PNG bytes of the page."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        return base64.b64decode(self._call("Page.captureScreenshot", params, session=True)["data"])
