"""`dpokit label`'s server through Starlette's TestClient: security (token, Host, CSP, body cap, fixed
paths), validation, the append-only labels file, resume, undo, overlap, and concurrent writers."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")  # Starlette's TestClient

from starlette.testclient import TestClient  # noqa: E402

from dpokit.apps.label import MAX_BODY, build_app, is_loopback, page_url  # noqa: E402
from dpokit.data.labels import LabelsWriter, append_labels, read_labels  # noqa: E402

BASE = "http://127.0.0.1"  # a loopback Host: without a token, other Host headers are refused


def write_candidates(path: Path, n: int = 5, responses: int = 2) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            row = {"id": f"c{i}", "prompt": f"prompt {i}", "responses": [f"r{i}-{j}" for j in range(responses)]}
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    return write_candidates(tmp_path / "cands.jsonl"), tmp_path / "labels.jsonl"


def client(cands: Path, out: Path, **kw) -> TestClient:
    return TestClient(build_app(cands, out, **kw), base_url=BASE)


def label(c: TestClient, who: str, choice: str = "A", **extra) -> dict:
    """Label the item the server serves `who` now; returns the next state."""
    item = c.get("/api/state", params={"annotator": who}).json()["item"]
    body = {"annotator": who, "item": item["id"], "shown": item["shown"], "choice": choice, **extra}
    r = c.post("/api/label", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_token_required_on_every_request(files):
    cands, out = files
    c = client(cands, out, token="s3cret")
    for path in ("/", "/label.js", "/label.css", "/api/config", "/api/state?annotator=ann"):
        assert c.get(path).status_code == 403, path
        assert c.get(path, headers={"X-Dpokit-Token": "wrong"}).status_code == 403, path
    assert c.post("/api/label", json={}).status_code == 403
    assert c.get("/", params={"token": "s3cret"}).status_code == 200
    assert c.get("/api/config", headers={"X-Dpokit-Token": "s3cret"}).status_code == 200
    page = c.get("/", params={"token": "s3cret"}).text
    assert 'src="/label.js?token=s3cret"' in page  # the page's own files carry the token too
    # with a token, any Host is fine (the server may listen on a LAN address)
    other = TestClient(build_app(cands, out, token="s3cret"), base_url="http://10.0.0.5:8000")
    assert other.get("/api/config", headers={"X-Dpokit-Token": "s3cret"}).status_code == 200


def test_loopback_without_token_refuses_other_hosts(files):
    cands, out = files
    assert client(cands, out).get("/api/config").status_code == 200
    for base in ("http://localhost:8000", "http://[::1]:8000"):
        assert TestClient(build_app(cands, out), base_url=base).get("/api/config").status_code == 200
    rebound = TestClient(build_app(cands, out), base_url="http://evil.example:8000")
    assert rebound.get("/api/config").status_code == 403  # DNS rebinding: a foreign name for 127.0.0.1


def test_security_headers_and_fixed_paths(files):
    cands, out = files
    c = client(cands, out)
    r = c.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in r.text and "style=" not in r.text  # no inline script or style
    assert c.get("/label.js").headers["content-type"].startswith("text/javascript")
    assert c.get("/api/state?annotator=ann").headers["content-security-policy"] == csp
    for path in ("/index.html", "/../pyproject.toml", "/label.js/../../x", "/assets/label/label.js", "/favicon.ico"):
        assert c.get(path).status_code == 404, path
    assert c.post("/api/state").status_code == 405


def test_bad_requests(files):
    cands, out = files
    c = client(cands, out)
    item = c.get("/api/state", params={"annotator": "ann"}).json()["item"]
    good = {"annotator": "ann", "item": item["id"], "shown": item["shown"], "choice": "A"}
    big = {**good, "reason": "x" * (MAX_BODY + 10)}
    assert c.post("/api/label", json=big).status_code == 413
    assert c.post("/api/label", content=b"{}", headers={"content-type": "text/plain"}).status_code == 415
    assert c.post("/api/label", content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    for bad in ({"choice": "C"}, {"choice": "up"}, {"item": "nope"}, {"shown": item["shown"][::-1]},
                {"shown": [0, 0]}, {"confidence": 4}, {"confidence": True}, {"reason": "x" * 501},
                {"annotator": "<b>x</b>"}, {"annotator": ""}):  # fmt: skip
        r = c.post("/api/label", json={**good, **bad})
        assert r.status_code == 400, (bad, r.text)
        assert "error" in r.json()
    assert c.post("/api/label", json=[1, 2]).status_code == 400
    assert c.get("/api/state", params={"annotator": "a b"}).status_code == 400
    assert c.post("/api/undo", json={"annotator": "ann"}).status_code == 409  # nothing to undo
    assert not out.exists() or out.read_text() == ""  # nothing refused was written
    assert c.post("/api/label", json=good).status_code == 200
    assert c.post("/api/label", json=good).status_code == 409  # the same item twice


def test_append_resume_undo(files):
    cands, out = files
    c = client(cands, out)
    s = label(c, "ann", "A", confidence=3, reason="  clearer  ")
    assert s["progress"]["done"] == 1 and s["progress"]["total"] == 5 and s["can_undo"]
    label(c, "ann", "skip")
    first = rows(out)
    assert [r["choice"] for r in first] == ["A", "skip"] and first[0]["reason"] == "clearer"
    assert first[0]["preferred"] == first[0]["shown"][0] and sorted(first[0]["shown"]) == [0, 1]

    c2 = client(cands, out)  # a restarted server: resumes from the file
    s = c2.get("/api/state", params={"annotator": "ann"}).json()
    assert s["item"]["id"] == "c2" and s["progress"]["done"] == 2
    s = c2.post("/api/undo", json={"annotator": "ann"}).json()
    assert s["item"]["id"] == "c1"  # the undone item is served again
    assert rows(out)[-1] == {"type": "undo", "id": first[1]["id"], "annotator": "ann", "time": rows(out)[-1]["time"]}
    label(c2, "ann", "tie")
    assert [lab.choice for lab in read_labels(out)] == ["A", "tie"]
    assert len(rows(out)) == 4  # append-only: label, label, undo, label
    for _ in range(3):
        s = label(c2, "ann", "B")
    assert s["item"] is None and s["progress"]["done"] == 5
    assert s["progress"]["eta_s"] is not None


def test_overlap_and_holds(files):
    cands, out = files
    c = client(cands, out, overlap=2)
    a = c.get("/api/state", params={"annotator": "ann"}).json()["item"]["id"]
    b = c.get("/api/state", params={"annotator": "bob"}).json()["item"]["id"]
    assert a == b == "c0"  # two may have the same item at once with overlap 2 ...
    z = c.get("/api/state", params={"annotator": "zoe"}).json()["item"]["id"]
    assert z == "c1"  # ... not three
    assert c.get("/api/state", params={"annotator": "ann"}).json()["item"]["id"] == "c0"  # a refresh: the same item
    for _ in range(5):
        label(c, "ann", "B")
    done = []
    while (s := c.get("/api/state", params={"annotator": "bob"}).json())["item"] is not None:
        done.append(s["item"]["id"])
        label(c, "bob", "A")
    assert done == ["c0", "c2", "c3", "c4"]  # c1 has ann's label and zoe's hold: two
    s = label(c, "zoe", "tie")
    assert s["item"] is None and s["progress"] == {**s["progress"], "done": 1, "total": 1, "complete": 5}
    labels = read_labels(out)
    assert len(labels) == 10 and len({(lab.annotator, lab.item) for lab in labels}) == 10
    assert {lab.item for lab in labels if lab.annotator == "zoe"} == {"c1"}

    lapsing = client(cands, out.with_name("lapse.jsonl"), overlap=1, hold_s=0.0)
    ids = [lapsing.get("/api/state", params={"annotator": w}).json()["item"]["id"] for w in ("a", "b")]
    assert ids == ["c0", "c0"]  # a hold that lapsed no longer keeps others away
    one = client(cands, tmp := out.with_name("one.jsonl"), overlap=1)
    seen = [one.get("/api/state", params={"annotator": w}).json()["item"]["id"] for w in ("a", "b", "c")]
    assert seen == ["c0", "c1", "c2"]  # overlap 1: people working at once get different items
    assert not tmp.exists() or not tmp.read_text()


def test_fixed_annotator_and_binary_mode(tmp_path):
    cands = write_candidates(tmp_path / "c.jsonl", n=2, responses=3)
    out = tmp_path / "l.jsonl"
    c = client(cands, out, mode="binary", annotator="ann")
    assert c.get("/api/config").json() == {"mode": "binary", "annotator": "ann", "items": 2, "overlap": 1,
                                            "max_reason": 500}  # fmt: skip
    assert c.get("/api/state", params={"annotator": "bob"}).status_code == 400
    item = c.get("/api/state", params={"annotator": "ann"}).json()["item"]
    assert len(item["shown"]) == 1 and len(item["responses"]) == 1
    label(c, "ann", "down")
    r = c.post("/api/label", json={"annotator": "ann", "item": "c1", "shown": item["shown"], "choice": "A"})
    assert r.status_code == 400
    (lab,) = read_labels(out)
    assert lab.mode == "binary" and lab.label is False and lab.choice == "down"


def test_pair_mode_needs_two_responses(tmp_path):
    from dpokit.errors import DataError

    cands = write_candidates(tmp_path / "c.jsonl", n=2, responses=1)
    with pytest.raises(DataError, match="two responses"):
        build_app(cands, tmp_path / "l.jsonl")


def test_concurrent_posts_make_a_valid_file(tmp_path):
    cands = write_candidates(tmp_path / "c.jsonl", n=40)
    out = tmp_path / "l.jsonl"
    c = client(cands, out, overlap=4)
    errors: list[str] = []

    def work(who: str) -> None:
        try:
            for _ in range(10):
                label(c, who, "A", reason="y" * 400)
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(rows(out)) == 40  # every line whole JSON
    labels = read_labels(out)
    assert len({(lab.annotator, lab.item) for lab in labels}) == 40


def test_writer_threads_and_torn_line(tmp_path):
    out = tmp_path / "l.jsonl"
    out.write_bytes(b'{"type": "label", "id": "x", "item": "c0", "annotator": "a", "mode": "pair", "sh')  # torn
    with pytest.warns(UserWarning, match="torn"):
        append_labels(out, [{"type": "undo", "id": "nothing", "annotator": "a", "time": 1.0}])
    assert rows(out) == [{"type": "undo", "id": "nothing", "annotator": "a", "time": 1.0}]
    out.write_bytes(b'{"type": "undo", "id": "q", "annotator": "a", "time": 2.0}')  # whole, only lacks "\n"
    append_labels(out, [{"type": "undo", "id": "r", "annotator": "a", "time": 3.0}])
    assert [r["id"] for r in rows(out)] == ["q", "r"]

    def many(k: int) -> None:
        for i in range(50):
            with LabelsWriter(out) as w:
                w.append([{"type": "undo", "id": f"{k}-{i}", "annotator": "a", "time": 0.0, "pad": "z" * 5000}])

    threads = [threading.Thread(target=many, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rows(out)) == 202


def test_host_helpers():
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("127.0.0.9")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("example.com")
    assert page_url("127.0.0.1", 8000, None) == "http://127.0.0.1:8000/"
    assert page_url("::1", 8000, "a b") == "http://[::1]:8000/?token=a%20b"


def test_cli_missing_web_stack(monkeypatch, capsys, files):
    import sys

    from dpokit import cli

    cands, out = files
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` raises ImportError(name="uvicorn")
    assert cli.main(["label", str(cands), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pip install 'dpokit[label]'" in err


def _append_many(path: str, k: int) -> None:
    for i in range(50):
        append_labels(path, [{"type": "undo", "id": f"p{k}-{i}", "annotator": "a", "time": 0.0, "pad": "z" * 9000}])


def test_two_processes_on_one_file(tmp_path):
    import multiprocessing

    out = tmp_path / "l.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(out), k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert sorted(r["id"] for r in rows(out)) == sorted(f"p{k}-{i}" for k in range(2) for i in range(50))


def test_cli_serves_until_ctrl_c(files):
    """`dpokit label` off loopback: prints the URL with a generated token, refuses requests without it,
    serves with it, and Ctrl-C stops it cleanly (exit 0, a last summary line)."""
    import re
    import signal
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    cands, out = files
    proc = subprocess.Popen([sys.executable, "-m", "dpokit.cli", "label", str(cands), "--out", str(out),
                             "--host", "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        lines = [proc.stdout.readline() for _ in range(3)]
        assert "5 items, 0 pair labels" in lines[0], lines
        url = next(line for line in lines if line.startswith("open ")).split()[1]
        port, token = re.search(r":(\d+)/\?token=([\w-]+)$", url).groups()
        local = f"http://127.0.0.1:{port}"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{local}/api/config", timeout=10)
        assert refused.value.code == 403
        with urllib.request.urlopen(f"{local}/?token={token}", timeout=10) as r:
            assert r.status == 200 and "content-security-policy" in r.headers
    finally:
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert rest.strip().splitlines()[-1].startswith("stopped: 5 items, 0 pair labels")
