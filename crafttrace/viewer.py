"""Offline, self-contained HTML view of an attribution graph, and a bounded localhost server for it.

circuit-tracer's own frontend loads d3 / dagre / pako from CDNs, so it cannot open on an offline
machine. :func:`write_view` writes one HTML file (inline JS + SVG, data inlined as JSON, a Content
Security Policy that forbids every network request) from the same frontend graph JSON that
``crafttrace.export`` produces:

* nodes laid out by layer (rows: token embeddings at the bottom, logits on top) x token position (columns);
* edges drawn with width / opacity proportional to |weight|, blue for positive, red for negative;
* the refusal and compliance logit nodes marked (and crafttrace's refuse-minus-comply target);
  highlighted (CRaFT-selected) features in gold;
* hover for a node's id, layer, position, feature index, activation and influence; click to pin it
  and show its strongest edges.

After rendering, the page writes what it drew into ``#render-stats`` (``data-nodes``, ``data-links``,
``data-visible-links``, ``data-highlighted``, ``data-refusal``, ``data-compliance``,
``data-difference``), which the browser test reads.
"""

from __future__ import annotations

import functools
import http.server
import json
import logging
import os
import re
import threading
import time
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from circuit_tracer.frontend.graph_models import Model
from circuit_tracer.graph import Graph

from crafttrace.export import COMPLIANCE_LABELS, DIFFERENCE_LABELS, REFUSAL_LABELS, frontend_graph, load_frontend
from crafttrace.runs import atomic_write_text

log = logging.getLogger(__name__)

_KIND = {"cross layer transcoder": "feature", "mlp reconstruction error": "error",
         "embedding": "embedding", "logit": "logit"}
_LOGIT_CLERP = re.compile(r'^Output "(.*)" \(p=[^)]*\)$', re.S)  # Node.logit_node's clerp


def _as_model(source: Graph | Model | dict | str | os.PathLike, highlight, node_threshold, edge_threshold,
              prompt_tokens, tokenizer) -> Model:
    if isinstance(source, Model):
        return source
    if isinstance(source, dict):
        return Model.model_validate(source)
    if isinstance(source, (str, os.PathLike)) and Path(source).suffix == ".json":
        return load_frontend(source)
    pins = [h for h in highlight if not isinstance(h, str)]
    return frontend_graph(source, slug=Path(source).stem if isinstance(source, (str, os.PathLike)) else "graph",
                          node_threshold=node_threshold, edge_threshold=edge_threshold,
                          prompt_tokens=prompt_tokens, tokenizer=tokenizer, pinned=pins)


def view_data(model: Model, highlight: Iterable[tuple[int, int] | str] = (),
              refusal: Sequence[str] = REFUSAL_LABELS, compliance: Sequence[str] = COMPLIANCE_LABELS,
              title: str | None = None) -> dict[str, Any]:
    """The compact JSON the page renders: nodes with layout keys, links as [source, target, weight] indices."""
    feats = {(int(l), int(i)) for l, i in (h for h in highlight if not isinstance(h, str))}
    hl_ids = {h for h in highlight if isinstance(h, str)}
    n_layers = max((int(n.layer) for n in model.nodes if n.feature_type == "logit"), default=1) - 1
    nodes, index = [], {}
    for n in model.nodes:
        kind = _KIND.get(n.feature_type)
        if kind is None:
            raise ValueError(f"node {n.node_id}: unknown feature_type {n.feature_type!r}")
        d = {"id": n.node_id, "kind": kind, "type": n.feature_type, "ctx": n.ctx_idx,
             "activation": n.activation, "influence": n.influence, "clerp": n.clerp}
        if kind == "feature":
            layer, feat, _ = (int(x) for x in n.node_id.split("_"))
            d |= {"layer": layer, "feature": feat, "highlight": (layer, feat) in feats or n.node_id in hl_ids}
        elif kind == "error":
            d |= {"layer": int(n.layer), "highlight": n.node_id in hl_ids}
        elif kind == "embedding":
            d |= {"layer": -1, "highlight": False}
        else:
            m = _LOGIT_CLERP.match(n.clerp)
            label = m.group(1) if m else n.clerp
            role = ("refusal" if label in refusal else "compliance" if label in compliance
                    else "difference" if label in DIFFERENCE_LABELS else None)
            d |= {"layer": n_layers, "label": label, "role": role, "token_prob": n.token_prob, "highlight": False}
        index[n.node_id] = len(nodes)
        nodes.append(d)
    links = []
    for link in model.links:
        try:
            links.append([index[link["source"]], index[link["target"]], float(link["weight"])])
        except KeyError as e:
            raise ValueError(f"link {link['source']} -> {link['target']} names unknown node {e}") from None
    missing = sorted(hl_ids - set(index)) + sorted(feats - {(d["layer"], d["feature"]) for d in nodes
                                                             if d["kind"] == "feature"})
    if missing:
        log.warning("highlighted features / node ids not in this (pruned) graph: %s", missing)
    meta = model.metadata
    return {"meta": {"title": title or f"{meta.slug} — attribution graph ({meta.scan})", "prompt": meta.prompt,
                     "prompt_tokens": meta.prompt_tokens, "n_layers": n_layers, "slug": meta.slug},
            "nodes": nodes, "links": links}


def render_html(data: dict[str, Any]) -> str:
    template = files("crafttrace").joinpath("viewer_template.html").read_text(encoding="utf-8")
    # "</" inside inline JSON would end the <script> element early (and "<!--" confuse the parser)
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("</", "<\\/").replace("<!--", "<\\!--")
    title = (data["meta"]["title"].replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;"))
    return template.replace("__TITLE__", title).replace("__DATA__", payload)


def write_view(graph_json_or_graph: Graph | Model | dict | str | os.PathLike, out_html: str | os.PathLike,
               highlight: Iterable[tuple[int, int] | str] | None = None, *,
               node_threshold: float | None = 0.8, edge_threshold: float | None = 0.98,
               refusal: Sequence[str] = REFUSAL_LABELS, compliance: Sequence[str] = COMPLIANCE_LABELS,
               prompt_tokens: Sequence[str] | None = None, tokenizer=None, title: str | None = None) -> Path:
    """Write a self-contained interactive HTML view; returns its path.

    ``graph_json_or_graph``: a circuit-tracer ``Graph``, a saved graph (``graph_io`` directory or
    ``.safetensors``; pruned here with the thresholds), a frontend ``Model`` / dict, or a frontend
    ``.json`` file (already pruned by ``export``). ``highlight``: CRaFT features as ``(layer, index)``
    (every position they occur at) and/or node ids. ``refusal`` / ``compliance``: logit target labels.
    """
    highlight = list(highlight or [])
    model = _as_model(graph_json_or_graph, highlight, node_threshold, edge_threshold, prompt_tokens, tokenizer)
    data = view_data(model, highlight, refusal, compliance, title)
    return atomic_write_text(out_html, render_html(data))


# ------------------------------------------------------------------------------------------- serving

_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from one directory; no directory listings; requests recorded, not printed."""

    def list_directory(self, path):
        self.send_error(404, "no directory listings")
        return None

    def log_message(self, format, *args):
        self.server.requested.append(self.path)
        log.debug("serve: " + format, *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, addr, handler):
        self.requested: list[str] = []
        super().__init__(addr, handler)


def _make_server(path: str | os.PathLike, port: int, host: str) -> tuple[_Server, str]:
    if host not in _LOOPBACK:
        raise ValueError(f"serve binds to localhost only (127.0.0.1, localhost, ::1), not {host!r}")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"nothing to serve at {p}")
    root, page = (p.parent, p.name) if p.is_file() else (p, "")
    handler = functools.partial(_Handler, directory=str(root.resolve()))
    try:
        srv = _Server((host, port), handler)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    url_host = f"[{host}]" if ":" in host else host
    return srv, f"http://{url_host}:{srv.server_address[1]}/{page}"


@contextmanager
def serving(path: str | os.PathLike, port: int = 0, host: str = "127.0.0.1") -> Iterator[tuple[str, list[str]]]:
    """Serve ``path`` (an HTML file or a directory) in a background thread; yields (url, requested paths)."""
    srv, url = _make_server(path, port, host)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield url, srv.requested
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def serve(path: str | os.PathLike, port: int = 8000, host: str = "127.0.0.1",
          timeout_s: float | None = None, max_requests: int | None = None) -> list[str]:
    """Serve an HTML view (or a directory of them) on localhost until Ctrl-C, ``timeout_s`` seconds,
    or ``max_requests`` requests; returns the request paths. Binds loopback only."""
    srv, url = _make_server(path, port, host)
    print(f"serving {url}  (Ctrl-C to stop)", flush=True)
    srv.timeout = 0.5  # handle_request returns at least this often so the bounds are checked
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while (deadline is None or time.monotonic() < deadline) and \
                (max_requests is None or len(srv.requested) < max_requests):
            srv.handle_request()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return list(srv.requested)
