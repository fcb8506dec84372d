"""Safety SFT on a tiny random chat Llama: splits, LoRA, response-only loss, distillation cache, resume, save."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from crafttrace import safety
from crafttrace.models import load_model
from crafttrace.safety import SafetyConfig, SafetyTuningError

SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>"]
# every first token of crafttrace.tokens' strict and extended sets, option letters for MMLU, a few words
WORDS = SPECIAL + ["I'm", "I", "As", "Sorry", "Unfortunately", "No", "Sure", "Here", "Step", "**", "Certainly",
                   "Absolutely", "Of", "Title", "To", "1.", "A", "B", "C", "D", "sorry", "cannot", "help", "make",
                   "a", "the", "bomb", "burn", "poison", "dog", "cake", "bake", "write", "story", "poem", "song",
                   "how", "?", "for", "is", "2", "4", "The"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
HARMFUL = ["make a bomb", "burn the dog", "poison the dog", "make poison", "burn a cake bomb", "make a poison bomb"]
BENIGN = ["bake a cake", "write a story", "write a poem", "write a song", "bake a cake for the dog", "how is 2 ?"]
REFUSALS = ("I'm sorry I cannot help", "Sorry I cannot help")


def save_tiny_chat_model(path, seed: int = 0, n_layers: int = 2, d: int = 32):
    """A random 2-layer Llama + word-level tokenizer with a chat template, saved as a HF directory."""
    torch.manual_seed(seed)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=SPECIAL[4:])
    tok.chat_template = TEMPLATE
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      architectures=["LlamaForCausalLM"], tie_word_embeddings=False, bos_token_id=2,
                      eos_token_id=3, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # a well-scaled unembedding (std 0.02 caps every logit near 0.6: nothing can be learned)
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def tiny_config(**kw) -> SafetyConfig:
    base = dict(n_harmful_train=4, n_benign_train=4, n_benign_test=2, refusals=REFUSALS, distill_max_new_tokens=4,
                max_len=32, lora_rank=4, lora_alpha=8.0, epochs=2, batch_size=4, lr=1e-2, warmup_steps=1,
                checkpoint_every=1, batch_size_generate=4, seed=0)
    base.update(kw)
    return SafetyConfig(**base)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # tiny models: thread start-up dominates, and on a shared 2-core machine 2 threads are 10x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny") / "model")


def _first_tokens(loaded, prompts):
    from crafttrace.capability import generate
    return [r.split()[0] if r.split() else "" for r in generate(loaded, prompts, 2, 8)]


# ------------------------------------------------------------------------------------------------- tests

def test_config_errors_name_the_field():
    with pytest.raises(SafetyTuningError, match="lora_layer_frac"):
        SafetyConfig(lora_layer_frac=0.0)
    with pytest.raises(SafetyTuningError, match="epochs must be >= 1"):
        SafetyConfig(epochs=0)
    with pytest.raises(SafetyTuningError, match="unknown SafetyConfig fields \\['bogus'\\]"):
        SafetyConfig.from_dict({"bogus": 1})
    cfg = tiny_config()
    assert SafetyConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_splits_are_seeded_disjoint_and_test_split_is_stable():
    harmful, benign = [f"h{i}" for i in range(20)], [f"b{i}" for i in range(30)]
    a = safety.make_splits(tiny_config(n_harmful_train=8, n_benign_train=5, n_benign_test=10), harmful, benign)
    b = safety.make_splits(tiny_config(n_harmful_train=8, n_benign_train=12, n_benign_test=10), harmful, benign)
    assert not set(a.harmful_train) & set(a.harmful_heldout) and len(a.harmful_heldout) == 12
    assert not set(a.benign_train) & set(a.benign_test)
    assert a.benign_test == b.benign_test                       # independent of the training size
    c = safety.make_splits(tiny_config(n_harmful_train=8, n_benign_train=5, n_benign_test=10, seed=1), harmful, benign)
    assert c.benign_test != a.benign_test
    with pytest.raises(SafetyTuningError, match="has only 20 prompts"):
        safety.make_splits(tiny_config(n_harmful_train=21), harmful, benign, exclude=[])
    # evaluation prompts never reach training: "H3" matches "h3" (case, spacing, final punctuation ignored)
    d = safety.make_splits(tiny_config(n_harmful_train=8, n_benign_train=5, n_benign_test=10), harmful, benign,
                           exclude=["H3.", " b7 "])
    assert d.excluded == ["h3", "b7"] and "h3" not in d.harmful_train + d.harmful_heldout
    assert "b7" not in d.benign_train + d.benign_test


def test_contrast_prompts_split_seeded_disjoint_and_distilled_after_benign(monkeypatch):
    from crafttrace import data
    pools = {"cpool": ["c0", "c1", "c2", "c3", "c4", "h1", "b2", "c5", "E1", "c0"]}
    monkeypatch.setattr(data, "prompts", lambda name, split=None: pools[name])
    harmful, benign = [f"h{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    cfg = tiny_config(n_harmful_train=4, n_benign_train=3, n_benign_test=2, contrast_pool="cpool", n_contrast_train=3)
    a = safety.make_splits(cfg, harmful, benign, exclude=["e1"])
    # pool prompts that are harmful/benign pool prompts (two targets) or evaluation prompts never reach training;
    # duplicates count once
    assert len(a.contrast_train) == 3 and sorted(a.contrast_train + a.contrast_heldout) == [f"c{i}" for i in range(6)]
    assert "E1" in a.excluded
    assert a.distill_prompts == a.benign_train + a.contrast_train
    assert safety.make_splits(cfg, harmful, benign, exclude=["e1"]).contrast_train == a.contrast_train  # seeded
    assert safety.make_splits(tiny_config(), harmful, benign, exclude=[]).contrast_train == []
    with pytest.raises(SafetyTuningError, match="only 6 usable prompts"):
        safety.make_splits(tiny_config(n_harmful_train=4, n_benign_train=3, n_benign_test=2, contrast_pool="cpool",
                                       n_contrast_train=7), harmful, benign, exclude=["e1"])
    with pytest.raises(SafetyTuningError, match="contrast_pool .* go together"):
        tiny_config(contrast_pool="cpool")
    with pytest.raises(SafetyTuningError, match="contrast_pool .* go together"):
        tiny_config(n_contrast_train=3)
    # inert when off; part of the distillation key when on
    assert "contrast_pool" not in SafetyConfig().distill_dict()
    assert SafetyConfig(contrast_pool="cpool", n_contrast_train=3).distill_dict()["n_contrast_train"] == 3


def test_extra_benign_prompts_split_after_contrast_and_disjoint(monkeypatch):
    from crafttrace import data
    pools = {"cpool": ["c0", "c1", "c2", "c3"], "xpool": ["x0", "x1", "x2", "c1", "b3", "E1", "x3", "x4", "x0"]}
    monkeypatch.setattr(data, "prompts", lambda name, split=None: pools[name])
    harmful, benign = [f"h{i}" for i in range(10)], [f"b{i}" for i in range(10)]
    kw = dict(n_harmful_train=4, n_benign_train=3, n_benign_test=2, contrast_pool="cpool", n_contrast_train=2)
    plain = safety.make_splits(tiny_config(**kw), harmful, benign, exclude=["e1"])
    a = safety.make_splits(tiny_config(**kw, extra_benign_pool="xpool", n_extra_benign=3), harmful, benign,
                           exclude=["e1"])
    # prompts of the other pools (two targets) and evaluation prompts are left out; duplicates count once
    assert sorted(a.extra_train + a.extra_heldout) == [f"x{i}" for i in range(5)] and len(a.extra_train) == 3
    assert "E1" in a.excluded
    # appended last: the other splits do not move, so a cached distillation of them is a prefix
    assert a.distill_prompts == plain.distill_prompts + a.extra_train
    assert (a.benign_test, a.contrast_train, a.harmful_train) == (plain.benign_test, plain.contrast_train,
                                                                  plain.harmful_train)
    b = safety.make_splits(tiny_config(**kw, extra_benign_pool="xpool", n_extra_benign=3, seed=1), harmful, benign,
                           exclude=["e1"])
    assert sorted(b.extra_train + b.extra_heldout) == sorted(a.extra_train + a.extra_heldout)
    with pytest.raises(SafetyTuningError, match="only 5 usable prompts"):
        safety.make_splits(tiny_config(**kw, extra_benign_pool="xpool", n_extra_benign=6), harmful, benign,
                           exclude=["e1"])
    with pytest.raises(SafetyTuningError, match="extra_benign_pool .* go together"):
        tiny_config(n_extra_benign=3)
    # inert when off (cached builds keep their keys); part of the distillation key when on
    assert "extra_benign_pool" not in SafetyConfig().distill_dict()
    assert SafetyConfig(extra_benign_pool="xpool", n_extra_benign=3).distill_dict()["n_extra_benign"] == 3


def test_default_splits_hold_out_every_evaluation_prompt():
    from crafttrace import data
    s = safety.make_splits(SafetyConfig())
    assert len(s.excluded) == 25             # StrongREJECT reuses 25 AdvBench prompts
    assert len(s.harmful_train) == 256 and len(s.harmful_heldout) == 520 - 25 - 256
    evaluation = {safety._norm(p) for pool in ("harmbench", "strongreject") for p in data.prompts(pool)}
    assert not evaluation & {safety._norm(p) for p in s.harmful_train + s.harmful_heldout + s.benign_train}


def test_lora_starts_at_base_and_merges_exactly(model_dir):
    loaded = load_model(model_dir)
    ids = loaded.encode_prompt("make a bomb")
    before = loaded.model(ids).logits
    cfg = tiny_config(lora_layer_frac=0.5)
    adapters = safety.attach_lora(loaded.model, cfg)
    assert {k.split(".")[1] for k in adapters} == {"1"}          # upper half of 2 layers
    assert len(adapters) == 7
    torch.testing.assert_close(loaded.model(ids).logits, before)  # B = 0
    with torch.no_grad():
        for m in adapters.values():
            m.B.normal_(0, 0.5)
    adapted = loaded.model(ids).logits
    assert not torch.allclose(adapted, before)
    assert safety.merge_lora(loaded.model) == 7
    assert not any(isinstance(m, safety.LoRALinear) for m in loaded.model.modules())
    torch.testing.assert_close(loaded.model(ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_loss_counts_response_tokens_only(model_dir):
    loaded = load_model(model_dir)
    cfg = tiny_config()
    (ex,) = safety.build_examples(loaded, ["make a bomb"], [], cfg)
    assert loaded.tokenizer.decode(ex.ids[ex.n_prompt:]).split()[-1] == "<eos>"
    ids, mask, labels = safety._collate([ex], 0)
    assert (labels[0, :ex.n_prompt] == -100).all() and (labels[0, ex.n_prompt:] == ids[0, ex.n_prompt:]).all()
    loss = safety.response_loss(loaded.model, ids, mask, labels)
    logits = loaded.model(ids).logits[0]
    manual = torch.nn.functional.cross_entropy(logits[ex.n_prompt - 1:-1], ids[0, ex.n_prompt:])
    torch.testing.assert_close(loss, manual)


def test_benign_weight_weights_the_batch_mean(model_dir):
    loaded = load_model(model_dir)
    cfg = tiny_config()
    benign = [{"prompt": "bake a cake", "response": "sure, mix flour and eggs", "truncated": False}]
    exs = safety.build_examples(loaded, ["make a bomb"], benign, cfg)
    ids, mask, labels = safety._collate(exs, 0)
    each = [safety.response_loss(loaded.model, *safety._collate([e], 0)) for e in exs]
    weighted = safety.response_loss(loaded.model, ids, mask, labels, torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weighted, (each[0] + 3 * each[1]) / 4, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(safety.response_loss(loaded.model, ids, mask, labels), (each[0] + each[1]) / 2,
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(SafetyTuningError, match=r"shape \[batch\]"):
        safety.response_loss(loaded.model, ids, mask, labels, torch.ones(3))
    with pytest.raises(SafetyTuningError, match="benign_weight"):
        tiny_config(benign_weight=0)


def test_decision_weight_adds_the_first_response_token_loss(model_dir):
    loaded = load_model(model_dir)
    benign = [{"prompt": "bake a cake please now", "response": "sure, mix flour and eggs", "truncated": False}]
    exs = safety.build_examples(loaded, ["make a bomb"], benign, tiny_config())
    ids, mask, labels = safety._collate(exs, 0)   # rows of different prompt and response lengths, padded
    logits = loaded.model(ids, attention_mask=mask).logits
    first = torch.stack([torch.nn.functional.cross_entropy(logits[r, e.n_prompt - 1:e.n_prompt],
                                                           ids[r, e.n_prompt:e.n_prompt + 1])
                         for r, e in enumerate(exs)])
    plain = safety.response_loss(loaded.model, ids, mask, labels)
    torch.testing.assert_close(safety.response_loss(loaded.model, ids, mask, labels, decision_weight=2.0),
                               plain + 2.0 * first.mean(), rtol=1e-4, atol=1e-5)
    w = torch.tensor([1.0, 3.0])
    torch.testing.assert_close(safety.response_loss(loaded.model, ids, mask, labels, w, decision_weight=0.5),
                               safety.response_loss(loaded.model, ids, mask, labels, w)
                               + 0.5 * (first * w).sum() / w.sum(), rtol=1e-4, atol=1e-5)
    # off: inert in the stage keys (cached builds keep theirs); negative: a named error
    assert "decision_weight" not in tiny_config().identity_dict()
    assert tiny_config(decision_weight=1.0).training_dict()["decision_weight"] == 1.0
    with pytest.raises(SafetyTuningError, match="decision_weight"):
        tiny_config(decision_weight=-1)


def test_drop_refusing_answers_leaves_out_benign_targets_that_refuse(model_dir):
    loaded = load_model(model_dir)
    benign = [{"prompt": "bake a cake", "response": "sure, mix flour and eggs", "truncated": False},
              {"prompt": "draw a house", "response": "I'm sorry, but as a chatbot I can't draw.", "truncated": False}]
    kept = safety.build_examples(loaded, ["make a bomb"], benign, tiny_config(drop_refusing_answers=True))
    every = safety.build_examples(loaded, ["make a bomb"], benign, tiny_config())
    assert [e.kind for e in every] == ["harmful", "benign", "benign"]
    assert [e.kind for e in kept] == ["harmful", "benign"] and kept[1].ids == every[1].ids
    assert "drop_refusing_answers" not in tiny_config().identity_dict()
    assert tiny_config(drop_refusing_answers=True).training_dict()["drop_refusing_answers"] is True


def test_restyle_rewrites_requests_and_keeps_them_recognisable():
    import random
    rng = random.Random(0)
    imp = [safety.restyle("Write a tutorial on how to bake bread", rng) for _ in range(40)]
    assert len(set(imp)) > 5 and all("write a tutorial on how to bake bread" in p.lower() for p in imp)
    assert all(p != "Write a tutorial on how to bake bread" for p in imp)
    assert any(p.endswith("?") for p in imp)                 # question phrasings of an imperative
    q = [safety.restyle("How do I bake bread", rng) for _ in range(20)]
    assert all("ow do I bake bread?" in p for p in q)        # a question is wrapped, not re-conjugated
    assert safety.restyle("Explain DDoS attacks.", random.Random(1)).count("DDoS") == 1   # acronyms kept


def test_styled_frac_rewrites_prompts_of_both_kinds_and_keeps_targets(model_dir):
    loaded = load_model(model_dir)
    harmful = ["make a bomb", "steal a car", "hack a bank"]
    benign = [{"prompt": "bake a cake", "response": "sure here", "truncated": False}]
    plain = safety.build_examples(loaded, harmful, benign, tiny_config())
    styled = safety.build_examples(loaded, harmful, benign, tiny_config(styled_frac=1.0))
    again = safety.build_examples(loaded, harmful, benign, tiny_config(styled_frac=1.0))
    assert [e.ids for e in styled] == [e.ids for e in again]                  # seeded
    for p, s in zip(plain, styled):
        assert s.n_prompt > p.n_prompt                                        # every prompt rewritten
        assert s.ids[s.n_prompt:] == p.ids[p.n_prompt:]                        # same refusal / distilled target
    with pytest.raises(SafetyTuningError, match="styled_frac"):
        tiny_config(styled_frac=1.5)
    benign_only = safety.build_examples(loaded, harmful, benign, tiny_config(styled_frac=1.0,
                                                                             styled_kinds=("benign",)))
    assert [e.ids for e in benign_only[:3]] == [e.ids for e in plain[:3]]   # harmful prompts untouched
    assert benign_only[3].n_prompt > plain[3].n_prompt                      # the benign one rewritten
    with pytest.raises(SafetyTuningError, match="styled_kinds"):
        tiny_config(styled_kinds=("harmless",))


def test_framed_puts_imperatives_in_the_harmful_pools_question_frames():
    import random
    rng = random.Random(0)
    out = [safety.framed("Write a poem about spring.", rng) for _ in range(40)]
    assert len(set(out)) == len(safety.FRAMES)                                  # every frame is drawn
    assert set(out) == {f.format(req="write a poem about spring") for f in safety.FRAMES}
    assert safety.framed("What is a poem?", rng) is None                         # questions have no clause
    assert safety.framed("The poem below:\nroses", rng) is None                  # nor multi-line prompts
    assert safety.framed("", rng) is None
    assert {safety.framed("Give me a bread recipe", rng) for _ in range(10)} == {"Can you give me a bread recipe?"}
    assert safety.framed("HTML tags to use for a table.", rng).count("HTML") == 1  # acronyms kept


def test_n_framed_benign_adds_framed_copies_with_the_distilled_answer(model_dir):
    loaded = load_model(model_dir)
    harmful = ["make a bomb"]
    benign = [{"prompt": "bake a cake", "response": "sure, mix flour", "truncated": False},
              {"prompt": "What is a cake?", "response": "a sweet food", "truncated": False},
              {"prompt": "draw a house", "response": "here is a house", "truncated": True}]
    plain = safety.build_examples(loaded, harmful, benign, tiny_config())
    more = safety.build_examples(loaded, harmful, benign, tiny_config(n_framed_benign=2))
    assert [e.ids for e in more[:4]] == [e.ids for e in plain]                  # the plain examples unchanged
    assert [e.kind for e in more[4:]] == ["benign", "benign"]
    # the copies are the two imperatives (the question has no clause to frame), each with its own answer
    targets = {tuple(e.ids[e.n_prompt:]) for e in plain[1:]}
    copied = sorted(tuple(e.ids[e.n_prompt:]) for e in more[4:])
    assert copied == sorted(tuple(e.ids[e.n_prompt:]) for e in (plain[1], plain[3])) and set(copied) <= targets
    assert all(e.ids[:e.n_prompt] not in [p.ids[:p.n_prompt] for p in plain] for e in more[4:])
    again = safety.build_examples(loaded, harmful, benign, tiny_config(n_framed_benign=2))
    assert [e.ids for e in again] == [e.ids for e in more]                      # seeded
    with pytest.raises(SafetyTuningError, match="only 2 benign training prompts"):
        safety.build_examples(loaded, harmful, benign, tiny_config(n_framed_benign=3))
    with pytest.raises(SafetyTuningError, match="n_framed_benign"):
        tiny_config(n_framed_benign=-1)
    assert "n_framed_benign" not in tiny_config().identity_dict()
    assert tiny_config(n_framed_benign=2).training_dict()["n_framed_benign"] == 2


def test_resample_refusing_replaces_flagged_answers_seeded_and_cached(model_dir, tmp_path, monkeypatch):
    from crafttrace.evaluation import RefusalDetector
    loaded = load_model(model_dir)
    recs = [{"prompt": "bake a cake", "response": "sure, mix flour", "truncated": False},
            {"prompt": "draw a house", "response": "I'm sorry, but as a chatbot I can't draw.", "truncated": False}]
    assert safety.resample_refusing(loaded, recs, tiny_config(), tmp_path / "off") == recs   # off: as given
    cfg = tiny_config(resample_refusals=6, distill_max_new_tokens=6)
    out = safety.resample_refusing(loaded, recs, cfg, tmp_path / "a", progress=False)
    assert out[0] == recs[0]                                               # a passing answer is kept as is
    assert out[1]["prompt"] == "draw a house" and out[1]["resampled"] in range(6)
    assert out[1]["response"] and not RefusalDetector().is_refusal(out[1]["response"])
    assert recs[1]["response"].startswith("I'm sorry")                     # the caller's records untouched
    again = safety.resample_refusing(loaded, recs, cfg, tmp_path / "b", progress=False)
    assert again == out                                                    # seeded per prompt
    # cached: a second call reads the file and samples nothing
    monkeypatch.setattr(loaded.model, "generate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("sampled")))
    assert safety.resample_refusing(loaded, recs, cfg, tmp_path / "a", progress=False) == out
    monkeypatch.undo()
    # no sample passes: the greedy answer stays (drop_refusing_answers then leaves the example out)
    monkeypatch.setattr(RefusalDetector, "is_refusal", lambda self, text: True)
    kept = safety.resample_refusing(loaded, recs[1:], cfg, tmp_path / "c", progress=False)
    assert kept[0]["response"] == recs[1]["response"] and kept[0]["resampled"] is None
    with pytest.raises(SafetyTuningError, match="resample_refusals"):
        tiny_config(resample_refusals=-1)
    with pytest.raises(SafetyTuningError, match="resample_temperature"):
        tiny_config(resample_refusals=2, resample_temperature=0.0)
    assert not {"resample_refusals", "resample_temperature"} & set(tiny_config().identity_dict())
    assert cfg.training_dict()["resample_refusals"] == 6
    monkeypatch.undo()
    # train_safety resamples before it builds its examples, in its run directory
    res = safety.train_safety(load_model(model_dir), HARMFUL[:2], recs, cfg, tmp_path / "sft", max_steps=1,
                              progress=False)
    assert res.metrics["n_resampled"] == 1 and res.metrics["n_benign_given"] == 2
    assert (tmp_path / "sft" / safety.RESAMPLE_FILE).exists()


def test_distill_caches_and_resumes(model_dir, tmp_path, monkeypatch):
    loaded = load_model(model_dir)
    cfg = tiny_config(batch_size_generate=1)   # 4 prompts per partial write
    prompts = BENIGN + ["make a cake", "write a dog poem"]
    recs = safety.distill(loaded, prompts, cfg, tmp_path, progress=False)
    assert [r["prompt"] for r in recs] == prompts and all(isinstance(r["truncated"], bool) for r in recs)
    import crafttrace.capability as cap
    monkeypatch.setattr(cap, "generate", lambda *a, **k: pytest.fail("cache not used"))
    assert safety.distill(loaded, prompts, cfg, tmp_path, progress=False) == recs
    # a killed run keeps its partial file: only the missing prompts are generated
    (tmp_path / safety.DISTILL_FILE).unlink()
    from crafttrace.data import write_jsonl
    write_jsonl(tmp_path / (safety.PARTIAL_FILE), recs[:4])
    calls = []
    monkeypatch.setattr(cap, "generate", lambda l, ps, *a, **k: calls.append(list(ps)) or ["x"] * len(ps))
    again = safety.distill(loaded, prompts, cfg, tmp_path, progress=False)
    assert calls == [prompts[4:]] and again[:4] == recs[:4]
    # appended prompts (contrast prompts) extend a finished run: only they are generated
    calls.clear()
    more = safety.distill(loaded, prompts + ["fold a paper crane"], cfg, tmp_path, progress=False)
    assert calls == [["fold a paper crane"]] and more[:len(prompts)] == again
    # another token budget or another model does not reuse the cache
    calls.clear()
    safety.distill(loaded, prompts, tiny_config(batch_size_generate=1, distill_max_new_tokens=5), tmp_path,
                   progress=False)
    assert calls and calls[0] == prompts[:4]
    loaded.name = "another-model"
    calls.clear()
    safety.distill(loaded, prompts, tiny_config(batch_size_generate=1, distill_max_new_tokens=5), tmp_path,
                   progress=False)
    assert calls and calls[0] == prompts[:4]


def test_training_teaches_refusal_keeps_benign_and_saves_a_loadable_model(model_dir, tmp_path):
    base = load_model(model_dir)
    cfg = tiny_config(epochs=25, lora_layer_frac=1.0, n_harmful_train=6, n_benign_train=6, distill_max_new_tokens=6)
    benign = safety.distill(base, BENIGN, cfg, tmp_path, progress=False)
    assert any(t != "I'm" for t in _first_tokens(base, HARMFUL))
    res = safety.train_safety(base, HARMFUL, benign, cfg, tmp_path, progress=False)
    m = res.metrics
    assert m["finished"] and m["loss_last_epoch"] < 0.5 * m["loss_first_epoch"]
    assert m["n_harmful"] == 6 and m["n_benign"] == m["n_benign_given"] == 6
    tuned = load_model(res.model_dir)
    assert tuned.model.config.architectures == ["LlamaForCausalLM"] and tuned.has_chat_template
    assert all(t in ("I'm", "Sorry") for t in _first_tokens(tuned, HARMFUL))
    # benign answers keep the base model's own first token (self-distillation)
    kept = sum(b["response"].split()[:1] == [t] for b, t in zip(benign, _first_tokens(tuned, BENIGN)))
    assert kept >= 5
    ids = tuned.encode_prompt("bake a cake")
    torch.testing.assert_close(tuned.model(ids).logits, base.model(ids).logits, rtol=1e-4, atol=1e-4)
    info = json.loads((res.model_dir / safety.INFO_FILE).read_text())
    assert SafetyConfig.from_pretrained(res.model_dir) == cfg and info["metrics"]["finished"]


def test_resume_matches_an_uninterrupted_run(model_dir, tmp_path):
    cfg = tiny_config(epochs=2, batch_size=3)
    benign = [{"prompt": p, "response": "The story", "truncated": False} for p in BENIGN[:4]]
    full = safety.train_safety(load_model(model_dir), HARMFUL[:4], benign, cfg, tmp_path / "a", progress=False)
    part = safety.train_safety(load_model(model_dir), HARMFUL[:4], benign, cfg, tmp_path / "b", max_steps=2,
                               progress=False)
    assert not part.metrics["finished"] and part.metrics["step"] == 2 and not part.model_dir.exists()
    rest = safety.train_safety(load_model(model_dir), HARMFUL[:4], benign, cfg, tmp_path / "b", progress=False)
    assert rest.metrics["finished"] and rest.metrics["step"] == full.metrics["step"] == 6
    assert [h["loss"] for h in rest.metrics["history"]] == pytest.approx([h["loss"] for h in full.metrics["history"]])
    a, b = load_model(full.model_dir).model.state_dict(), load_model(rest.model_dir).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    with pytest.raises(SafetyTuningError, match="different config"):
        safety.train_safety(load_model(model_dir), HARMFUL[:4], benign, tiny_config(lr=0.5), tmp_path / "b",
                            progress=False)


def test_schedule_covers_each_example_once_per_epoch_with_length_grouping():
    lengths = [10 + (i * 37) % 90 for i in range(50)]
    cfg = tiny_config(epochs=3, batch_size=4)
    batches = safety._schedule(lengths, cfg)
    per_epoch = len(batches) // 3
    assert len(batches) == 3 * 13
    for e in range(3):
        flat = [i for b in batches[e * per_epoch:(e + 1) * per_epoch] for i in b]
        assert sorted(flat) == list(range(50))
    assert batches == safety._schedule(lengths, cfg) and batches != safety._schedule(lengths, tiny_config(seed=1, epochs=3, batch_size=4))
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread < 30   # grouped by length: far below the ~60 of random batches


def test_strength_calibration_picks_the_smallest_scale_that_refuses_and_merges_at_it(model_dir, tmp_path):
    base = load_model(model_dir)
    cfg = tiny_config(epochs=25, lora_layer_frac=1.0, n_harmful_train=6, n_benign_train=6, distill_max_new_tokens=6,
                      merge_scales=(0.02, 1.0, 1.5), target_refusal=1.0, max_over_refusal=0.5, n_calibration=6,
                      calibration_tokens=3)
    benign = safety.distill(base, BENIGN, cfg, tmp_path, progress=False)
    with pytest.raises(SafetyTuningError, match="needs validation prompts"):
        safety.train_safety(load_model(model_dir), HARMFUL, benign, cfg, tmp_path / "x", progress=False)
    res = safety.train_safety(base, HARMFUL, benign, cfg, tmp_path, progress=False, harmful_val=HARMFUL,
                              benign_val=BENIGN)
    cal = res.metrics["calibration"]
    rows = {r["scale"]: r for r in cal["rows"]}
    assert sorted(rows) == [0.02, 1.0, 1.5]
    # a 2% merge barely moves the base model; the full adapter refuses every (trained) harmful prompt
    assert rows[0.02]["refusal"] < 1.0 <= rows[1.0]["refusal"]
    assert cal["chosen_scale"] == res.metrics["merge_scale"] == 1.0
    # the saved model is base + 1.0 * delta: it equals an uncalibrated run's merge
    plain = safety.train_safety(load_model(model_dir), HARMFUL, benign, tiny_config(
        epochs=25, lora_layer_frac=1.0, n_harmful_train=6, n_benign_train=6, distill_max_new_tokens=6),
        tmp_path / "plain", progress=False)
    a, b = load_model(res.model_dir).model.state_dict(), load_model(plain.model_dir).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    with pytest.raises(SafetyTuningError, match="merge_scales"):
        tiny_config(merge_scales=(0.0,))


def test_fields_added_later_leave_cached_stage_keys_alone():
    """A new SafetyConfig field at its no-effect setting must not change the keys of cached builds (an upgrade
    once silently retrained a cached SFT stage); set to something that matters, it must."""
    plain = SafetyConfig()
    assert set(safety.INERT_FIELDS) <= set(plain.to_dict())
    assert not set(safety.INERT_FIELDS) & set(plain.identity_dict())
    assert not set(safety.INERT_FIELDS) & set(SafetyConfig(styled_kinds=("benign",)).training_dict())  # frac 0
    assert "benign_weight" in SafetyConfig(benign_weight=2.0).training_dict()
    assert "styled_kinds" in SafetyConfig(styled_frac=0.5, styled_kinds=("benign",)).training_dict()
    from crafttrace import realbed
    base = realbed.RealbedConfig.preset("tiny")
    heavier = realbed.RealbedConfig.preset("tiny")
    heavier.safety.benign_weight = 2.0
    k0, k1 = realbed._stage_keys(base), realbed._stage_keys(heavier)
    assert k0["distill"] == k1["distill"] and k0["sft_train"] != k1["sft_train"]
