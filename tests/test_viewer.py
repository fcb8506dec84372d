"""The offline viewer, checked in a real headless Chromium (skipped only where no Chromium is installed).

Install on Debian: apt-get update && apt-get install -y chromium
"""

import html
import json
import os
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import pytest
from graph_fixtures import COMPLIANCE, REFUSAL, synthetic_graph

from crafttrace.export import export_graph, frontend_graph
from crafttrace.graph_io import save_graph
from crafttrace.viewer import serve, serving, view_data, write_view

TOKENS = ["<bos>", "How", "do", "I", "?"]
EVIL_PROMPT = 'How do I </script><b id="pwn">x</b> & "quote"?'
SVG_NS = "http://www.w3.org/2000/svg"


def chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


needs_chromium = pytest.mark.skipif(
    chromium() is None, reason="headless Chromium not found (apt-get install -y chromium, or set CHROMIUM=)")


def run_chromium(tmp_path, url, *args, timeout=120) -> str:
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
           # every host name resolves to nothing: a request that tried to leave the machine would fail
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--window-size=1400,900", *args, url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def stats(dom: str) -> dict[str, str]:
    m = re.search(r'<span id="render-stats"([^>]*)>', dom)
    assert m, "render-stats element missing from the rendered DOM"
    return dict(re.findall(r'data-([\w-]+)="([^"]*)"', m.group(1)))


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("view")
    g = synthetic_graph()
    g.input_string = EVIL_PROMPT
    model = frontend_graph(g, "syn", prompt_tokens=TOKENS, pinned=[(2, 9)])
    path = write_view(g, tmp / "view.html", highlight=[(2, 9)], refusal=[REFUSAL], compliance=[COMPLIANCE],
                      prompt_tokens=TOKENS)
    return tmp, path, model


def test_html_is_self_contained(view):
    _, path, model = view
    text = path.read_text()
    urls = set(re.findall(r"(?:https?|wss?|ftp)://[^\s\"'<>)`]+", text))
    assert urls <= {SVG_NS}, f"the page names external URLs: {urls - {SVG_NS}}"
    assert not re.search(r"<(?:link|img|iframe)\b|\bsrc=|@import|fetch\(|XMLHttpRequest", text)
    assert "default-src 'none'" in text
    # the prompt's "</script>" cannot close the inline data element
    assert "</script><b" not in text
    data = json.loads(re.search(r'id="graph-data">(.*?)</script>', text, re.S).group(1))
    assert (len(data["nodes"]), len(data["links"])) == (len(model.nodes), len(model.links))


@needs_chromium
@pytest.mark.browser
def test_renders_pruned_graph_in_chromium(view):
    tmp, path, model = view
    dom = run_chromium(tmp, path.as_uri(), "--dump-dom")
    s = stats(dom)
    assert s["status"] == "ok"
    assert int(s["nodes"]) == len(model.nodes) and int(s["links"]) == len(model.links)
    assert int(s["visible-links"]) == len(model.links)  # small graph: nothing filtered
    assert int(s["highlighted"]) == len(model.qParams.pinnedIds) >= 1
    assert (s["refusal"], s["compliance"]) == ("1", "1")
    assert len(re.findall(r'<g class="node feature[^"]*highlight', dom)) == int(s["highlighted"])
    # prompt shown as text, not parsed as markup
    assert '<b id="pwn">' not in dom and html.escape(EVIL_PROMPT, quote=False) in dom
    # the first highlighted feature is described in the side panel
    pinned = model.qParams.pinnedIds[0]
    assert f"<td>{pinned}</td>" in dom and "highlighted feature" in dom

    shot = tmp / "view.png"
    run_chromium(tmp, path.as_uri(), f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@needs_chromium
@pytest.mark.browser
def test_served_on_localhost_only_page_is_requested(view):
    tmp, path, model = view
    node = next(n for n in model.nodes if n.feature_type == "logit" and n.is_target_logit)
    with serving(path) as (url, requested):
        assert url.startswith("http://127.0.0.1:")
        dom = run_chromium(tmp, f"{url}#node={node.node_id}", "--dump-dom")
    assert int(stats(dom)["links"]) == len(model.links)
    # the URL fragment selected the refusal logit: its details and incoming edges are listed
    assert f"<td>{node.node_id}</td>" in dom and "<td>refusal</td>" in dom
    n_in = sum(1 for l in model.links if l["target"] == node.node_id)
    assert len(re.findall(r"<div style=\"color: [^\"]+;\">← ", dom)) == min(n_in, 40)
    assert set(requested) <= {"/view.html", "/favicon.ico"} and "/view.html" in requested


def test_write_view_from_exported_json_and_saved_graph(tmp_path):
    g = synthetic_graph(seed=5)
    out = export_graph(save_graph(g, tmp_path / "graph_a"), tmp_path / "export", slug="a")
    v1 = write_view(out["frontend"], tmp_path / "a.html", highlight=["1_8_2"])
    v2 = write_view(tmp_path / "graph_a", tmp_path / "b.html", node_threshold=None, edge_threshold=None)
    d1 = json.loads(re.search(r'id="graph-data">(.*?)</script>', v1.read_text(), re.S).group(1))
    d2 = json.loads(re.search(r'id="graph-data">(.*?)</script>', v2.read_text(), re.S).group(1))
    exported = json.loads(out["frontend"].read_text())
    assert len(d1["links"]) == len(exported["links"])
    assert len(d2["links"]) == int((g.adjacency_matrix != 0).sum())  # full graph
    assert [n["role"] for n in d1["nodes"] if n["kind"] == "logit"] == [None, None]  # "I"/"Sure" not default labels


def test_crafttrace_targets_get_roles():
    g = synthetic_graph(crafttrace_targets=True)
    data = view_data(frontend_graph(g, prompt_tokens=TOKENS))
    roles = {n["label"]: n["role"] for n in data["nodes"] if n["kind"] == "logit"}
    assert roles == {"refuse-minus-comply": "difference", "refuse": "refusal", "comply": "compliance"}


def test_missing_highlight_is_reported(caplog):
    data = view_data(frontend_graph(synthetic_graph(), prompt_tokens=TOKENS), highlight=[(2, 9), (3, 12345), "x_1_2"])
    assert sum(n["highlight"] for n in data["nodes"]) >= 1
    assert "(3, 12345)" in caplog.text and "x_1_2" in caplog.text


def test_view_data_rejects_dangling_link():
    model = frontend_graph(synthetic_graph(), prompt_tokens=TOKENS)
    model.links.append({"source": "nope", "target": model.nodes[0].node_id, "weight": 1.0})
    with pytest.raises(ValueError, match="names unknown node 'nope'"):
        view_data(model)


def test_serve_is_bounded_and_local(view):
    tmp, path, _ = view
    with pytest.raises(ValueError, match="localhost only"):
        serve(path, port=0, host="0.0.0.0")
    with pytest.raises(FileNotFoundError, match="missing.html"):
        serve(tmp / "missing.html", port=0)
    with serving(tmp) as (url, requested):
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(url, timeout=10)  # no directory listing
        assert b"render-stats" in urllib.request.urlopen(url + "view.html", timeout=10).read()
    # blocking serve() stops by itself after max_requests
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", serve(path, port=port, max_requests=1, timeout_s=30)))
    t.start()
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/view.html", timeout=5).read()
            break
        except urllib.error.URLError:
            threading.Event().wait(0.1)
    t.join(timeout=30)
    assert not t.is_alive() and result["r"] == ["/view.html"]
