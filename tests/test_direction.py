"""Refusal direction: metrics, hooks, extraction, selection, separation, save/load, validation.

Fast tests run on a tiny random LlamaForCausalLM with a word-level chat tokenizer; the testbed
measurements (AUROC >= 0.95, induce / bypass margins) run on crafttrace's synthetic testbed model.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from crafttrace import direction as D

torch.set_num_threads(1)  # tiny models: extra threads only add sync overhead on a loaded 2-core box

VERBS = ["make", "build", "write", "find", "describe", "explain"]
HARM = ["bomb", "poison", "malware", "weapon", "virus"]
SAFE = ["cake", "poem", "garden", "song", "kite"]
SPECIAL = ["<pad>", "<bos>", "<user>", "<eot>", "<asst>", "sorry", "sure"]
WORDS = SPECIAL + ["how", "do", "i", "a", "please", "now", "quickly"] + VERBS + HARM + SAFE


@dataclass
class TinyLoaded:
    """Duck-typed LoadedModel: .model, .tokenizer, .format_prompt, .encode_prompt."""
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    name: str = "tiny-llama"

    def format_prompt(self, user: str, system: str | None = None) -> str:
        return f"<bos> <user> {user} <eot> <asst>"

    def encode_prompt(self, user: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(self.format_prompt(user), add_special_tokens=False)["input_ids"]])


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>")


def tiny_loaded(seed: int = 0, n_layers: int = 4) -> TinyLoaded:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg).eval()
    return TinyLoaded(model, tiny_tokenizer())


def tiny_prompts() -> tuple[list[str], list[str]]:
    harm = [f"how do i {v} a {o}" for v, o in itertools.product(VERBS, HARM)]
    safe = [f"how do i {v} a {o}" for v, o in itertools.product(VERBS, SAFE)]
    return harm, safe


TOKENS = D.RefusalTokens(refusal_ids=[WORDS.index("sorry")], compliance_ids=[WORDS.index("sure")])


@pytest.fixture(scope="module")
def tiny():
    return tiny_loaded()


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------ metrics


def test_refusal_metrics_match_definitions():
    logits = torch.randn(3, len(WORDS))
    p = logits.softmax(-1)[:, TOKENS.refusal_ids[0]]
    assert torch.allclose(D.refusal_score(logits, TOKENS), torch.log(p / (1 - p)), atol=1e-5)
    ld = logits[:, TOKENS.refusal_ids[0]] - logits[:, TOKENS.compliance_ids[0]]
    assert torch.allclose(D.logit_diff(logits, TOKENS), ld, atol=1e-5)


def test_refusal_tokens_errors():
    with pytest.raises(ValueError, match="at least one refusal"):
        D.RefusalTokens(refusal_ids=[])
    with pytest.raises(ValueError, match=r"\[3\].*both"):
        D.RefusalTokens(refusal_ids=[3], compliance_ids=[3, 4])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        D.RefusalTokens(refusal_ids=[999]).check_vocab(10)
    with pytest.raises(ValueError, match="compliance token ids"):
        D.logit_diff(torch.zeros(1, 5), D.RefusalTokens(refusal_ids=[1]))


def test_auroc_and_cohens_d():
    assert D.auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0
    assert D.auroc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0
    assert D.auroc(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 500), rng.normal(0, 1, 500)
    # AUROC of two unit-variance normals one sd apart is Phi(1/sqrt 2) = 0.760
    assert abs(D.auroc(a, b) - 0.760) < 0.04
    assert abs(D.cohens_d(a, b) - 1.0) < 0.15


def test_separation_per_layer_on_planted_shift():
    g = torch.Generator().manual_seed(0)
    benign = torch.randn(40, 3, 16, generator=g)
    harmful = torch.randn(40, 3, 16, generator=g)
    harmful[:, 1, 5] += 6.0  # layer 1 carries a planted harmful shift along e_5
    dirs = torch.zeros(3, 16)
    dirs[:, 5] = 1.0
    rows = D.separation(harmful, benign, dirs)
    assert [r["layer"] for r in rows] == [0, 1, 2]
    assert rows[1]["auroc"] == 1.0 and rows[1]["cohens_d"] > 4
    assert abs(rows[0]["auroc"] - 0.5) < 0.2 and abs(rows[2]["cohens_d"]) < 1
    with pytest.raises(ValueError, match=r"directions \(2, 16\) do not match activations \(40, 3, 16\)"):
        D.separation(harmful, benign, dirs[:2])


# ------------------------------------------------------------------ encoding, sites, hooks


def test_post_instruction_len_and_batching_is_exact(tiny):
    assert D.post_instruction_len(tiny) == 2  # "<eot> <asst>"
    prompts = ["how do i make a cake", "how do i make a cake please now quickly"]
    batched = D.last_logits(tiny, prompts, batch_size=2)
    single = torch.cat([D.last_logits(tiny, [p], batch_size=1) for p in prompts])
    assert batched.shape == (2, len(WORDS))
    assert torch.allclose(batched, single, atol=1e-4)  # left padding + position ids change nothing


def test_collect_resid_shape_and_layer0_is_embedding(tiny):
    acts = D.collect_resid(tiny, ["how do i make a cake", "how do i find a kite now"], n_pos=2, batch_size=2)
    assert acts.shape == (2, 5, 2, 32)  # 4 layer inputs + the final residual stream
    ids = tiny.encode_prompt("how do i make a cake")[0, -2:]
    assert torch.allclose(acts[0, 0], tiny.model.model.embed_tokens.weight[ids], atol=1e-6)
    out = tiny.model(tiny.encode_prompt("how do i make a cake"), output_hidden_states=True)
    # HF's last hidden state is the final residual stream after the final norm
    assert torch.allclose(tiny.model.model.norm(acts[0, 4]), out.hidden_states[-1][0, -2:], atol=1e-5)


def test_site_errors(tiny):
    with pytest.raises(ValueError, match="unknown site 'foo'"):
        D.site_module(tiny.model, "foo", 0)
    with pytest.raises(IndexError, match="layer 9 out of range.*4 layers"):
        D.site_module(tiny.model, "resid", 9)
    with pytest.raises(IndexError, match="layer 4 out of range"):  # only resid has a final (layer L) slot
        D.site_module(tiny.model, "mlp", 4)
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20, n_positions=16))
    with pytest.raises(ValueError, match="cannot place hooks on this model.*GPT2LMHeadModel"):
        D.site_module(gpt2, "resid", 0)


def test_hooks_removed_after_use_and_on_exception(tiny):
    before = n_hooks(tiny.model)
    r = torch.randn(32)
    with D.ablate(tiny.model, r):
        assert n_hooks(tiny.model) == before + 3 * 4
    with pytest.raises(RuntimeError, match="boom"):
        with D.add_direction(tiny.model, r, 1):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with D.ablate(tiny.model, r), D.record_sites(tiny.model, [("attn", 0), ("head", 2)]):
            raise RuntimeError("boom")
    assert n_hooks(tiny.model) == before


def test_ablation_removes_direction_everywhere(tiny):
    r = torch.randn(32)
    unit = r / r.norm()
    sites = [(s, l) for s in ("resid", "attn", "mlp") for l in range(4)] + [("resid", 4)]
    with D.ablate(tiny.model, r), D.record_sites(tiny.model, sites) as store:
        out = tiny.model(tiny.encode_prompt("how do i make a bomb"), output_hidden_states=True)
    for key, x in store.items():
        assert (x @ unit).abs().max() < 1e-4, key
    # the final residual stream (before the last norm) is direction-free too
    last = store[("resid", 3)] + store[("attn", 3)] + store[("mlp", 3)]
    assert (last @ unit).abs().max() < 1e-4
    # and the ablation changes the output (it is not a no-op)
    base = tiny.model(tiny.encode_prompt("how do i make a bomb")).logits
    assert not torch.allclose(base, out.logits)


def test_add_direction_shifts_projection_by_coeff(tiny):
    r = torch.randn(32)
    ids = tiny.encode_prompt("how do i make a bomb")
    with D.record_sites(tiny.model, [("resid", 2)]) as store:
        tiny.model(ids)
    base = store[("resid", 2)].clone()
    with D.add_direction(tiny.model, r, 2, coeff=3.0), D.record_sites(tiny.model, [("resid", 2)]) as store2:
        tiny.model(ids)
    # add_direction was entered first, so its hook runs first and record sees the edited input
    assert torch.allclose(store2[("resid", 2)] - base, 3.0 * r.expand_as(base), atol=1e-5)
    # layer L = 4: the final residual stream, so the logits move by exactly the unembedded shift
    base_logits = tiny.model(ids).logits
    with D.add_direction(tiny.model, r, 4, coeff=2.0), D.record_sites(tiny.model, [("resid", 4)]) as store3:
        logits = tiny.model(ids).logits
    expected = tiny.model.lm_head(tiny.model.model.norm(store3[("resid", 4)]))
    assert torch.allclose(logits, expected, atol=1e-5) and not torch.allclose(logits, base_logits)


def test_gemma3_sandwich_norm_sites():
    """Gemma 3 normalises attn / MLP outputs before the residual add: the sites are those norms."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                           sliding_window=4, architectures=["Gemma3ForCausalLM"])
    gemma = TinyLoaded(Gemma3ForCausalLM(cfg).eval(), tiny_tokenizer())
    blk = gemma.model.model.layers[1]
    assert D.site_module(gemma.model, "attn", 1)[0] is blk.post_attention_layernorm
    assert D.site_module(gemma.model, "mlp", 1)[0] is blk.post_feedforward_layernorm
    assert D.site_module(gemma.model, "head", 1)[0] is blk.self_attn.o_proj
    r = torch.randn(32)
    sites = [(s, l) for s in ("resid", "attn", "mlp") for l in range(2)] + [("resid", 2)]
    with D.ablate(gemma.model, r), D.record_sites(gemma.model, sites) as store:
        gemma.model(gemma.encode_prompt("how do i make a bomb"))
    assert max(float((x @ (r / r.norm())).abs().max()) for x in store.values()) < 1e-4
    prompts = ["how do i make a cake", "how do i make a cake please now quickly"]  # longer than the window
    assert torch.allclose(D.last_logits(gemma, prompts, 2), torch.cat([D.last_logits(gemma, [p], 1) for p in prompts]),
                          atol=1e-4)


# ------------------------------------------------------------------ extraction and selection


def test_mean_diff_shape_error():
    with pytest.raises(ValueError, match=r"harmful \(3, 4, 2, 8\) vs benign \(3, 4, 1, 8\)"):
        D.mean_diff(torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 1, 8))


def test_split_is_seeded_and_disjoint():
    p = [f"p{i}" for i in range(20)]
    a, b = D.split(p, (0.6, 0.2, 0.2), 3), D.split(p, (0.6, 0.2, 0.2), 3)
    assert a == b and sorted(sum(a, [])) == sorted(p)
    with pytest.raises(ValueError, match="at least 6 prompts"):
        D.split(p[:4], (0.6, 0.2, 0.2), 0)
    with pytest.raises(ValueError, match="sum"):
        D.DirectionConfig(splits=(0.5, 0.5, 0.5))


def test_find_direction_end_to_end_and_roundtrip(tiny, tmp_path):
    harm, safe = tiny_prompts()
    cfg = D.DirectionConfig(batch_size=16, max_kl=10.0, min_induce=-100.0)
    rd = D.find_direction(tiny, harm, safe, TOKENS, cfg, out_dir=tmp_path)
    L, P = 4, 2
    assert rd.candidates.shape == (L + 1, P, 32)
    assert rd.layer <= L * 0.8 and -P <= rd.position < 0
    # layers 1..3 (layer 4 = final residual is pruned); layer 0's template positions have a zero
    # mean difference and are not candidates
    assert sorted({s["layer"] for s in rd.scores}) == [1, 2, 3] and len(rd.scores) == 3 * P
    best = min(rd.scores, key=lambda s: s["bypass"])
    assert (rd.layer, rd.position) == (best["layer"], best["position"])
    assert torch.equal(rd.direction, rd.candidates[rd.layer, rd.position + P])
    # at layer 0 the post-instruction positions hold the same template embedding for every prompt:
    # no difference, no separation; later layers have mixed in the object word
    own = rd.separation["own"]
    assert own[0]["auroc"] == 0.5 and own[0]["cohens_d"] == 0.0
    assert max(r["auroc"] for r in own[1:]) > 0.8, own
    assert rd.separation["n_harmful"] == 6 and len(rd.separation["selected"]) == L + 1
    for f in ("direction.safetensors", "direction.json", "separation.png", "selection.png"):
        assert (tmp_path / f).stat().st_size > 0
    back = D.RefusalDirection.from_pretrained(tmp_path)
    assert torch.equal(back.direction, rd.direction) and back.layer == rd.layer and back.scores == rd.scores
    assert json.loads((tmp_path / "direction.json").read_text())["position_tokens"] == ["<eot>", "<asst>"]
    # deterministic
    rd2 = D.find_direction(tiny, harm, safe, TOKENS, cfg)
    assert torch.equal(rd2.candidates, rd.candidates) and rd2.scores == rd.scores


def test_from_pretrained_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="direction.safetensors"):
        D.RefusalDirection.from_pretrained(tmp_path)


def test_validate_direction_reports_all_arms(tiny, tmp_path):
    harm, safe = tiny_prompts()
    r = torch.randn(32)
    rd = D.RefusalDirection(direction=r, layer=1, position=-1, candidates=torch.zeros(5, 2, 32))
    res = D.validate_direction(tiny, rd, harm[:4], safe[:4], TOKENS, coeff=2.0, generate_tokens=3,
                               detector=lambda t: t.strip().startswith("sorry"), out_dir=tmp_path)
    for arm in (("harmful", "baseline"), ("harmful", "ablated"), ("benign", "baseline"), ("benign", "added")):
        s = res[arm[0]][arm[1]]
        assert 0 <= s["refusal_prob"] <= 1 and np.isfinite(s["refusal_score"])
        assert 0 <= s["generation_refusal_rate"] <= 1 and 0 <= s["degenerate_rate"] <= 1
    assert res["benign"]["added"]["refusal_score"] != res["benign"]["baseline"]["refusal_score"]
    assert (tmp_path / "validation.json").is_file()


def test_selection_resumes_from_checkpoint(tiny, tmp_path, monkeypatch):
    harm, safe = tiny_prompts()
    cand = D.mean_diff(D.collect_resid(tiny, harm[:8], 2), D.collect_resid(tiny, safe[:8], 2))
    cfg = D.DirectionConfig(max_kl=10.0, min_induce=-100.0)
    ckpt = tmp_path / "progress.json"
    first = D.select_direction(tiny, cand, harm[8:12], safe[8:12], TOKENS, cfg, ckpt)
    assert len(json.loads(ckpt.read_text())["scores"]) == len(first[2])

    def boom(*a, **k):
        raise AssertionError("a finished candidate was recomputed")
    monkeypatch.setattr(D, "ablate", boom)
    assert D.select_direction(tiny, cand, harm[8:12], safe[8:12], TOKENS, cfg, ckpt) == first
    with pytest.raises(AssertionError, match="recomputed"):  # other prompts: the checkpoint does not apply
        D.select_direction(tiny, cand, harm[12:16], safe[8:12], TOKENS, cfg, ckpt)
    monkeypatch.undo()
    strided = D.select_direction(tiny, cand, harm[8:12], safe[8:12], TOKENS,
                                 D.DirectionConfig(max_kl=10.0, min_induce=-100.0, layer_stride=2))
    assert {s["layer"] for s in strided[2]} == {2}  # layers 0, 2 (4 = final is pruned; 0 is a zero difference)


def test_accepts_crafttrace_token_sets():
    from crafttrace.tokens import TokenSets
    ts = TokenSets("t", ["sorry"], ["sure"], TOKENS.refusal_ids, TOKENS.compliance_ids)
    logits = torch.randn(2, len(WORDS))
    assert torch.equal(D.refusal_score(logits, ts), D.refusal_score(logits, TOKENS))
    assert torch.equal(D.logit_diff(logits, ts), D.logit_diff(logits, TOKENS))
    D.check_token_ids(ts, len(WORDS))


# ------------------------------------------------------------------ the synthetic testbed (seed 0)
# Measured on the committed seed-0 model (see the numbers in each test); prompts come from the
# testbed's eval pools, the held-out pools use verb-object pairs the model never saw in training.


@pytest.fixture(scope="module")
def testbed():
    from crafttrace.models import load_model
    from crafttrace.testbed import SHIPPED_DIR
    if not (SHIPPED_DIR / "model" / "model.safetensors").is_file():
        pytest.skip(f"testbed model not built at {SHIPPED_DIR / 'model'}")
    loaded = load_model(SHIPPED_DIR / "model")
    from crafttrace.tokens import resolve
    return loaded, resolve(loaded.tokenizer, "testbed")


def pool_prompts(name: str, n: int, seed: int = 0, template: str | None = None) -> list[str]:
    import random

    from crafttrace.testbed import pool
    ps = [r["prompt"] for r in pool(name)]
    if template:
        ps = [p for p in ps if p.startswith(template)]
    random.Random(seed).shuffle(ps)
    return ps[:n]


@pytest.fixture(scope="module")
def testbed_direction(testbed):
    loaded, ts = testbed
    h, b = pool_prompts("harmful_train", 40), pool_prompts("benign_train", 40)
    # KL bound: a 3-layer model has little room besides the refusal decision, so ablation moves the
    # benign next-token distribution more than Arditi's 0.1 (measured 0.66 at the selected candidate)
    return D.find_direction(loaded, h, b, ts, D.DirectionConfig(batch_size=64, max_kl=1.0))


def test_testbed_direction_separates_heldout(testbed, testbed_direction):
    loaded, _ = testbed
    rd = testbed_direction
    assert rd.passed_filters and rd.position == -1  # the generation prompt token "<|assistant|>"
    P = rd.candidates.shape[1]
    # held-out verb-object pairs (never in training): measured AUROC 1.0 at layers 1-3
    h, b = pool_prompts("harmful_heldout", 30), pool_prompts("benign", 30)
    ah = D.collect_resid(loaded, h, P)[:, rd.layer, rd.position + P]
    ab = D.collect_resid(loaded, b, P)[:, rd.layer, rd.position + P]
    assert D.auroc((ah @ rd.unit).numpy(), (ab @ rd.unit).numpy()) >= 0.95
    assert rd.separation["selected"][rd.layer]["auroc"] >= 0.95
    assert rd.separation["own"][0]["auroc"] == 0.5  # layer 0 at "<|assistant|>": one embedding for all


def test_testbed_direction_interventions(testbed, testbed_direction):
    from crafttrace.evaluation import RefusalDetector
    loaded, ts = testbed
    h, b = pool_prompts("harmful_heldout", 24, seed=1), pool_prompts("benign", 24, seed=1)
    v = D.validate_direction(loaded, testbed_direction, h, b, ts, generate_tokens=2, batch_size=64,
                             detector=RefusalDetector(phrases=["sorry"], mode="prefix"))
    hb, ha = v["harmful"]["baseline"], v["harmful"]["ablated"]
    bb, ba = v["benign"]["baseline"], v["benign"]["added"]
    # measured: benign refusal log-odds -5.0 -> +0.5 (P 0.007 -> 0.59); harmful +2.7 -> -0.45 (P 0.90 -> 0.42)
    assert ba["refusal_score"] - bb["refusal_score"] >= 3.0 and ba["refusal_prob"] >= 0.3
    assert ha["refusal_score"] - hb["refusal_score"] <= -2.0 and ha["refusal_prob"] <= 0.7
    # greedy openers ("sorry" = refusal), measured: harmful 0.92 -> 0.33 ablated, benign 0.0 -> 0.75 added
    assert hb["generation_refusal_rate"] >= 0.8 and bb["generation_refusal_rate"] <= 0.1
    assert ba["generation_refusal_rate"] >= 0.5 and ha["generation_refusal_rate"] <= 0.6


def test_empty_prompt_lists_are_named(tiny):
    with pytest.raises(ValueError, match=r"no prompts given \(harmful\)"):
        D.last_logits(tiny, [], desc="harmful")
    with pytest.raises(ValueError, match="no prompts given"):
        D.collect_resid(tiny, [], n_pos=2)
