"""`crafttrace` command line: a thin shell over the library, one subcommand per pipeline stage.

Every stage writes JSON / safetensors records into ``--out DIR`` (a run directory). Model specs:
a preset (``smollm2-135m-instruct``, ``gemma-3-270m``), a local HF directory, a GGUF file, a hub id,
or ``testbed`` / ``testbed:SEED`` for the embedded synthetic testbed (which brings its own CLT).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Circuit-level refusal research: CLT attribution, CRaFT ranking, steering, audits.")
data_app = typer.Typer(no_args_is_help=True, help="Named data sets (licences shown).")
testbed_app = typer.Typer(no_args_is_help=True, help="The synthetic ground-truth testbed.")
app.add_typer(data_app, name="data")
app.add_typer(testbed_app, name="testbed")

MODEL = typer.Option("testbed", "--model", "-m", help="preset, local dir, GGUF file, hub id, or testbed[:SEED]")
TRANSCODER = typer.Option(None, "--transcoder", "-t", help="transcoder dir or hub id (testbed: its own CLT)")
OUT = typer.Option(Path("runs/latest"), "--out", "-o", help="run directory")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _is_testbed(model: str) -> bool:
    return model == "testbed" or model.startswith("testbed:")


def load(model: str, transcoder: Optional[str] = None, need_transcoder: bool = True):
    """(LoadedModel, transcoder or None) for a model spec; testbed specs carry their CLT."""
    if _is_testbed(model):
        import torch
        from .testbed import load_testbed
        # The testbed's matrices are ~100 wide: intra-op threads only add synchronisation (10x slower
        # generation measured on a busy 2-core machine), so one thread is the fast setting here.
        torch.set_num_threads(1)
        seed = int(model.split(":", 1)[1]) if ":" in model else 0
        loaded, clt = load_testbed(seed)
        if transcoder:
            from .transcoders import load_transcoder, validate_transcoder
            clt = load_transcoder(transcoder)
            validate_transcoder(clt, loaded.model)
        return loaded, clt
    if model.startswith("smollm2-safety"):
        # The safety-tuned real-language testbed (issue 4): "smollm2-safety[:SIZE]", brings its own CLT.
        from .realbed import load_realbed
        size = model.split(":", 1)[1] if ":" in model else "default"
        loaded, clt = load_realbed(size=size, build_if_missing=False)
        if transcoder:
            from .transcoders import load_transcoder
            clt = load_transcoder(transcoder)
        from .transcoders import validate_transcoder
        validate_transcoder(clt, loaded.model)
        return loaded, clt
    from .models import load_model
    loaded = load_model(model)
    if transcoder is None:
        if need_transcoder:
            _fail(f"--transcoder is required for model {model!r}")
        return loaded, None
    from .transcoders import load_transcoder, validate_transcoder
    clt = load_transcoder(transcoder)
    validate_transcoder(clt, loaded.model)
    return loaded, clt


def _parse_feature(spec: str) -> tuple[int, int]:
    try:
        layer, index = spec.replace(":", "/").split("/")
        return int(layer), int(index)
    except ValueError:
        _fail(f"feature must look like LAYER/INDEX (e.g. 2/17), got {spec!r}")
        raise


def _config(path: Optional[Path]) -> dict:
    if path is None:
        return {}
    if not path.exists():
        _fail(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml
        return yaml.safe_load(text) or {}
    return json.loads(text)


# --------------------------------------------------------------------------- stages

@app.command()
def tokens(model: str = MODEL, token_set: str = typer.Option("strict", "--set", help="strict | extended | testbed | "
           "FILE.json | 'refusal=a|b;compliance=c|d'"), out: Path = OUT):
    """Resolve refusal/compliance token sets to first-token ids."""
    from . import runs
    from .tokens import resolve
    loaded, _ = load(model, None, need_transcoder=False)
    ts = resolve(loaded.tokenizer, token_set)
    runs.write_json(out / "tokens.json", ts.to_json())
    typer.echo(json.dumps(ts.to_json(), indent=1))


@app.command("boundary")
def boundary_cmd(model: str = MODEL, pool: str = typer.Option("testbed:framed_harmful", help="data set name or file"),
                 sets: str = typer.Option("testbed", help="comma-separated token sets, e.g. strict,extended"),
                 top_k: Optional[int] = typer.Option(None), min_refuse: float = 0.2, min_comply: float = 0.2,
                 limit: Optional[int] = typer.Option(None, help="score only the first N prompts"), out: Path = OUT):
    """Score a harmful pool and select boundary-critical prompts (per token set, with overlaps)."""
    from . import boundary, runs
    from .ablation import pool_records
    from .tokens import resolve
    loaded, _ = load(model, None, need_transcoder=False)
    recs = pool_records(pool, 0)[:limit]
    tss = [resolve(loaded.tokenizer, s) for s in sets.split(",")]
    scored = boundary.score_pool(loaded, [r["prompt"] for r in recs], tss)
    results = {}
    for ts, sc in zip(tss, scored):
        try:
            results[ts.name] = boundary.select(sc, ts.name, top_k=top_k, min_refuse=min_refuse, min_comply=min_comply)
        except boundary.NoBoundaryPromptError as e:
            _fail(str(e))
    names = list(results)
    doc = {"pool": pool, "sets": {n: r.to_json() for n, r in results.items()},
           "overlaps": [boundary.overlap(results[a], results[b]) for i, a in enumerate(names) for b in names[i + 1:]]}
    runs.write_json(out / "boundary.json", doc)
    for n, r in results.items():
        typer.echo(f"{n}: {json.dumps(r.stats())}")
    for o in doc["overlaps"]:
        typer.echo(f"overlap {o['a']} vs {o['b']}: {o['n_both']} shared, jaccard {o['jaccard']:.2f}")


@app.command()
def attribute(model: str = MODEL, transcoder: Optional[str] = TRANSCODER,
              prompt: list[str] = typer.Option([], "--prompt", "-p", help="user prompt(s); default: boundary.json"),
              token_set: str = typer.Option("testbed", "--set"), max_feature_nodes: int = 512,
              path: str = typer.Option("graph", help="graph (circuit-tracer) or grad (fast path)"), out: Path = OUT):
    """Attribution graphs to the refusal/compliance logits; effects cached in OUT/effects."""
    from . import attribution, runs
    from .tokens import resolve
    loaded, clt = load(model, transcoder)
    if not prompt:
        b = runs.read_json(out / "boundary.json")
        sets = b["sets"] if "sets" in b else {b["token_set"]: b}
        sel = next(iter(sets.values()))
        prompt = [sel["scores"][i]["prompt"] for i in sel["selected"]]
    ts = resolve(loaded.tokenizer, token_set)
    ids = [loaded.encode_prompt(p)[0] for p in prompt]
    if path == "graph":
        effs = attribution.attribute_graphs(loaded, clt, ids, ts, attribution.AttributionSettings(max_feature_nodes),
                                            out / "effects", cache_key=model)
    else:
        effs = attribution.gradient_effects(loaded, clt, ids, ts)
    summary = []
    for p, e in zip(prompt, effs):
        top = e.total.abs().argsort(descending=True)[:5]
        summary.append({"prompt": p, "logit_diff": e.logit_diff, "n_active": len(e.features),
                        "graph": e.meta.get("graph"),
                        "top": [{"layer": int(e.features[j, 0]), "pos": int(e.features[j, 1]),
                                 "index": int(e.features[j, 2]), "effect": float(e.total[j])} for j in top]})
    runs.write_json(out / "attribution.json", {"path": path, "prompts": summary})
    typer.echo(f"{len(effs)} prompts attributed; summary in {out / 'attribution.json'}")


@app.command()
def rank(model: str = MODEL, transcoder: Optional[str] = TRANSCODER,
         config: Optional[Path] = typer.Option(None, help="YAML/JSON ablation config (pools, sizes)"), out: Path = OUT):
    """Rank features in all four modes (writes ranking.json); the ablation command does this and more."""
    _run_ablation(model, transcoder, config, out, rank_only=True)


@app.command("steer")
def steer_cmd(feature: str = typer.Argument(..., help="LAYER/INDEX"),
              value: float = typer.Option(0.0, help="clamp value, or multiplier with --mode scale"),
              mode: str = typer.Option("clamp"), prompt: str = typer.Option(..., "--prompt", "-p"),
              model: str = MODEL, transcoder: Optional[str] = TRANSCODER, max_new_tokens: int = 32,
              out: Path = OUT):
    """Generate with and without one steered feature (forward hooks on the plain model)."""
    from . import runs
    from .capability import generate
    from .steering import FeatureSteer, steer
    loaded, clt = load(model, transcoder)
    layer, index = _parse_feature(feature)
    spec = FeatureSteer(layer, index, mode, value)
    base = generate(loaded, [prompt], max_new_tokens)[0]
    with steer(loaded.model, clt, [spec]):
        steered = generate(loaded, [prompt], max_new_tokens)[0]
    runs.write_json(out / "steer.json", {"feature": [layer, index], "mode": mode, "value": value,
                                         "prompt": prompt, "base": base[:200], "steered": steered[:200]})
    typer.echo(f"base:    {base}\nsteered: {steered}")


@app.command()
def ablation(model: str = MODEL, transcoder: Optional[str] = TRANSCODER,
             config: Optional[Path] = typer.Option(None, help="YAML/JSON file with AblationConfig fields"),
             influence_path: Optional[str] = typer.Option(None, help="graph | grad"), out: Path = OUT):
    """The activation-vs-influence ablation table in one command."""
    _run_ablation(model, transcoder, config, out, influence_path=influence_path)


def _run_ablation(model, transcoder, config, out, rank_only=False, influence_path=None, extra=None, demo=False):
    from .ablation import REAL_TEXT, AblationConfig, render_markdown, run_ablation
    d = {k: v for k, v in AblationConfig.demo().__dict__.items()} if demo else {}
    if not _is_testbed(model):
        d.update(REAL_TEXT)   # real text: data set pools instead of the testbed's synthetic ones
    d.update(_config(config))
    d.update(extra or {})
    if influence_path:
        d["influence_path"] = influence_path
    cfg = AblationConfig.from_dict(d)
    loaded, clt = load(model, transcoder)
    res = run_ablation(loaded, clt, cfg, out, cache_key=f"{model}|{transcoder}", rank_only=rank_only)
    if not rank_only:
        typer.echo(render_markdown(res))
    typer.echo(f"wrote {out}")
    return res


@app.command()
def demo(out: Path = OUT, seed: int = typer.Option(0, help="testbed seed (0 is shipped in transcoders/)"),
         influence_path: str = typer.Option("graph", help="graph | grad"),
         testbed: str = typer.Option("synthetic", help="synthetic | smollm2-safety[:SIZE] (the real-language "
                                                       "testbed; built first if missing, ~90 min)")):
    """Run the whole pipeline on the embedded synthetic testbed (offline, well under a minute), or with
    ``--testbed smollm2-safety`` on the safety-tuned SmolLM2 with its own CLT."""
    import time
    t = time.time()
    if testbed != "synthetic" and not testbed.startswith("smollm2-safety"):
        raise typer.BadParameter(f"unknown testbed {testbed!r}; known: synthetic, smollm2-safety[:SIZE]")
    model = f"testbed:{seed}" if testbed == "synthetic" else testbed
    _run_ablation(model, None, None, out, influence_path=influence_path, demo=True)
    typer.echo(f"demo finished in {time.time() - t:.1f} s")



@app.command()
def evaluate(responses: Optional[Path] = typer.Option(None, help="JSONL with 'prompt' and 'response' fields"),
             out: Path = OUT):
    """Validate the refusal detector on the human-labelled set; score a responses file if given."""
    from . import evaluation, runs
    rep = evaluation.validate_detector()
    doc = {"detector_validation": rep.summary()}
    typer.echo(f"refusal detector on human labels: {json.dumps(doc['detector_validation'], default=str)}")
    if responses is not None:
        from .data import load_dataset
        recs = load_dataset(str(responses))
        verdicts = evaluation.score_responses([r["prompt"] for r in recs], [r["response"] for r in recs])
        doc["verdicts"] = [v.__dict__ if hasattr(v, "__dict__") else v for v in verdicts]
        n = len(verdicts)
        typer.echo(f"{n} responses scored")
    runs.write_json(out / "evaluate.json", doc)


@app.command("capability")
def capability_cmd(task: str = typer.Option("mmlu", help="mmlu | gsm8k | ifeval | arc | testbed"),
                   limit: int = 100, model: str = MODEL, transcoder: Optional[str] = TRANSCODER,
                   feature: Optional[str] = typer.Option(None, help="LAYER/INDEX to steer while measuring"),
                   value: float = typer.Option(0.0, help="clamp value for --feature"), out: Path = OUT):
    """Capability with and without a steered feature, paired: accuracy, Wilson CI, exact McNemar."""
    from contextlib import nullcontext
    from . import capability as cap, runs
    from .steering import FeatureSteer, steer
    loaded, clt = load(model, transcoder, need_transcoder=feature is not None)
    if task == "testbed":
        from .ablation import TestbedCapability
        tb = TestbedCapability(limit)
        def fn(steering=None):
            with steering or nullcontext():
                return tb.correct(loaded)
    else:
        fns = {"mmlu": cap.mmlu, "gsm8k": cap.gsm8k, "ifeval": cap.ifeval, "arc": cap.arc_challenge}
        if task not in fns:
            _fail(f"unknown capability task {task!r}; choose from {sorted(fns) + ['testbed']}")
        fn = lambda steering=None: fns[task](loaded, limit=limit, steering=steering)  # noqa: E731
    base = fn()
    doc = {"task": task, "n": len(base), "accuracy": sum(base) / max(len(base), 1),
           "accuracy_ci": cap.wilson(sum(base), len(base))}
    if feature is not None:
        layer, index = _parse_feature(feature)
        new = fn(steering=steer(loaded.model, clt, [FeatureSteer(layer, index, "clamp", value)]))
        p, lost, gained = cap.mcnemar_exact(base, new)
        doc.update({"feature": [layer, index], "value": value, "steered_accuracy": sum(new) / len(new),
                    "mcnemar_p": p, "lost": lost, "gained": gained})
    runs.write_json(out / f"capability_{task}.json", doc)
    typer.echo(json.dumps(doc, indent=1, default=str))


@app.command()
def export(graph: Path = typer.Argument(..., help="saved graph (graph_io dir or .safetensors)"),
           out: Path = typer.Option(Path("graphs"), "--out", "-o"), slug: Optional[str] = None,
           node_threshold: float = 0.8, edge_threshold: float = 0.98,
           feature: list[str] = typer.Option([], help="LAYER/INDEX features for the refusal subgraph")):
    """Export a graph: circuit-tracer/Neuronpedia JSON, GraphML, refusal subgraph."""
    from .export import export_graph
    feats = [_parse_feature(f) for f in feature]
    paths = export_graph(graph, out, slug or graph.stem, node_threshold=node_threshold,
                         edge_threshold=edge_threshold, features=feats)
    for k, v in paths.items():
        typer.echo(f"{k}: {v}")


@app.command()
def view(graph: Path = typer.Argument(..., help="saved graph or exported frontend JSON"),
         out: Optional[Path] = typer.Option(None, "--out", "-o", help="HTML file (default: GRAPH.html)"),
         highlight: list[str] = typer.Option([], help="LAYER/INDEX features to highlight"),
         serve_port: Optional[int] = typer.Option(None, "--serve", help="also serve it on localhost:PORT")):
    """Write a self-contained offline HTML view of an attribution graph (no CDN, no network)."""
    from . import viewer
    html = viewer.write_view(graph, out or graph.with_suffix(".html"), [_parse_feature(h) for h in highlight])
    typer.echo(f"wrote {html}")
    if serve_port is not None:
        viewer.serve(html, port=serve_port)


@app.command()
def serve(path: Path = typer.Argument(Path("graphs"), help="directory of exported graph JSON files"),
          port: int = 8041):
    """Run circuit-tracer's own frontend on localhost (its page loads d3 from CDNs: needs a browser online)."""
    from circuit_tracer.frontend.local_server import serve as ct_serve
    if not path.exists():
        _fail(f"graph directory not found: {path}")
    server = ct_serve(data_dir=str(path), port=port)
    typer.echo(f"circuit-tracer frontend on http://localhost:{port} (Ctrl-C to stop)")
    try:
        import time
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        server.stop()


def _pools(harmful: str, benign: str, limit: int) -> tuple[list[str], list[str]]:
    from .data import prompts
    return prompts(harmful)[:limit], prompts(benign)[:limit]


@app.command()
def direction(model: str = MODEL, harmful: str = "testbed:harmful_train", benign: str = "testbed:benign_train",
              limit: int = 200, token_set: str = typer.Option("testbed", "--set"),
              config: Optional[Path] = typer.Option(None), out: Path = OUT):
    """Refusal direction (difference of means), selection, separation and intervention checks."""
    from .direction import DirectionConfig, find_direction
    from .tokens import resolve
    loaded, _ = load(model, None, need_transcoder=False)
    h, b = _pools(harmful, benign, limit)
    cfg = _config(config)
    if _is_testbed(model):
        # A 3-layer model's refusal direction moves benign next-token KL past Arditi's 0.1 limit (0.66
        # measured on seed 0); the testbed keeps the filter but at 1.0.
        cfg.setdefault("max_kl", 1.0)
    d = find_direction(loaded, h, b, resolve(loaded.tokenizer, token_set), DirectionConfig(**cfg),
                       out_dir=out / "direction")
    typer.echo(f"selected layer {d.layer}, position {d.position}; wrote {out / 'direction'}")


@app.command()
def patch(model: str = MODEL, harmful: str = "testbed:harmful_heldout", benign: str = "testbed:benign",
          n_pairs: int = 16, token_set: str = typer.Option("testbed", "--set"), out: Path = OUT):
    """Activation patching (resid / attn / MLP per layer x position, and per head) on matched pairs."""
    from .patching import match_pairs, patch as run_patch
    from .tokens import resolve
    loaded, _ = load(model, None, need_transcoder=False)
    h, b = _pools(harmful, benign, 10_000)
    pairs = match_pairs(loaded, h, b, limit=n_pairs)
    res = run_patch(loaded, pairs, resolve(loaded.tokenizer, token_set), out_dir=out / "patching")
    typer.echo(f"{len(pairs)} pairs patched; top components: {json.dumps(res.top(5), default=str)}")


@app.command()
def compare(base: str = typer.Option(..., help="base model spec"), tuned: str = typer.Option(..., help="tuned model spec"),
            transcoder: Optional[str] = typer.Option(None, help="transcoder of the tuned model"),
            harmful: str = "testbed:harmful_train", benign: str = "testbed:benign_train", limit: int = 200,
            token_set: str = typer.Option("testbed", "--set"), out: Path = OUT):
    """Base vs safety-tuned: directions, separation, patching maps, direction-feature cosines."""
    from .compare import compare_models
    from .tokens import resolve
    lb, _ = load(base, None, need_transcoder=False)
    lt, clt = load(tuned, transcoder, need_transcoder=False)
    h, b = _pools(harmful, benign, limit)
    feats = []
    if clt is not None and (out / "ranking.json").exists():
        from . import runs
        feats = [tuple(f) for f in runs.read_json(out / "ranking.json")["top"]["influence_boundary"][:10]]
    compare_models(lb, lt, h, b, resolve(lb.tokenizer, token_set), out_dir=out / "compare", tc=clt, features=feats,
                   tokens_tuned=resolve(lt.tokenizer, token_set))
    typer.echo(f"wrote {out / 'compare'}")


def _rank_for(model, transcoder, out):
    """A Ranking for monitor/audit/drift: runs the ranking stage into OUT (cached effects make reruns cheap)."""
    from .ablation import REAL_TEXT, AblationConfig, run_ablation
    d = {} if _is_testbed(model) else dict(REAL_TEXT)
    loaded, clt = load(model, transcoder)
    res = run_ablation(loaded, clt, AblationConfig.from_dict(d), out, cache_key=f"{model}|{transcoder}",
                       rank_only=True)
    return loaded, clt, res["ranking_object"]


@app.command()
def monitor(model: str = MODEL, transcoder: Optional[str] = TRANSCODER, config: Optional[Path] = typer.Option(None),
            out: Path = OUT):
    """Refusal-circuit monitor: scores how strongly the refusal circuit treats an input as harmful."""
    from .monitor import MonitorRunConfig, run_monitor
    loaded, clt, rk = _rank_for(model, transcoder, out)
    res = run_monitor(loaded, clt, rk, out / "monitor", MonitorRunConfig.from_dict(_config(config)))
    def brief(v):  # detector metrics without the per-prompt score lists (those are in monitor_eval.json)
        return {k: brief(x) for k, x in v.items() if k != "scores"} if isinstance(v, dict) else v
    typer.echo(json.dumps({k: brief(res[k]) for k in ("plain", "wrapped_complied", "n_wrapped_complied") if k in res},
                          indent=1, default=str))


@app.command()
def audit(model: str = MODEL, transcoder: Optional[str] = TRANSCODER, config: Optional[Path] = typer.Option(None),
          out: Path = OUT):
    """Fragility report: how many single features flip refusal, at what strength and capability cost."""
    from .audit import AuditConfig, run_audit
    loaded, clt, rk = _rank_for(model, transcoder, out)
    res = run_audit(loaded, clt, rk, out / "audit", AuditConfig.from_dict(_config(config)))
    typer.echo(json.dumps(res.get("summary", {}), indent=1, default=str))


@app.command()
def drift(model_a: str = typer.Option(..., "--a", help="reference checkpoint"),
          model_b: str = typer.Option(..., "--b", help="checkpoint to check"),
          transcoder: Optional[str] = TRANSCODER, config: Optional[Path] = typer.Option(None), out: Path = OUT):
    """Checkpoint drift: refusal features' activations, influence, steering sensitivity, direction cosine."""
    from .drift import DriftConfig, run_drift
    la, clt, rk = _rank_for(model_a, transcoder, out)
    lb, _ = load(model_b, None, need_transcoder=False)
    res = run_drift(la, lb, clt, rk, out / "drift", cfg=DriftConfig.from_dict(_config(config)))
    typer.echo(f"regression: {res['regression']} {res.get('reasons', [])}")


@app.command("train-clt")
def train_clt_cmd(model: str = typer.Option(..., "--model", "-m"), text: str = typer.Option("text", help="data set "
                  "name or .jsonl/.txt path"), config: Optional[Path] = typer.Option(None, help="CLTTrainConfig JSON"),
                  max_steps: Optional[int] = typer.Option(None, help="stop after N steps (resumable)"),
                  out: Path = typer.Option(Path("runs/clt"), "--out", "-o")):
    """Train a cross-layer transcoder (sparse decode, checkpoints, resume) in circuit-tracer's layout."""
    from .training import CLTTrainConfig, train_clt
    loaded, _ = load(model, None, need_transcoder=False)
    cfg = CLTTrainConfig.from_dict(_config(config))
    res = train_clt(loaded, text, cfg, out, max_steps=max_steps)
    typer.echo(json.dumps(res.metrics, indent=1, default=str)[:2000])


@app.command("example-graphs")
def example_graphs(out: Path = typer.Option(Path("graphs"), "--out", "-o"), n: int = 3, seed: int = 0,
                   run: Path = typer.Option(Path("runs/example-graphs"), help="scratch run directory")):
    """Regenerate graphs/: the testbed's top-N boundary prompts, attributed, exported (JSON, GraphML,
    refusal subgraph) and rendered as offline HTML views with the CRaFT feature highlighted."""
    from . import attribution, boundary, runs
    from .ablation import pool_records
    from .export import export_graph
    from .ranking import effects_matrix
    from .tokens import resolve
    from .viewer import write_view
    loaded, clt = load(f"testbed:{seed}")
    ts = resolve(loaded.tokenizer, "testbed")
    recs = pool_records("testbed:framed_harmful", seed)
    (sc,) = boundary.score_pool(loaded, [r["prompt"] for r in recs], [ts])
    sel = boundary.select(sc, ts.name, top_k=n)
    ids = [loaded.encode_prompt(p)[0] for p in sel.prompts]
    effs = attribution.attribute_graphs(loaded, clt, ids, ts, attribution.AttributionSettings(), run / "effects",
                                        cache_key=f"testbed:{seed}")
    mean = effects_matrix(effs, clt.n_layers, clt.d_transcoder).mean(0)
    flat = int(mean.abs().flatten().argmax())
    top = (flat // clt.d_transcoder, flat % clt.d_transcoder)
    index = []
    for k, (p, e) in enumerate(zip(sel.prompts, effs)):
        slug = f"testbed_boundary_{k}"
        paths = export_graph(run / "effects" / e.meta["graph"], out, slug, features=[top], tokenizer=loaded.tokenizer)
        html = write_view(paths["frontend"], out / f"{slug}.html", [top], title=p)
        index.append({"slug": slug, "prompt": p, "logit_diff": e.logit_diff, "craft_feature": list(top),
                      "files": sorted(str(Path(v).name) for v in list(paths.values()) + [html])})
    runs.write_json(out / "index.json", {"command": f"crafttrace example-graphs --out {out} --n {n} --seed {seed}",
                                         "feature": list(top), "graphs": index})
    typer.echo(f"wrote {len(index)} example graphs to {out}")


@data_app.command("list")
def data_list():
    """Named data sets, their sizes and licences."""
    from .data import list_datasets
    for row in list_datasets():
        r = row if isinstance(row, dict) else row.__dict__
        typer.echo(f"{r['name']:<18} {str(r.get('kind', '')):<11} {str(r.get('items', '')):>6}  {r.get('licence', '')}")


@testbed_app.command("build")
def testbed_build(name: str = typer.Argument("synthetic", help="synthetic | smollm2-safety"), seed: int = 0,
                  size: str = typer.Option("default", help="smollm2-safety: tiny | small | default"),
                  time_budget_s: Optional[float] = typer.Option(None, help="smollm2-safety: stop after this many "
                                                                 "seconds; rerun to continue"),
                  out: Optional[Path] = typer.Option(None, help="default: the testbed cache"),
                  ablation: bool = typer.Option(False, help="smollm2-safety: also run the ablation stage")):
    """Build a testbed: the synthetic one (deterministic from a seed) or the safety-tuned SmolLM2 (staged,
    cached: a rerun skips finished stages)."""
    if name == "synthetic":
        from .testbed import build_testbed, default_dir
        path = build_testbed(seed, out or default_dir(seed))
        typer.echo(f"testbed seed {seed} written to {path}")
    elif name == "smollm2-safety":
        from .realbed import DEFAULT_STAGES, build_realbed
        stages = DEFAULT_STAGES + (("ablation",) if ablation else ())
        bed = build_realbed(out, size=size, seed=seed, time_budget_s=time_budget_s, stages=stages)
        typer.echo(f"smollm2-safety ({size}, seed {seed}): done stages {list(bed.done)}; finished={bed.finished}")
    else:
        _fail(f"unknown testbed {name!r}; choose synthetic or smollm2-safety")


def main():  # pragma: no cover
    try:
        app()
    except (ValueError, FileNotFoundError, IndexError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
