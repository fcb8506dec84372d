"""Paired statistics against known values, IFEval checkers, and the tasks on a tiny random chat model."""

import copy
import math
from contextlib import contextmanager

import pytest
import torch
from lead_fixtures import TinyLoaded
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from crafttrace.capability import (IFEVAL_CHECKERS, Task, _records, answer_nll, compare, extract_final_number,
                                   gsm8k, ifeval, ifeval_check, ifeval_supported, lm_fidelity, mcnemar_exact, mmlu,
                                   mmlu_prompt, paired_nll, paired_run, sequence_nll, text_nll, wilson)
from crafttrace.data import load_dataset


def data(name: str, n: int | None = None) -> list[dict]:
    return load_dataset(name, limit=n)


# --------------------------------------------------------------------------- statistics

@pytest.mark.parametrize("lost,gained,p", [
    (0, 5, 0.0625),                 # 2 * (1/2)^5
    (2, 10, 0.03857421875),         # 2 * (1 + 12 + 66) / 2^12; statsmodels mcnemar(exact) 0.0386
    (3, 11, 0.057373046875),        # 2 * (1 + 14 + 91 + 364) / 2^14
    (5, 5, 1.0), (0, 0, 1.0), (1, 0, 1.0)])
def test_mcnemar_exact_known_values(lost, gained, p):
    base = [True] * lost + [False] * gained + [True] * 7 + [False] * 4   # concordant pairs are ignored
    new = [False] * lost + [True] * gained + [True] * 7 + [False] * 4
    got, b, c = mcnemar_exact(base, new)
    assert (b, c) == (lost, gained) and got == pytest.approx(p, abs=1e-12)


def test_wilson_known_values_and_errors():
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    assert wilson(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="k=11, n=10"):
        wilson(11, 10)
    with pytest.raises(ValueError, match="3 base vs 2 new"):
        mcnemar_exact([True] * 3, [True] * 2)


def test_compare():
    c = compare([True] * 8 + [False] * 2, [True] * 3 + [False] * 7)
    assert (c.lost, c.gained, c.base_accuracy, c.new_accuracy) == (5, 0, 0.8, 0.3)
    assert c.p_value == pytest.approx(0.0625) and not c.significant_drop
    assert c.base_ci == pytest.approx(wilson(8, 10))


# --------------------------------------------------------------------------- answer extraction + IFEval

def test_extract_final_number():
    assert extract_final_number("3 + 4 = 7, so 7 * 2 = 14. The answer is 14.") == 14
    assert extract_final_number("She pays $1,250.50 in total.\n#### 1,250.50") == 1250.5
    assert extract_final_number("first 3 then 5 then -2") == -2
    assert extract_final_number("The answer is: **$18**") == 18
    assert extract_final_number("no digits here") is None


def _item(iid, **kw):
    return {"instruction_id_list": [iid], "kwargs": [kw]}


@pytest.mark.parametrize("iid,kw,good,bad", [
    ("punctuation:no_comma", {}, "no commas here", "one, two"),
    ("change_case:english_lowercase", {}, "all lower case.", "Not lower"),
    ("change_case:english_capital", {}, "ALL CAPS HERE", "ALL CAPS but one"),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5}, "one two three four five",
     "one two three four"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 3}, "one two", "one two three"),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3}, "One. Two!",
     "One. Two. Three?"),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "first\n***\nsecond", "first\n***\n\n***\nthird"),
    ("keywords:existence", {"keywords": ["tide", "moon"]}, "The Moon drives the tide.", "The tide rises."),
    ("keywords:forbidden_words", {"forbidden_words": ["cat"]}, "catalogue of dogs", "a Cat sat"),
    ("keywords:frequency", {"keyword": "sun", "frequency": 2, "relation": "at least"}, "sun and SUN", "sun"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "less than"}, "zebra",
     "zigzag"),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2}, "*one* and **two**", "*one* only"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* a\n* b", "* a\n- b\n- c"),
    ("detectable_format:title", {}, "<<My Poem>>\nroses", "My Poem\nroses"),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "{a: 1}"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1 intro SECTION 2 body", "SECTION 1 intro only"),
    ("detectable_format:constrained_response", {}, "My answer is yes.", "Yes."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name] at [address]", "Dear [name]"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hi.\nP.S. bye", "Hi. bye"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Done. Any other questions?", "Done."),
    ("startend:quotation", {}, '"wrapped"', "not wrapped"),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Say hi"}, "Say hi. Hi!", "Hi!"),
    ("combination:two_responses", {}, "one******two", "one******one"),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "THE CAT sat", "THE cat sat"),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2,
                                                     "first_word": "then"}, "First.\n\nThen more.", "First.\n\nNow."),
])
def test_ifeval_checkers_on_handmade_responses(iid, kw, good, bad):
    assert ifeval_check(_item(iid, **kw), good) == [True]
    assert ifeval_check(_item(iid, **kw), bad) == [False]


def test_ifeval_checkers_accept_every_kwarg_set_in_the_data():
    items = data("ifeval")
    supported = [it for it in items if ifeval_supported(it)]
    assert len(supported) >= 480  # all but the items needing language detection
    for it in supported:  # fails on any kwarg-name mismatch with the real data
        ifeval_check(it, "A plain response, with a comma.\n\nSecond paragraph.")
    with pytest.raises(KeyError, match="language:response_language"):
        ifeval_check(_item("language:response_language", language="fr"), "bonjour")
    assert "language:response_language" not in IFEVAL_CHECKERS


# --------------------------------------------------------------------------- tasks on a tiny model

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>", "A", "B", "C", "D", "E",
         "the", "answer", "is", ".", ",", ":", "?", "Answer", "with", "letter", "of", "correct", "option", "(", ")",
         *"0123456789"]


@pytest.fixture(scope="module")
def loaded():
    torch.manual_seed(0)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                      initializer_range=0.5, architectures=["LlamaForCausalLM"], bos_token_id=2, eos_token_id=3,
                      pad_token_id=0)
    return TinyLoaded(LlamaForCausalLM(cfg).eval(), tok)


def _manual_letter(loaded, prompt: str, n: int) -> int:
    ids = loaded.encode_prompt(prompt)
    with torch.no_grad():
        logits = loaded.model(ids).logits[0, -1]
    letters = [loaded.tokenizer.convert_tokens_to_ids(c) for c in "ABCDE"[:n]]
    return int(logits[letters].argmax())


def test_mmlu_scores_first_token_letter_logits(loaded):
    items = data("mmlu", 6)
    got = mmlu(loaded, items=items, batch_size=4)  # batched + left-padded
    assert len(got) == 6 and all(isinstance(x, bool) for x in got)
    pred = [_manual_letter(loaded, mmlu_prompt(it), 4) for it in items]  # one at a time, no padding
    assert mmlu(loaded, items=[{**it, "answer": p} for it, p in zip(items, pred)], batch_size=4) == [True] * 6
    assert mmlu(loaded, items=[{**it, "answer": (p + 1) % 4} for it, p in zip(items, pred)]) == [False] * 6
    dev = data("mmlu_dev")
    shot = mmlu_prompt(items[0], [d for d in dev if d["subject"] == items[0]["subject"]][:2])
    assert shot.count("Answer: ") == 2 and shot.endswith("(A, B, C, D).")
    assert len(mmlu(loaded, items=items[:2], dev=dev, shots=2)) == 2


@contextmanager
def recording(log: list):
    log.append("enter")
    yield
    log.append("exit")


def test_generation_tasks_run_inside_the_steering_context(loaded):
    log = []
    g = gsm8k(loaded, items=data("gsm8k", 2), steering=recording(log), max_new_tokens=4)
    assert len(g) == 2 and all(isinstance(x, bool) for x in g) and log == ["enter", "exit"]
    f = ifeval(loaded, items=data("ifeval", 12), limit=2, max_new_tokens=4)
    assert len(f) == 2 and all(isinstance(x, bool) for x in f)


def test_task_protocol_and_paired_run(loaded):
    class Flaky:  # a plug-in task (the testbed's addition task has this shape)
        name = "flaky"

        def __call__(self, loaded, steering=None):
            return [True] * 10 if steering is None else [False] * 8 + [True] * 2

    base, new, cmp = paired_run(Flaky(), loaded, recording([]))
    assert base == [True] * 10 and cmp.lost == 8 and cmp.significant_drop
    assert len(Task("mmlu", limit=3)(loaded)) == 3  # items from crafttrace.data
    assert [r["i"] for r in _records("x", [{"i": i} for i in range(10)], 4)] == [0, 2, 5, 7]  # spread out
    assert len(Task("arc_challenge", limit=2)(loaded)) == 2
    with pytest.raises(ValueError, match="unknown capability task 'hellaswag'"):
        Task("hellaswag")


# --------------------------------------------------------------------------- language-model fidelity

def _manual_nll(loaded, ids: list[int], start: int) -> float:
    """One sequence, no padding, log-softmax by hand."""
    with torch.no_grad():
        logp = torch.log_softmax(loaded.model(torch.tensor([ids])).logits[0].float(), -1)
    return float(-sum(logp[t - 1, ids[t]] for t in range(start, len(ids))))


def test_sequence_and_answer_nll_match_unpadded_manual_scores(loaded):
    seqs = [[2, 12, 13, 14, 7], [2, 19, 15], [2, 7, 8, 9, 10, 11, 12, 13]]
    starts = [2, 1, 5]
    sums, counts = sequence_nll(loaded, [torch.tensor(s) for s in seqs], starts, batch_size=2)  # padded batches
    assert counts == [3, 2, 3]
    for s, st, got in zip(seqs, starts, sums):
        assert got == pytest.approx(_manual_nll(loaded, s, st), rel=1e-4)
    prompt, answer = "what is the answer ?", "the answer is B ."
    p_ids = loaded.encode_prompt(prompt)[0].tolist()
    a_ids = loaded.tokenizer(answer, add_special_tokens=False)["input_ids"]
    (got,), (n,) = answer_nll(loaded, [prompt], [answer])
    assert n == len(a_ids) == 5 and got == pytest.approx(_manual_nll(loaded, p_ids + a_ids, len(p_ids)), rel=1e-4)
    t_sums, t_counts = text_nll(loaded, ["the answer is A", "B C D E the answer"], max_tokens=4)
    assert t_counts == [3, 3]   # 4 tokens each, the first one is not scored
    with pytest.raises(ValueError, match="start 3 must be in"):
        sequence_nll(loaded, [torch.tensor([2, 7, 8])], [3])
    with pytest.raises(ValueError, match="text 1 has 1 token"):
        text_nll(loaded, ["the answer", "A"])
    with pytest.raises(ValueError, match="answer 0 is empty"):
        answer_nll(loaded, ["what ?"], [""])


def test_paired_nll_known_values_and_identical_models(loaded):
    r = paired_nll(([2.0, 4.0], [1, 3]), ([1.0, 1.0], [1, 3]), n_boot=500)
    assert (r["base_nll"], r["new_nll"], r["delta_nll"]) == pytest.approx((1.5, 0.5, -1.0))
    assert r["base_ppl"] == pytest.approx(math.exp(1.5)) and r["n_tokens"] == 4
    assert r["delta_ci_low"] <= r["delta_nll"] <= r["delta_ci_high"]
    with pytest.raises(ValueError, match="same token counts"):
        paired_nll(([1.0], [2]), ([1.0], [3]))
    f = lm_fidelity(loaded, loaded, ["the answer is A .", "B C D ,"], ["what is the answer ?", "Answer with letter"],
                    answer_tokens=4)
    assert f["text"]["delta_nll"] == pytest.approx(0.0, abs=1e-6)
    assert f["greedy_agreement"]["exact"] == 1.0 and f["greedy_agreement"]["mean_matching_prefix"] == 1.0
    with pytest.raises(ValueError, match="needs texts and prompts"):
        lm_fidelity(loaded, loaded, [], ["x"])
    noisy = copy.deepcopy(loaded)
    with torch.no_grad():
        noisy.model.lm_head.weight.add_(torch.randn(noisy.model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    g = lm_fidelity(loaded, noisy, ["the answer is A .", "B C D ,"], ["the answer is", "A B C"], answer_tokens=4)
    assert abs(g["text"]["delta_nll"]) > 1e-3 and g["text"]["base_nll"] == pytest.approx(f["text"]["base_nll"])
    assert g["answers"] is not None   # noise on the unembedding makes the base model's greedy answers less likely
    assert g["answers"]["new_nll"] > g["answers"]["base_nll"]
