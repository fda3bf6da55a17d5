"""`dpokit label`: a local web page on which people label response pairs (or single responses).

The server reads a candidates file and appends every label to a labels file the moment it is given
(`dpokit.data.labels`: one JSON line, flushed and fsynced, under a process-wide lock and a
``flock`` on the file). It keeps nothing that matters in memory: each annotator's next item is
derived from the labels file, so a refresh, a closed tab or a restarted server resumes where it
stopped. Undo appends an undo row for the annotator's last label in force and serves that item again.

Assignment: items go in file order; with ``overlap`` K an item is served to at most K distinct
annotators (a skip counts), never twice to one annotator (unless they undo it). An item served and
not yet labelled is held for its annotator for `HOLD_S` seconds, so that two people working at the
same time get different items. In pair mode every annotator sees the same two responses of an item
(chosen by the item's id), in an order drawn per annotator and item (`LabelStore.shown_for`); the
order is recorded as ``shown``, and a label must carry the order the server served.

Security: loopback by default; on another address a token is required and checked on every request
(``?token=`` on the page load, the ``X-Dpokit-Token`` header from the page's script; constant-time
compare). Without a token the Host header must name the loopback (no DNS rebinding). Every response
carries a Content-Security-Policy without inline script; the page renders model text with
``textContent`` only. Bodies are capped at `MAX_BODY` bytes (413), JSON is validated (400), the
static paths are fixed (anything else is 404).

Starlette and uvicorn (the ``label`` extra) are imported when the app is built, not with this module.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import random
import re
import secrets
import socket
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from dpokit.data.labels import (
    BINARY_CHOICES,
    PAIR_CHOICES,
    Candidate,
    Label,
    LabelsWriter,
    Mode,
    make_label,
    read_candidates,
    read_labels,
)
from dpokit.errors import DataError, DpokitError

MAX_BODY = 16 * 1024  # bytes of a POST body; more is 413
MAX_REASON = 500  # characters of the reason field
HOLD_S = 900.0  # seconds a served, unlabelled item stays held for its annotator
BREAK_S = 300.0  # a gap between two labels longer than this is a break, not the annotator's pace
TOKEN_HEADER = "x-dpokit-token"
NAME_RE = re.compile(r"^[\w.@-]{1,40}$")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")  # fmt: skip
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",  # the page's URL may hold the token
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}
PAGE_FILES = {  # path -> (file in dpokit/assets/label, media type): the only files the server sends
    "/": ("index.html", "text/html; charset=utf-8"),
    "/label.js": ("label.js", "text/javascript; charset=utf-8"),
    "/label.css": ("label.css", "text/css; charset=utf-8"),
}


class RequestError(Exception):
    """A request the server refuses: HTTP `status` with a one-line `message` for the page."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _rng(*parts: str) -> random.Random:
    """A generator seeded by `parts` alone: the same draw after a restart, on any machine."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


class LabelStore:
    """The labelling state of one candidates file and one labels file: what each annotator sees next,
    and the checked appends of labels and undos. Thread-safe; the labels file is the only truth."""

    def __init__(self, candidates: Sequence[Candidate], out: str | Path, *, mode: Mode = "pair",
                 overlap: int = 1, annotator: str | None = None, hold_s: float = HOLD_S,
                 source: str = "candidates") -> None:  # fmt: skip
        if mode not in ("pair", "binary"):
            raise DpokitError(f"mode must be pair or binary, not {mode!r}")
        if overlap < 1:
            raise DpokitError(f"--overlap must be at least 1, not {overlap}")
        if annotator is not None and not NAME_RE.match(annotator):
            raise DpokitError(f"annotator name {annotator!r}: 1-40 letters, digits, or . _ @ -")
        want = 2 if mode == "pair" else 1
        short = [c.id for c in candidates if len(c.responses) < want]
        if short:
            raise DataError(source, f"pair mode needs two responses per item; {len(short)} have fewer "
                                    f"(e.g. {short[0]!r}); use --mode binary")
        self.items = {c.id: c for c in candidates}
        self.order = [c.id for c in candidates]
        self.out = Path(out)
        self.mode: Mode = mode
        self.overlap = overlap
        self.annotator = annotator
        self.hold_s = hold_s
        self._held: dict[str, tuple[str, float]] = {}  # annotator -> (item served, when)
        self._lock = threading.RLock()
        self._cache: tuple[tuple[int, int, int], list[Label]] | None = None
        self.labels()  # a bad labels file is an error now, not on the first request

    # -- reading -----------------------------------------------------------------------------------
    def labels(self) -> list[Label]:
        """This mode's labels in force (re-read when the file changed, also by another process)."""
        try:
            st = self.out.stat()
        except FileNotFoundError:
            return []
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if self._cache is None or self._cache[0] != key:
                labels = read_labels(self.out) if st.st_size else []
                self._cache = (key, [lab for lab in labels if lab.mode == self.mode and lab.item in self.items])
            return self._cache[1]

    def shown_for(self, item: str, annotator: str) -> tuple[int, ...]:
        """The display order of `item` for `annotator`: response indexes, A (left) first."""
        n = len(self.items[item].responses)
        picked = _rng("pick", self.mode, item).sample(range(n), 2 if self.mode == "pair" else 1)
        if self.mode == "pair" and _rng("order", item, annotator).random() < 0.5:
            picked.reverse()
        return tuple(picked)

    def _takers(self, labels: Sequence[Label], annotator: str, now: float) -> dict[str, set[str]]:
        """item -> the other annotators who labelled it or hold it now."""
        takers: dict[str, set[str]] = {}
        for lab in labels:
            if lab.annotator != annotator:
                takers.setdefault(lab.item, set()).add(lab.annotator)
        for who, (item, since) in self._held.items():
            if who != annotator and now - since < self.hold_s:
                takers.setdefault(item, set()).add(who)
        return takers

    def _open_items(self, labels: Sequence[Label], annotator: str, now: float) -> list[str]:
        """The items `annotator` may still get, in file order (their held item first)."""
        done = {lab.item for lab in labels if lab.annotator == annotator}
        takers = self._takers(labels, annotator, now)
        held = self._held.get(annotator)
        first = [held[0]] if held and held[0] not in done else []
        return first + [i for i in self.order
                        if i not in done and i not in first and len(takers.get(i, ())) < self.overlap]  # fmt: skip

    # -- the API -----------------------------------------------------------------------------------
    def state(self, annotator: str) -> dict[str, Any]:
        """What the page shows `annotator` now: their next item (now held for them) and progress."""
        annotator = self._check_name(annotator)
        with self._lock:
            return self._state(self.labels(), annotator)

    def _state(self, labels: Sequence[Label], annotator: str) -> dict[str, Any]:
        now = time.time()
        open_items = self._open_items(labels, annotator, now)
        if open_items:
            self._held[annotator] = (open_items[0], now)
        else:
            self._held.pop(annotator, None)
        mine = [lab for lab in labels if lab.annotator == annotator]
        item = self._item_view(open_items[0], annotator) if open_items else None
        return {"annotator": annotator, "mode": self.mode, "item": item, "can_undo": bool(mine),
                "progress": self._progress(labels, mine, len(open_items))}  # fmt: skip

    def _item_view(self, item_id: str, annotator: str) -> dict[str, Any]:
        cand = self.items[item_id]
        shown = self.shown_for(item_id, annotator)
        prompt: Any = cand.prompt if isinstance(cand.prompt, str) else [
            {"role": str(m.get("role", "")), "content": m["content"]} for m in cand.prompt]  # fmt: skip
        return {"id": item_id, "prompt": prompt, "responses": [cand.responses[i] for i in shown], "shown": list(shown)}

    def _progress(self, labels: Sequence[Label], mine: Sequence[Label], remaining: int) -> dict[str, Any]:
        per_item: dict[str, set[str]] = {}
        for lab in labels:
            per_item.setdefault(lab.item, set()).add(lab.annotator)
        times = sorted(lab.time for lab in mine)
        gaps = [b - a for a, b in zip(times, times[1:]) if 0 <= b - a <= BREAK_S][-20:]
        pace = statistics.median(gaps) if gaps else None
        return {"done": len(mine), "total": len(mine) + remaining, "items": len(self.order),
                "complete": sum(len(who) >= self.overlap for who in per_item.values()),
                "seconds_per_item": pace, "eta_s": None if pace is None else round(pace * remaining, 1)}  # fmt: skip

    def submit(self, annotator: str, body: Any) -> dict[str, Any]:
        """Check one label from the page, append it, and return the annotator's next state."""
        annotator = self._check_name(annotator)
        item, shown, choice, confidence, reason = self._check_label_body(body)
        if item not in self.items:
            raise RequestError(400, f"unknown item {item!r}")
        if shown != list(self.shown_for(item, annotator)):
            raise RequestError(400, f"shown {shown} is not the order item {item!r} was served in")
        with LabelsWriter(self.out) as writer, self._lock:
            labels = self.labels()
            if any(lab.item == item and lab.annotator == annotator for lab in labels):
                raise RequestError(409, f"{annotator} has labelled item {item!r} already (undo first)")
            if item not in self._open_items(labels, annotator, time.time()):
                raise RequestError(409, f"item {item!r} has its {self.overlap} annotator(s) already")
            taken = {lab.id for lab in labels}
            label_id = f"{annotator}-{secrets.token_hex(4)}"
            while label_id in taken:
                label_id = f"{annotator}-{secrets.token_hex(4)}"
            label = make_label(id=label_id, item=self.items[item], annotator=annotator, mode=self.mode, shown=shown,
                               choice=choice, confidence=confidence, reason=reason, time=time.time())  # fmt: skip
            writer.append([label])
            self._held.pop(annotator, None)
            return self._state(self.labels(), annotator)

    def undo(self, annotator: str) -> dict[str, Any]:
        """Withdraw `annotator`'s last label in force (an undo row) and serve that item again."""
        annotator = self._check_name(annotator)
        with LabelsWriter(self.out) as writer, self._lock:
            mine = [lab for lab in self.labels() if lab.annotator == annotator]
            if not mine:
                raise RequestError(409, f"{annotator} has no label to undo")
            last = mine[-1]
            writer.append([{"type": "undo", "id": last.id, "annotator": annotator, "time": time.time()}])
            self._held[annotator] = (last.item, time.time())
            return self._state(self.labels(), annotator)

    def _check_name(self, annotator: Any) -> str:
        if not isinstance(annotator, str) or not NAME_RE.match(annotator):
            raise RequestError(400, "annotator name: 1-40 letters, digits, or . _ @ -")
        if self.annotator is not None and annotator != self.annotator:
            raise RequestError(400, f"this server labels as {self.annotator!r} only")
        return annotator

    def _check_label_body(self, body: Any) -> tuple[str, list[int], str, int | None, str]:
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        item, shown, choice = body.get("item"), body.get("shown"), body.get("choice")
        confidence, reason = body.get("confidence"), body.get("reason", "")
        if not isinstance(item, str):
            raise RequestError(400, "'item' must be a string")
        if not isinstance(shown, list) or not all(type(i) is int for i in shown):
            raise RequestError(400, "'shown' must be a list of response indexes")
        choices = PAIR_CHOICES if self.mode == "pair" else BINARY_CHOICES
        if choice not in choices:
            raise RequestError(400, f"'choice' must be one of {', '.join(choices)} in {self.mode} mode")
        if confidence is not None and (type(confidence) is not int or confidence not in (1, 2, 3)):
            raise RequestError(400, "'confidence' must be 1, 2, 3 or null")
        if not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise RequestError(400, f"'reason' must be a string of at most {MAX_REASON} characters")
        return item, shown, choice, confidence, reason.strip()

    def summary(self) -> str:
        """One line: items, labels so far, annotators."""
        labels = self.labels()
        who = sorted({lab.annotator for lab in labels})
        names = f" by {', '.join(who[:5])}{' ...' if len(who) > 5 else ''}" if who else ""
        return f"{len(self.order)} items, {len(labels)} {self.mode} labels in {self.out} so far{names}"


# -- the web app -------------------------------------------------------------------------------------
def _asset_text(name: str) -> str:
    return (importlib_resources.files("dpokit") / "assets" / "label" / name).read_text(encoding="utf-8")


class SecurityGuard:
    """ASGI middleware around the app: the token (when set) or a loopback Host (when not) on every
    request, refused with 403; the security headers on every response. ``.state`` is the app's."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app = app
        self.state = app.state
        self._expected = token.encode() if token is not None else None
        self._headers = [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    def refusal(self, scope: dict[str, Any]) -> str | None:
        """Why the request is refused, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self._expected is None:
            host = headers.get("host", "")
            name = host if host.endswith("]") else host.rsplit(":", 1)[0]
            return None if name in LOOPBACK_NAMES else "the Host must be the loopback (or start the server with --token)"
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        given = headers.get(TOKEN_HEADER) or query.get("token", [""])[0]
        return None if hmac.compare_digest(given.encode(), self._expected) else "missing or wrong token"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        from starlette.responses import PlainTextResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        why = self.refusal(scope)
        if why is not None:
            await PlainTextResponse(why, 403, headers=SECURITY_HEADERS)(scope, receive, send)
            return

        async def send_secured(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self._headers]
            await send(message)

        await self.app(scope, receive, send_secured)


async def _json_body(request: Any) -> Any:
    """The request's JSON body, refusing a wrong media type (415), too many bytes (413), bad JSON (400)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise RequestError(415, "the body must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
        raise RequestError(413, f"the body is over {MAX_BODY} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise RequestError(413, f"the body is over {MAX_BODY} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(400, "the body is not valid JSON") from None


def build_app(
    candidates: str | Path | Sequence[Candidate], out: str | Path, *, mode: Mode = "pair", overlap: int = 1,
    annotator: str | None = None, token: str | None = None, hold_s: float = HOLD_S,
) -> SecurityGuard:  # fmt: skip
    """The labelling app: a Starlette app inside its `SecurityGuard` (``.state.store`` is its `LabelStore`).

    `token`: when given, every request must carry it (``?token=`` or the ``X-Dpokit-Token`` header).
    """
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    cands = read_candidates(candidates) if isinstance(candidates, (str, Path)) else list(candidates)
    source = str(candidates) if isinstance(candidates, (str, Path)) else "candidates"
    store = LabelStore(cands, out, mode=mode, overlap=overlap, annotator=annotator, hold_s=hold_s, source=source)
    query = "" if token is None else "?token=" + quote(token, safe="")
    pages = {path: (_asset_text(name).replace("__QUERY__", query), media) for path, (name, media) in PAGE_FILES.items()}

    def page(request: Request) -> Response:
        text, media = pages[request.url.path]
        return Response(text, media_type=media)

    def api(work: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            try:
                return JSONResponse(await work(request))
            except RequestError as exc:
                return JSONResponse({"error": exc.message}, exc.status)
            except DpokitError as exc:  # the labels file went bad under us: say so, keep serving
                return JSONResponse({"error": str(exc)}, 500)

        return endpoint

    async def config(request: Request) -> Any:
        return {"mode": store.mode, "annotator": store.annotator, "items": len(store.order), "overlap": store.overlap,
                "max_reason": MAX_REASON}  # fmt: skip

    async def state(request: Request) -> Any:
        return await run_in_threadpool(store.state, request.query_params.get("annotator", ""))

    async def label(request: Request) -> Any:
        body = await _json_body(request)
        who = body.get("annotator", "") if isinstance(body, dict) else ""
        return await run_in_threadpool(store.submit, who, body)

    async def undo(request: Request) -> Any:
        body = await _json_body(request)
        return await run_in_threadpool(store.undo, body.get("annotator", "") if isinstance(body, dict) else "")

    routes = [Route(path, page, methods=["GET"]) for path in PAGE_FILES]
    routes += [Route("/api/config", api(config), methods=["GET"]), Route("/api/state", api(state), methods=["GET"]),
               Route("/api/label", api(label), methods=["POST"]), Route("/api/undo", api(undo), methods=["POST"])]  # fmt: skip
    app = Starlette(routes=routes)
    app.state.store = store
    return SecurityGuard(app, token)


# -- the command ---------------------------------------------------------------------------------------
def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `dpokit label`."""
    parser.add_argument("candidates", metavar="CANDIDATES", help="candidates JSONL (`dpokit sample` writes one)")
    parser.add_argument("--out", required=True, metavar="LABELS.jsonl", help="labels file: appended to, never rewritten")
    parser.add_argument("--annotator", default=None, metavar="NAME", help="label as NAME (default: the page asks)")
    parser.add_argument("--mode", choices=["pair", "binary"], default="pair",
                        help="pair: which of two responses is better (default); binary: thumbs up/down on one")  # fmt: skip
    parser.add_argument("--overlap", type=int, default=1, metavar="K",
                        help="serve each item to at most K distinct annotators (default 1)")  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need a token)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    parser.add_argument("--token", default=None, help="require this token on every request (generated off loopback)")


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise DpokitError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def page_url(host: str, port: int, token: str | None) -> str:
    """The URL to open: the bound address (this machine's name for a wildcard one), with the token."""
    shown = socket.gethostname() if host.strip("[]") in ("0.0.0.0", "::", "") else host.strip("[]")
    shown = f"[{shown}]" if ":" in shown else shown
    return f"http://{shown}:{port}/" + ("" if token is None else "?token=" + quote(token, safe=""))


def label_command(args: argparse.Namespace) -> int:
    """`dpokit label CANDIDATES --out LABELS.jsonl ...`: serve the page until Ctrl-C."""
    import uvicorn

    token = args.token
    if token is not None and not token:
        raise DpokitError("--token must not be empty")
    if token is None and not is_loopback(args.host):
        token = secrets.token_urlsafe(18)
    app = build_app(args.candidates, args.out, mode=args.mode, overlap=args.overlap, annotator=args.annotator,
                    token=token)  # fmt: skip
    store: LabelStore = app.state.store
    sock = _bind(args.host, args.port)
    port = sock.getsockname()[1]
    print(f"dpokit label: {store.summary()} ({store.mode} mode, overlap {store.overlap})", flush=True)
    if not is_loopback(args.host):
        print(f"listening on {args.host}: anyone who can reach it and has the token can label", flush=True)
    print(f"open {page_url(args.host, port, token)}   (Ctrl-C stops; nothing is lost)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C
        pass
    finally:
        sock.close()
    print(f"stopped: {store.summary()}", flush=True)
    return 0
