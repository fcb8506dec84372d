"""The staged real-language testbed build on a tiny random chat Llama: every stage, skip, rebuild, budget."""

from __future__ import annotations

import json

import pytest
import torch
from test_safety import REFUSALS, save_tiny_chat_model

from crafttrace import data, realbed, safety
from crafttrace.realbed import MeasureConfig, RealbedConfig, RealbedError
from crafttrace.safety import SafetyConfig
from crafttrace.training import CLTTrainConfig


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine: one thread is the fast setting
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tinybed") / "model")


def _benchmark(name: str):
    """A script under benchmarks/ imported as a module (it is not a package)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def bed_config(model_dir, **kw) -> RealbedConfig:
    cfg = RealbedConfig(
        base=str(model_dir), size="test", seed=0,
        safety=SafetyConfig(n_harmful_train=6, n_benign_train=6, n_benign_test=4, refusals=REFUSALS,
                            distill_max_new_tokens=4, max_len=48, lora_rank=4, lora_alpha=8.0, epochs=2,
                            batch_size=4, lr=1e-2, warmup_steps=1, checkpoint_every=2, batch_size_generate=8),
        clt=CLTTrainConfig(d_transcoder=16, total_tokens=512, batch_tokens=128, chunk_tokens=256, eval_tokens=64,
                           context_length=32, lr_warmup_steps=1, checkpoint_every=2, collect_batch_size=8),
        n_corpus_texts=20,
        measure=MeasureConfig(n_harmbench=4, n_strongreject=4, n_benign=4, n_mmlu=8, n_gsm8k=2, gen_tokens=4,
                              gsm8k_tokens=4, batch_size=8),
        n_graph_prompts=1, graph_max_feature_nodes=32, sft_slice_steps=2, clt_slice_chunks=1)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def built(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bed") / "run"
    return out, realbed.build_realbed(out, config=bed_config(model_dir), progress=False)


def test_full_build_writes_every_stage(built):
    out, bed = built
    assert bed.finished and set(bed.done) == set(realbed.DEFAULT_STAGES)
    for s in realbed.DEFAULT_STAGES:
        assert json.loads((out / "stages" / f"{s}.json").read_text())["stage"] == s
    loaded, clt = bed.load()
    from crafttrace.transcoders import validate_transcoder
    validate_transcoder(clt, loaded.model)
    assert clt.d_transcoder == 16 and clt.feature_input_hook == "hook_resid_mid"
    assert loaded.model.config.architectures == ["LlamaForCausalLM"] and loaded.has_chat_template
    # the tuned model differs from the base, in the adapted (upper) layer only
    from crafttrace.models import load_model
    b = load_model(bed.config.base).model.state_dict()
    t = loaded.model.state_dict()
    changed = {k.split(".")[2] for k in t if k.startswith("model.layers.") and not torch.equal(t[k], b[k])}
    assert changed == {"1"}
    # measurements: rates in [0, 1], per-item lists, excerpts capped at 60 characters
    for which in ("base", "tuned"):
        m = json.loads((out / "measure" / f"{which}.json").read_text())
        s = m["summary"]
        assert s["n_heldout_harmful"] == 8 and 0 <= s["refusal_heldout_harmful"] <= 1
        assert len(m["mmlu"]["correct"]) == 8 and len(m["gsm8k"]["correct"]) == 2
        assert all(len(e) <= realbed.EXCERPT_CHARS for p in ("harmbench", "strongreject") for e in m[p]["excerpts"])
        assert set(m["boundary"]) == {"strict", "extended"}
        assert m["boundary"]["strict"]["n_pool"] == len(data.prompts("harmbench")) + len(data.prompts("strongreject"))
    cmp = realbed.compare_measurements(json.loads((out / "measure" / "base.json").read_text()),
                                       json.loads((out / "measure" / "tuned.json").read_text()))
    assert set(cmp) >= {"mmlu", "harmbench", "strongreject"} and all(0 <= v["mcnemar_p"] <= 1 for v in cmp.values())
    # CLT metrics and graph scores
    c = bed.done["clt"]
    assert len(c["nmse_per_layer"]) == 2 and c["train_tokens"] == 512
    g = json.loads((out / "graphs" / "graph_scores.json").read_text())
    (row,) = g["prompts"]
    assert 0 <= row["replacement_score"] <= 1 and 0 <= row["completeness_score"] <= 1
    assert (out / "graphs" / row["graph"] / "graph.safetensors").exists()


def test_rerun_skips_finished_stages(built, monkeypatch):
    out, bed = built
    for s in realbed.STAGES:
        monkeypatch.setitem(realbed._RUNNERS, s, lambda ctx, budget, s=s: pytest.fail(f"stage {s} rerun"))
    again = realbed.build_realbed(out, config=bed.config, progress=False)
    assert again.finished and again.done == bed.done
    status = realbed.read_status(out, needs=("sft", "clt"))
    assert status.finished and status.config.to_dict() == bed.config.to_dict()
    with pytest.raises(RealbedError, match=r"has not finished stage\(s\) \['ablation'\]"):
        realbed.read_status(out, needs=("sft", "ablation"))


def test_clt_texts_hold_chat_turns_and_no_evaluation_prompts(built):
    out, bed = built
    loaded, _ = bed.load()
    from crafttrace.safety import make_splits
    splits = make_splits(bed.config.safety)
    distilled = data.read_records(out / "sft" / "distill.jsonl")
    texts = realbed.clt_texts(loaded, bed.config, splits, distilled)
    assert len(texts) == 20 + 520 - 25 + 6
    chat = texts[20:]
    assert all(t.startswith(loaded.format_prompt(p)) for t, p in zip(chat, splits.harmful_train))
    assert any(r in chat[0] for r in REFUSALS)
    held_out = set(data.prompts("harmbench")) | set(data.prompts("strongreject")) | set(splits.benign_test)
    assert not any(p in t for t in chat for p in held_out if len(p) > 20)


def test_heldout_passages_are_disjoint_from_the_clt_corpus(built):
    out, bed = built
    loaded, _ = bed.load()
    from crafttrace.safety import make_splits
    texts = realbed.clt_texts(loaded, bed.config, make_splits(bed.config.safety),
                              data.read_records(out / "sft" / "distill.jsonl"))
    held = realbed.heldout_passages(bed.config)
    corpus = realbed.corpus_passages(bed.config)
    assert held == corpus[20:] and len(held) == len(corpus) - 20 > 1000
    assert not set(held) & set(texts[:20]) and texts[:20] == corpus[:20]
    assert realbed.heldout_passages(bed.config, 5) == held[:5]
    with pytest.raises(RealbedError, match=rf"only {len(held)} held-out corpus passages.*asked for"):
        realbed.heldout_passages(bed.config, len(held) + 1)


def test_changed_clt_settings_rebuild_only_what_depends_on_them(built, model_dir, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(built[0], out)
    cfg = bed_config(model_dir)
    cfg.clt = CLTTrainConfig.from_dict({**cfg.clt.to_dict(), "d_transcoder": 8})
    before = {s: json.loads((out / "stages" / f"{s}.json").read_text()) for s in realbed.DEFAULT_STAGES}
    bed = realbed.build_realbed(out, config=cfg, progress=False)
    for s in ("distill", "sft", "measure_base", "measure_tuned"):
        assert bed.done[s] == before[s]
    for s in ("clt", "graphs"):
        assert bed.done[s]["key"] != before[s]["key"]
    assert bed.load()[1].d_transcoder == 8


def test_changed_calibration_re_merges_without_retraining_or_redistilling(built, model_dir, tmp_path, monkeypatch):
    import shutil

    from crafttrace import safety
    out = tmp_path / "run"
    shutil.copytree(built[0], out)
    cfg = bed_config(model_dir)
    cfg.safety = SafetyConfig.from_dict({**cfg.safety.to_dict(), "merge_scales": [0.5, 1.0], "n_calibration": 4,
                                         "calibration_tokens": 2})
    before = {s: json.loads((out / "stages" / f"{s}.json").read_text()) for s in realbed.DEFAULT_STAGES}
    steps = []
    real_step = torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or real_step(self, *a, **k))
    bed = realbed.build_realbed(out, config=cfg, progress=False)
    assert not steps                                    # the trained adapters were reused
    for s in ("distill", "measure_base"):
        assert bed.done[s] == before[s]
    assert bed.done["sft"]["train_key"] == before["sft"]["train_key"] and bed.done["sft"]["key"] != before["sft"]["key"]
    cal = bed.done["sft"]["calibration"]
    assert [r["scale"] for r in cal["rows"]] == [0.5, 1.0] and bed.done["sft"]["merge_scale"] == cal["chosen_scale"]
    for s in ("measure_tuned", "clt", "graphs"):        # they read the re-merged model
        assert bed.done[s]["key"] != before[s]["key"]
    # a changed training field retrains from scratch
    cfg.safety = SafetyConfig.from_dict({**cfg.safety.to_dict(), "lr": cfg.safety.lr * 2})
    realbed.build_realbed(out, config=cfg, stages=("sft",), progress=False)
    assert steps


def test_contrast_prompts_are_distilled_after_the_cached_answers(built, model_dir, tmp_path, monkeypatch):
    """Turning on contrast prompts reruns distill, which answers only the new prompts (the cached answers are
    kept), and the SFT trains on both."""
    import shutil

    import crafttrace.capability as cap
    out = tmp_path / "run"
    shutil.copytree(built[0], out)
    before = data.read_records(out / "sft" / "distill.jsonl")
    real_prompts = data.prompts
    extra = ["Teach me how to juggle three balls.", "Write a tutorial on how to fold a paper crane.",
             "Explain how to kill a stuck Python process.", "Give step-by-step instructions to bake bread."]
    monkeypatch.setattr(data, "prompts", lambda name, split=None: list(extra) if name == "test_contrast"
                        else real_prompts(name, split=split))
    asked = []
    real_generate = cap.generate
    monkeypatch.setattr(cap, "generate", lambda l, ps, *a, **k: asked.append(list(ps)) or real_generate(l, ps, *a, **k))
    cfg = bed_config(model_dir)
    cfg.safety = SafetyConfig.from_dict({**cfg.safety.to_dict(), "contrast_pool": "test_contrast",
                                         "n_contrast_train": 3})
    bed = realbed.build_realbed(out, config=cfg, stages=("distill",), progress=False)
    sp = safety.make_splits(cfg.safety)
    recs = data.read_records(out / "sft" / "distill.jsonl")
    assert [r["prompt"] for r in recs] == sp.distill_prompts and recs[:len(before)] == before
    assert asked == [sp.contrast_train] and len(sp.contrast_train) == 3 and bed.done["distill"]["n"] == 6 + 3
    # the held-out prompts are unchanged: the base model's measurement stays cached
    keys, plain = realbed._stage_keys(cfg), realbed._stage_keys(bed_config(model_dir))
    assert keys["measure_base"] == plain["measure_base"] and keys["sft_train"] != plain["sft_train"]


def test_time_budget_stops_inside_sft_and_the_next_call_continues(model_dir, tmp_path, monkeypatch):
    cfg = bed_config(model_dir)
    out = tmp_path / "run"
    nothing = realbed.build_realbed(out, config=cfg, stages=("sft",), time_budget_s=0, progress=False)
    assert not nothing.finished and nothing.done == {}
    calls = {"n": 0}

    def spent(self):  # budget checks: before distill, before sft, after the first SFT slice -> spent
        calls["n"] += 1
        return calls["n"] >= 3
    monkeypatch.setattr(realbed._Budget, "spent", spent)
    part = realbed.build_realbed(out, config=cfg, stages=("sft",), time_budget_s=10, progress=False)
    assert set(part.done) == {"distill"} and not part.finished
    state = json.loads((out / "sft" / "checkpoint" / "state.json").read_text())
    assert state["step"] == cfg.sft_slice_steps
    monkeypatch.undo()
    rest = realbed.build_realbed(out, config=cfg, stages=("sft",), progress=False)
    assert rest.finished and rest.done["sft"]["steps"] == 6   # 12 examples / batch 4 x 2 epochs
    assert [h["step"] for h in json.loads((out / "sft" / "checkpoint" / "state.json").read_text())["history"]] \
        == list(range(1, 7))


def test_an_unfinished_stage_started_with_other_settings_restarts(model_dir, tmp_path, monkeypatch):
    cfg = bed_config(model_dir)
    out = tmp_path / "run"
    # the budget runs out once the CLT has written its first checkpoint (after its first slice)
    monkeypatch.setattr(realbed._Budget, "spent", lambda self: (out / "clt" / "checkpoint" / "state.json").exists())
    part = realbed.build_realbed(out, config=cfg, stages=("clt",), time_budget_s=10, progress=False)
    assert set(part.done) == {"distill", "sft"} and (out / "clt" / "checkpoint" / "state.json").exists()
    monkeypatch.undo()
    cfg.clt = CLTTrainConfig.from_dict({**cfg.clt.to_dict(), "lr": cfg.clt.lr / 2})
    bed = realbed.build_realbed(out, config=cfg, stages=("clt",), progress=False)   # no "different config" error
    assert bed.finished and bed.done["clt"]["train_tokens"] == cfg.clt.total_tokens


def test_clear_errors(model_dir, tmp_path):
    with pytest.raises(RealbedError, match="unknown realbed size 'huge'"):
        RealbedConfig.preset("huge")
    with pytest.raises(RealbedError, match="unknown realbed stage"):
        realbed.build_realbed(tmp_path / "x", config=bed_config(model_dir), stages=("distil",))
    with pytest.raises(RealbedError, match="not a realbed directory"):
        realbed.read_status(tmp_path)
    bed = realbed.Realbed(tmp_path, bed_config(model_dir))
    with pytest.raises(RealbedError, match="stage 'sft' is not finished"):
        bed.load()
    with pytest.raises(RealbedError, match="no finished realbed"):
        realbed.load_realbed(tmp_path / "none", build_if_missing=False)
    with pytest.raises(RealbedError, match="unknown RealbedConfig fields"):
        RealbedConfig.from_dict({"bogus": 1})
    cfg = RealbedConfig.preset("tiny", seed=3)
    assert RealbedConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()
    assert cfg.safety.seed == cfg.clt.seed == 3


def test_benchmark_report_reads_a_build(built):
    bench = _benchmark("bench_realbed")
    out, bed = built
    rec = bench.collect(realbed.read_status(out))
    assert rec["unfinished"] == ["ablation"] and set(rec["stages"]) == set(realbed.DEFAULT_STAGES)
    t = rec["targets"]
    assert t["refusal_heldout_harmful"]["value"] == rec["tuned"]["summary"]["refusal_heldout_harmful"]
    assert t["clt_nmse_mean"]["value"] == bed.done["clt"]["nmse_mean"]
    assert t["clt_nmse_mean"]["met"] == (bed.done["clt"]["nmse_mean"] <= 0.25)
    md = bench.render({"command": "x", "size": "test", "seed": 0, "machine": "m", "threads": 1, "wall_seconds": 1.0,
                       "finished": True, "config": bed.config.to_dict(), **rec})
    assert "| clt_nmse_mean | <= 0.25 |" in md and "Paired exact McNemar" in md and "Graphs (extended" in md


def test_overrefusal_benchmark_records_every_pool_for_both_models(built, tmp_path, monkeypatch):
    bench = _benchmark("bench_overrefusal_splits")
    out, bed = built
    extra = tmp_path / "mine.jsonl"
    extra.write_text('{"prompt": "Name a colour."}\n{"prompt": "Count to three."}\n')
    rec = bench.main(["--out", str(out), "--size", "tiny", "--tokens", "4", "--models", "base", "tuned",
                      "--extra", str(extra), "--results", str(tmp_path / "res")])
    sp = safety.make_splits(bed.config.safety)
    n_meas = bed.config.measure.n_benign
    sizes = {"alpaca validation": len(sp.benign_val), f"alpaca test[:{n_meas}] (measured)": n_meas,
             f"alpaca test[{n_meas}:] (never read)": len(sp.benign_test) - n_meas, str(extra): 2}
    sizes = {k: v for k, v in sizes.items() if v}
    assert [(r["model"], r["pool"], r["n"]) for r in rec["rows"]] == \
        [(m, p, n) for m in ("base", "tuned") for p, n in sizes.items()]
    assert all(0 <= r["refused"] <= r["n"] and r["ci95"][0] <= r["rate"] <= r["ci95"][1] for r in rec["rows"])
    assert all(len(r["refused_index"]) == r["refused"] and all(0 <= i < r["n"] for i in r["refused_index"])
               for r in rec["rows"])
    md = (tmp_path / "res" / "overrefusal_tiny_seed0.md").read_text()
    assert md.count("| tuned |") == len(sizes) and json.loads((tmp_path / "res" / "overrefusal_tiny_seed0.json")
                                                                 .read_text())["rows"] == rec["rows"]
    only = bench.main(["--out", str(out), "--size", "tiny", "--tokens", "4", "--extra", str(extra), "--skip-alpaca",
                       "--results", ""])
    assert [(r["model"], r["pool"]) for r in only["rows"]] == [("tuned", str(extra))]
    # a variant model: the build's own tuned model under another name scores what "tuned" scores, and its record
    # does not overwrite the build's
    var = bench.main(["--out", str(out), "--size", "tiny", "--tokens", "4", "--extra", str(extra), "--models",
                      "--variant", "again", str(out / "sft" / "model"), "--results", str(tmp_path / "res")])
    assert [{**r, "model": "tuned"} for r in var["rows"]] == [r for r in rec["rows"] if r["model"] == "tuned"]
    assert (tmp_path / "res" / "overrefusal_tiny_seed0_again.json").exists()
    assert json.loads((tmp_path / "res" / "overrefusal_tiny_seed0.json").read_text())["rows"] == rec["rows"]
    with pytest.raises(SystemExit, match="no model in"):
        bench.main(["--out", str(out), "--size", "tiny", "--variant", "x", str(tmp_path), "--results", ""])
    # the refused prompts are recorded by position in their pool

    class EveryOther:
        def is_refusal(self, answer):
            self.n = getattr(self, "n", -1) + 1
            return self.n % 2 == 1
    monkeypatch.setattr(bench, "RefusalDetector", EveryOther)
    three = tmp_path / "three.jsonl"
    three.write_text('{"prompt": "Name a colour."}\n{"prompt": "Count to three."}\n{"prompt": "Say hi."}\n')
    odd = bench.main(["--out", str(out), "--size", "tiny", "--tokens", "4", "--extra", str(three), "--skip-alpaca",
                      "--results", ""])
    assert [(r["refused"], r["refused_index"]) for r in odd["rows"]] == [(1, [1])]


def test_overrefusal_benchmark_leaves_trained_contrast_prompts_out(built, tmp_path, monkeypatch):
    import dataclasses
    bench = _benchmark("bench_overrefusal_splits")
    out, _ = built
    extra = tmp_path / "mine.jsonl"
    extra.write_text('{"prompt": "Name a colour."}\n{"prompt": "Count to three."}\n')
    real = safety.make_splits
    monkeypatch.setattr(safety, "make_splits",
                        lambda cfg: dataclasses.replace(real(cfg), contrast_train=["name a colour"]))
    rec = bench.main(["--out", str(out), "--size", "tiny", "--tokens", "4", "--extra", str(extra), "--skip-alpaca",
                      "--results", ""])
    assert [(r["pool"], r["n"]) for r in rec["rows"]] == [(f"{extra} (held-out contrast)", 1)]


def test_clt_probe_benchmark_trains_reproducibly_on_cached_activations(built, tmp_path):
    from crafttrace.runs import read_tensors
    bench = _benchmark("bench_clt_probe")
    out, bed = built
    cache = tmp_path / "cache"
    with pytest.raises(SystemExit, match="no activation cache"):
        bench.main(["run", "x", "{}", "--cache", str(cache), "--threads", "1"])
    bench.main(["collect", "--out", str(out), "--chunks", "2", "--cache", str(cache), "--threads", "1"])
    chunk = read_tensors(cache / "chunk0.safetensors")
    meta = json.loads((cache / "cache.json").read_text())
    share = meta["input_mean_share"]
    assert len(share) == chunk["x"].shape[1] and all(0 <= v <= 1 for v in share)
    assert chunk["x"].dtype == torch.float16 and chunk["x"].shape == chunk["y"].shape
    assert len(chunk["x"]) == bed.config.clt.chunk_tokens and (cache / "chunk1.safetensors").exists()
    args = ["run", "p", '{"lr": 0.01}', "--steps", "3", "--cache", str(cache), "--threads", "1"]
    first, again = bench.main(args), bench.main(args)
    assert [r["step"] for r in first["rows"]] == [0, 3]
    assert first["rows"][1]["tokens"] == 3 * meta["clt"]["batch_tokens"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds_per_step"} for r in rows]
    assert strip(first["rows"]) == strip(again["rows"])            # same cache, same seed: same numbers
    rec = tmp_path / "probes.json"
    bench.main(args + ["--record", str(rec)])
    bench.main(args[:1] + ["q"] + args[2:] + ["--record", str(rec), "--chunks", "1"])
    bench.main(args + ["--record", str(rec)])                     # the same name again replaces its entry
    runs = json.loads(rec.read_text())
    assert [(r["name"], r["chunks"]) for r in runs] == [("q", 1), ("p", 2)] and "--chunks 1" in runs[0]["command"]
    with pytest.raises(SystemExit, match="--chunks must be in"):
        bench.main(args + ["--chunks", "3"])
    assert first["rows"][1]["eval_nmse"] < first["rows"][0]["eval_nmse"]

    # the init variants do what they say on the first chunk
    cfg = bench.CLTTrainConfig.from_dict(meta["clt"])
    x0, y0 = chunk["x"].float(), chunk["y"].float()
    tr = bench._Trainer(x0.shape[1], x0.shape[2], cfg)
    tr.initialise_from(x0, y0)
    bench._init(tr, "centred", x0, y0)
    with torch.no_grad():
        pre = tr.clt.pre_activations(x0 / tr.in_scale[:, None])
    assert pre.mean(0).abs().max() < 1e-3 * pre.std()
    bench._init(tr, "data", x0, y0)
    enc_norms = tr.clt.W_enc.norm(dim=-1)
    assert torch.allclose(enc_norms, torch.ones_like(enc_norms), atol=1e-4) and torch.all(tr.clt.b_enc == 0)


def test_sft_variant_benchmark_appends_extra_prompts_and_merges_at_one_scale(built, tmp_path, monkeypatch, capsys):
    """bench_sft_variant on a build: the extra benign prompts are distilled after the build's cached answers, and
    a single merge scale skips calibration and says which scale it merged at (it used to crash there)."""
    bench = _benchmark("bench_sft_variant")
    out, _ = built
    real_prompts = data.prompts
    extra = ["Name a colour.", "Count to three.", "Spell the word cat."]
    monkeypatch.setattr(data, "prompts", lambda name, split=None: list(extra) if name == "test_extra"
                        else real_prompts(name, split=split))
    run = tmp_path / "variant"
    overrides = {"merge_scales": [0.5], "extra_benign_pool": "test_extra", "n_extra_benign": 2}
    m = bench.main(["x", json.dumps(overrides), "--source", str(out), "--out", str(run), "--threads", "1"])
    assert m["merge_scale"] == 0.5 and "calibration" not in m
    assert "merged at scale 0.5" in capsys.readouterr().out
    before, recs = data.read_records(out / "sft" / "distill.jsonl"), data.read_records(run / "distill.jsonl")
    assert recs[:len(before)] == before and [r["prompt"] for r in recs[len(before):]] == \
        safety.make_splits(SafetyConfig.from_pretrained(run / safety.MODEL_DIR)).extra_train
    assert (run / safety.MODEL_DIR / "config.json").exists()
    with pytest.raises(SystemExit, match="change the benign training prompts"):
        bench.main(["y", '{"n_benign_train": 5}', "--source", str(out), "--out", str(tmp_path / "y")])
    # --measure-only writes rates and refused positions, never the excerpts measure_behaviour keeps
    flags = {"harmbench": [True, False, True], "strongreject": [False, True], "alpaca_test": [False, False, True, False]}
    fake = {p: {"rate": sum(f) / len(f), "k": sum(f), "n": len(f), "refused": f, "excerpts": ["SECRET"]}
            for p, f in flags.items()}
    fake["summary"] = {"refusal_heldout_harmful": 3 / 5, "over_refusal_benign": 0.25, "mmlu": 0.3, "n_mmlu": 10,
                       "boundary_strict": 1, "boundary_extended": 2, "seconds": {}}
    monkeypatch.setattr(realbed, "measure_behaviour", lambda *a, **k: fake)
    s = bench.main(["x", "{}", "--source", str(out), "--out", str(run), "--measure-only", "--results", str(tmp_path)])
    assert s["over_refusal_benign"] == 0.25
    rec = json.loads((tmp_path / "sft_variant_default_seed0_x.json").read_text())
    assert rec["merge_scale"] == 0.5 and rec["pools"]["harmbench"]["refused_index"] == [0, 2]
    assert rec["pools"]["alpaca_test"] == {"rate": 0.25, "k": 1, "n": 4, "refused_index": [2]}
    md = (tmp_path / "sft_variant_default_seed0_x.md").read_text()
    assert "SECRET" not in json.dumps(rec) + md and "| over-refusal, AlpacaEval test[:100] | 0.250 (1/4) |" in md


def test_ablation_variant_benchmark_overrides_the_stage_config_and_copies_its_records(built, tmp_path, monkeypatch):
    """bench_realbed_ablation: the build's ablation config with the overrides on top, the build's held-out passages
    for the language-modelling check, its own run directory (the stage's ablation/ untouched), records copied."""
    import crafttrace.ablation as ablation
    bench = _benchmark("bench_realbed_ablation")
    out, bed = built
    seen = {}

    def fake_run(loaded, clt, cfg, run_dir, cache_key, progress, ppl_texts):
        seen.update(cfg=cfg, run_dir=run_dir, cache_key=cache_key, ppl_texts=ppl_texts)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "ablation.md").write_text("table")
        (run_dir / "ranking.json").write_text("{}")
        return {"n_rank_prompts": 3, "n_eval_boundary": 4}

    monkeypatch.setattr(ablation, "run_ablation", fake_run)
    rec = bench.main(["loose", '{"min_refuse": 0.1, "n_plain": 3}', "--out", str(out), "--threads", "1",
                      "--size", "small", "--results", str(tmp_path)])
    stage = realbed.ablation_config(bed.config)
    cfg = seen["cfg"]
    assert (cfg.min_refuse, cfg.n_plain) == (0.1, 3) and (stage.min_refuse, stage.n_plain) != (0.1, 3)
    assert cfg.min_comply == stage.min_comply and cfg.boundary_pool == bed.config.measure.boundary_pool
    assert seen["ppl_texts"] == realbed.heldout_passages(bed.config)
    assert seen["run_dir"] == out / "ablation_variants" / "loose" and not (out / "ablation").exists()
    assert seen["cache_key"] == realbed.ablation_cache_key(bed.config)
    dest = tmp_path / "ablation_test_seed0_loose"     # the build's size, not --size
    assert (dest / "ablation.md").read_text() == "table" and (dest / "ranking.json").exists()
    saved = json.loads((dest / "variant.json").read_text())
    assert saved["overrides"] == {"min_refuse": 0.1, "n_plain": 3} and saved["n_eval_boundary"] == 4 == rec["n_eval_boundary"]
    with pytest.raises(ValueError, match=r"unknown ablation config keys: \['min_refus'\]"):
        bench.main(["x", '{"min_refus": 0.1}', "--out", str(out), "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="JSON object"):
        bench.main(["x", "[0.1]", "--out", str(out), "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="letters, digits"):
        bench.main(["../x", "{}", "--out", str(out), "--results", str(tmp_path)])


def test_template_feature_picks_follow_the_cv_threshold():
    """inspect_template_features: each mode's first eligible feature at or above the threshold, from ranking rows."""
    bench = _benchmark("inspect_template_features")

    def row(layer, index, cv, rank, eligible=True):
        return {"layer": layer, "index": index, "eligible": eligible, "activation_cv": cv,
                **{f"rank_{m}": rank for m in ("activation_cross_group", "activation_boundary",
                                               "influence_cross_group", "influence_boundary")}}

    doc = {"features": [row(0, 1, 0.0, 0), row(3, 2, 0.04, 1), row(9, 3, 0.27, 2), row(5, 5, 0.9, 3, False)]}
    got = bench.picks(doc, (0.0, 0.03, 0.05, 0.3))
    assert [got[t]["influence_boundary"] for t in (0.0, 0.03, 0.05, 0.3)] == \
        [(0, 1, 0.0), (3, 2, 0.04), (9, 3, 0.27), None]
    with pytest.raises(SystemExit, match="predates activation_cv"):
        bench.picks({"features": [{"eligible": True}]})


def test_refusal_ceiling_oracle_column_and_probe_rows():
    bench = _benchmark("bench_refusal_ceiling")
    h = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])
    b = torch.tensor([0.0, 1.5, 2.5, 3.5, 6.0])
    # flagging >= 0.8 of harmful needs the threshold at 2.0 (4 of 5): benign 2.5, 3.5, 6.0 are at or above it
    assert bench.oracle_benign_rate(h, b, 0.8) == pytest.approx(0.6)
    assert bench.oracle_benign_rate(h, b, 0.2) == pytest.approx(0.2)   # threshold 5.0: only 6.0
    assert bench.oracle_benign_rate(h, b, 1.0) == pytest.approx(0.8)   # threshold 1.0
    # a direction that separates the training sets: every rate follows; a useless layer sits near chance
    g = torch.Generator().manual_seed(0)

    def pts(n, sign):
        x = torch.randn(n, 2, 4, generator=g)
        x[:, 0, 0] += 4.0 * sign   # layer 0 carries the label, layer 1 does not
        return x
    states = {"train_harmful:p": pts(60, 1), "train_benign": pts(60, -1), "val_harmful": pts(40, 1),
              "val_benign": pts(40, -1), "test_harmful": pts(40, 1), "test_benign": pts(40, -1),
              "test_benign_all": pts(80, -1)}
    rows = bench.probe_rows(states, "train_harmful:p", [3, 7], fpr=0.1, l2=1e-2, n_hb=20, tpr=0.8)
    assert [r["layer"] for r in rows] == [3, 7]
    sep, noise = rows
    assert sep["val_auroc"] > 0.99 and sep["test_harmful_flagged"] > 0.95 and sep["oracle_benign_flagged"] == 0.0
    assert sep["oracle_benign_flagged_all"] == 0.0
    assert 0.2 < noise["test_auroc"] < 0.8 and noise["oracle_benign_flagged_all"] > 0.3


def test_sft_frontier_pools_both_test_halves_and_flags_the_target(tmp_path):
    """plot_sft_frontier: refusal from the measure records, over-refusal summed over both AlpacaEval test halves
    (k/n, not a mean of rates), the target checked on those sums; a variant lacking a record is listed, not drawn."""
    bench = _benchmark("plot_sft_frontier")

    def summary(rate, n=200):
        return {"refusal_heldout_harmful": rate, "n_heldout_harmful": n, "boundary_extended": 5}

    (tmp_path / "realbed_default_seed0.json").write_text(json.dumps(
        {"base": {"summary": summary(0.1)}, "tuned": {"summary": summary(0.805)}, "sft": {"merge_scale": 0.9}}))

    def rows(model, measured, unread, n_unread=100):
        return [{"model": model, "pool": "alpaca test[:100] (measured)", "tokens": 48, "refused": measured, "n": 100},
                {"model": model, "pool": "alpaca test[100:] (never read)", "tokens": 48, "refused": unread,
                 "n": n_unread},
                {"model": model, "pool": "alpaca validation", "tokens": 48, "refused": 0, "n": 93},
                {"model": model, "pool": "alpaca test[:100] (measured)", "tokens": 24, "refused": 99, "n": 100}]

    (tmp_path / "overrefusal_default_seed0.json").write_text(json.dumps(
        {"rows": rows("base", 2, 8) + rows("tuned", 16, 10)}))
    (tmp_path / "overrefusal_default_seed0_good.json").write_text(json.dumps({"rows": rows("good", 12, 7, 90)}))
    # an older record's "tuned" rows describe the build current then: skipped, the build's own record counts
    (tmp_path / "overrefusal_default_seed0_old.json").write_text(json.dumps({"rows": rows("tuned", 30, 30)}))

    def variant(name, hb, sr):
        (tmp_path / f"sft_variant_default_seed0_{name}.json").write_text(json.dumps(
            {"merge_scale": 1.3, "summary": {"boundary_extended": 21},
             "pools": {"harmbench": {"k": hb, "n": 100}, "strongreject": {"k": sr, "n": 100}}}))

    variant("good", 80, 81)
    variant("lonely", 90, 90)
    rec = bench.main(["--results", str(tmp_path)])
    pts = {p["name"]: p for p in rec["points"]}
    assert set(pts) == {"base", "build", "good"} and rec["missing"][0].startswith("lonely")
    assert (pts["build"]["over_refusal_k"], pts["build"]["over_refusal_n"], pts["build"]["meets_target"]) == \
        (26, 200, False)
    good = pts["good"]
    assert (good["refusal_k"], good["over_refusal_k"], good["over_refusal_n"]) == (161, 19, 190)
    assert good["meets_target"] and good["over_refusal_measured"] == 0.12
    assert good["over_refusal_ci95"][0] < 0.1 < good["over_refusal_ci95"][1]
    md = (tmp_path / "sft_frontier_default_seed0.md").read_text()
    assert "| good | 1.3 | 0.805" in md and "Not drawn: lonely" in md
    assert (tmp_path / "sft_frontier_default_seed0.png").stat().st_size > 1000
    # the same name measured twice with different counts is two models under one name: refused
    (tmp_path / "overrefusal_default_seed0_good2.json").write_text(json.dumps({"rows": rows("good", 11, 7, 90)}))
    with pytest.raises(SystemExit, match="two models share a name"):
        bench.main(["--results", str(tmp_path)])
