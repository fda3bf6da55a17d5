"""`dpokit label` in a real browser: Playwright driving Debian's chromium-headless-shell.

Two people label one file at the same time (overlap 2) by keyboard; one reloads midway, types a reason
(which must not trigger shortcuts), skips and undoes; two responses try script injection. Then the
labels file is checked row by row. Without the browser the test skips, except under CI=true, where a
missing browser fails: `make setup` installs it (apt, as root).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

TOKEN = "t0k-en"
SCRIPT = "<script>window.__pwned=1</script>"
IMG = '<img src=x onerror="window.__pwned=1">'
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium-headless-shell", "/usr/bin/chromium-headless-shell")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must run; `make setup` installs the browser as root)")
    pytest.skip(reason)


def chromium_path() -> str | None:
    """DPOKIT_CHROMIUM, else Debian's chromium-headless-shell."""
    found = [os.environ.get("DPOKIT_CHROMIUM", ""), *CHROMIUM_PATHS, shutil.which("chromium-headless-shell") or ""]
    return next((p for p in found if p and os.access(p, os.X_OK)), None)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        import uvicorn  # noqa: F401
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"needs the test extra's {exc.name} (pip install -e '.[test]')")
    exe = chromium_path()
    if exe is None:
        _unavailable("no chromium-headless-shell (apt-get install chromium-headless-shell, or set DPOKIT_CHROMIUM)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe)
        try:
            yield b
        finally:
            b.close()


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run `app` under uvicorn in a thread on a free loopback port; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def write_candidates(path: Path) -> Path:
    rows = [
        {"id": "c0", "prompt": "Review a film about trains.", "responses": ["Lovely trains.", "Dull trains."]},
        {"id": "c1", "prompt": "Say hi <b>bold</b>", "responses": [SCRIPT, "hello"]},
        {"id": "c2", "prompt": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "A poem?"}],
         "responses": ["Roses.", "Violets."]},
        {"id": "c3", "prompt": "Show an image", "responses": ["no image", IMG]},
        {"id": "c4", "prompt": "Last one", "responses": ["yes", "no"]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def at_item(page: Any, item: str) -> None:
    from playwright.sync_api import expect

    expect(page.locator("#task")).to_be_visible()
    expect(page.locator("#task")).to_have_attribute("data-item", item)


def press(page: Any, key: str, then: str | None) -> None:
    """Press `key` on the page, then wait for item `then` (None: the all-done screen)."""
    from playwright.sync_api import expect

    page.keyboard.press(key)
    if then is None:
        expect(page.locator("#done")).to_be_visible()
    else:
        at_item(page, then)


def open_page(context: Any, url: str, name: str, errors: list[str]) -> Any:
    page = context.new_page()
    page.on("console", lambda m: errors.append(f"{name}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"{name}: {e}"))
    page.goto(url)
    page.locator("#name-input").fill(name)
    page.locator("#name-input").press("Enter")
    return page


def test_two_annotators_label_by_keyboard(tmp_path: Path, browser: Any) -> None:
    from playwright.sync_api import expect

    from dpokit.apps.label import build_app
    from dpokit.data.labels import read_labels

    start = time.monotonic()
    cands, out = write_candidates(tmp_path / "cands.jsonl"), tmp_path / "labels.jsonl"
    app = build_app(cands, out, overlap=2, token=TOKEN)
    store = app.state.store
    errors: list[str] = []
    with serving(app) as base:
        url = f"{base}/?token={TOKEN}"
        ann = open_page(browser.new_context(), url, "ann", errors)
        at_item(ann, "c0")
        expect(ann.locator("#prompt")).to_contain_text("Review a film about trains.")
        ann.keyboard.press("2")  # confidence
        ann.locator("#reason").click()
        ann.keyboard.type("a bad tone, sure")  # a, b, t, s, u typed into the field: no shortcut fires
        at_item(ann, "c0")
        assert not out.exists() or out.read_text() == ""
        ann.keyboard.press("Escape")  # leaves the field
        press(ann, "a", "c1")

        bob = open_page(browser.new_context(), url, "bob", errors)  # another person, at the same time
        at_item(bob, "c0")  # overlap 2: bob gets c0 as well
        press(bob, "b", "c1")

        for page in (ann, bob):  # the injections show as text and run nothing
            expect(page.locator("#responses")).to_contain_text(SCRIPT)
            expect(page.locator("#prompt")).to_contain_text("Say hi <b>bold</b>")
        press(ann, "B", "c2")
        expect(ann.locator("#progress")).to_contain_text("2 / 5")
        expect(ann.locator("#eta")).to_contain_text("left")

        ann.reload()  # a refresh resumes where it stopped; the name is remembered
        at_item(ann, "c2")
        expect(ann.locator("#prompt")).to_contain_text("be kind")
        press(ann, "s", "c3")  # skip ...
        press(ann, "u", "c2")  # ... and undo: c2 again
        press(ann, "t", "c3")
        expect(ann.locator("#responses")).to_contain_text(IMG)
        assert ann.locator("#responses img").count() == 0 and ann.locator("#prompt b").count() == 0
        press(ann, "a", "c4")

        bob.locator("button[data-choice=tie]").click()  # the buttons work too
        at_item(bob, "c2")
        press(bob, "a", "c3")
        press(bob, "3", "c3")
        press(bob, "b", "c4")
        press(ann, "b", None)
        press(bob, "s", None)
        expect(ann.locator("#progress")).to_contain_text("5 / 5")
        for page in (ann, bob):
            assert page.evaluate("typeof window.__pwned") == "undefined"
        assert not errors, errors  # no script error, no Content-Security-Policy violation

        # a request without the token is refused, the page load included
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/api/config", timeout=5)
        assert refused.value.code == 403
        assert ann.goto(f"{base}/").status == 403

    check_labels_file(out, store, read_labels(out))
    assert time.monotonic() - start < 60


def check_labels_file(out: Path, store: Any, labels: list[Any]) -> None:
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 12  # ann: 6 labels + 1 undo; bob: 5 labels
    undo = [r for r in rows if r["type"] == "undo"]
    assert len(undo) == 1 and undo[0]["annotator"] == "ann"
    skipped = next(r for r in rows if r["id"] == undo[0]["id"])
    assert skipped["item"] == "c2" and skipped["choice"] == "skip"
    got = {(lab.annotator, lab.item): lab for lab in labels}
    assert len(labels) == 10
    assert {k: lab.choice for k, lab in got.items() if k[0] == "ann"} == {
        ("ann", "c0"): "A", ("ann", "c1"): "B", ("ann", "c2"): "tie", ("ann", "c3"): "A", ("ann", "c4"): "B"}
    assert {k: lab.choice for k, lab in got.items() if k[0] == "bob"} == {
        ("bob", "c0"): "B", ("bob", "c1"): "tie", ("bob", "c2"): "A", ("bob", "c3"): "B", ("bob", "c4"): "skip"}
    first = got[("ann", "c0")]
    assert first.confidence == 2 and first.reason == "a bad tone, sure"
    assert got[("bob", "c3")].confidence == 3
    for (who, item), lab in got.items():
        assert lab.shown == store.shown_for(item, who) and sorted(lab.shown) == [0, 1]
        assert lab.preferred == {"A": lab.shown[0], "B": lab.shown[1]}.get(lab.choice)
