"""Capability checks under steering: MMLU, ARC-Challenge, GSM8K, IFEval, and paired statistics.

Every task takes a loaded model (anything with ``.model``, ``.tokenizer``, ``.encode_prompt(user)``
and ``.format_prompt(user)``, i.e. :class:`crafttrace.models.LoadedModel`) and an optional steering
context manager (``crafttrace.steering.steer(...)``), and returns per-item correctness, so a steered
run can be compared item by item with the unsteered one:

  * exact McNemar test on the discordant pairs (two-sided binomial, written with ``math.comb``),
  * Wilson score intervals for each accuracy.

Prompts always go through the model's chat template (``encode_prompt``). Multiple choice is scored
from the first assistant token's logits over the option letters; GSM8K and IFEval generate greedily.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from tqdm.auto import tqdm

LETTERS = "ABCDEFGHIJ"


# --------------------------------------------------------------------------- statistics

def mcnemar_exact(base: Sequence[bool], new: Sequence[bool]) -> tuple[float, int, int]:
    """Two-sided exact McNemar p-value on paired correctness; returns (p, lost, gained).

    lost = items right before and wrong after; the test is a binomial(lost + gained, 1/2) on the
    discordant pairs, p = min(1, 2 * P[X <= min(lost, gained)]).
    """
    if len(base) != len(new):
        raise ValueError(f"McNemar needs paired answers: {len(base)} base vs {len(new)} new items")
    lost = sum(1 for x, y in zip(base, new) if x and not y)
    gained = sum(1 for x, y in zip(base, new) if y and not x)
    n = lost + gained
    if n == 0:
        return 1.0, lost, gained
    tail = sum(math.comb(n, i) for i in range(min(lost, gained) + 1))
    return min(1.0, 2 * tail / 2 ** n), lost, gained


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n = 0."""
    if not 0 <= k <= n:
        raise ValueError(f"wilson needs 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (0.0, 1.0)
    p, z2 = k / n, z * z
    d = 1 + z2 / n
    c = (p + z2 / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


@dataclass
class Comparison:
    """Base vs steered accuracy on the same items, with Wilson CIs and the exact McNemar p."""

    n: int
    base_accuracy: float
    new_accuracy: float
    base_ci: tuple[float, float]
    new_ci: tuple[float, float]
    lost: int
    gained: int
    p_value: float

    @property
    def significant_drop(self) -> bool:
        return self.lost > self.gained and self.p_value <= 0.05


def compare(base: Sequence[bool], new: Sequence[bool]) -> Comparison:
    p, lost, gained = mcnemar_exact(base, new)
    n = len(base)
    return Comparison(n, sum(base) / n if n else 0.0, sum(new) / n if n else 0.0,
                      wilson(sum(base), n), wilson(sum(new), n), lost, gained, p)


# --------------------------------------------------------------------------- model plumbing

class LoadedLike(Protocol):
    model: torch.nn.Module
    tokenizer: Any

    def encode_prompt(self, user: str) -> torch.Tensor: ...


def _left_pad(seqs: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, T - len(s):], mask[r, T - len(s):] = s, 1
    return ids, mask


def _pad_id(tok) -> int:
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id if tok.eos_token_id is not None else 0


def _batches(loaded: LoadedLike, prompts: Sequence[str], batch_size: int, desc: str):
    """Yield (item indices, input_ids, attention_mask), length-sorted so padding stays small."""
    enc = [loaded.encode_prompt(p)[0] for p in prompts]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
    pad = _pad_id(loaded.tokenizer)
    device = next(loaded.model.parameters()).device
    for s in tqdm(range(0, len(order), batch_size), desc=desc, leave=False,
                  disable=len(order) <= batch_size):
        idx = order[s:s + batch_size]
        ids, mask = _left_pad([enc[i] for i in idx], pad)
        yield idx, ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(loaded: LoadedLike, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 16,
             desc: str = "generating") -> list[str]:
    """Greedy, KV-cached, left-padded batch generation through the chat template; responses only."""
    tok, out = loaded.tokenizer, [""] * len(prompts)
    for idx, ids, mask in _batches(loaded, prompts, batch_size, desc):
        gen = loaded.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=_pad_id(tok))
        for r, i in enumerate(idx):
            out[i] = tok.decode(gen[r, ids.shape[1]:], skip_special_tokens=True).strip()
    return out


def letter_token_ids(tokenizer, letters: str) -> list[list[int]]:
    """Token ids that spell each option letter on their own ("A" and " A" where single tokens)."""
    ids = []
    for letter in letters:
        cands = set()
        for text in (letter, " " + letter):
            t = tokenizer.encode(text, add_special_tokens=False)
            if len(t) == 1:
                cands.add(t[0])
        if not cands:
            raise ValueError(f"the tokenizer has no single token for option letter {letter!r}")
        ids.append(sorted(cands))
    return ids


@torch.inference_mode()
def choice_predictions(loaded: LoadedLike, prompts: Sequence[str], n_choices: Sequence[int],
                       batch_size: int = 16, desc: str = "multiple choice") -> list[int]:
    """Index of the option letter with the highest first-assistant-token logit, per prompt."""
    letter_ids = letter_token_ids(loaded.tokenizer, LETTERS[:max(n_choices)])
    preds = [0] * len(prompts)
    for idx, ids, mask in _batches(loaded, prompts, batch_size, desc):
        # Positions count from each row's first real token, as generate() does for left padding.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        last = loaded.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        for r, i in enumerate(idx):
            scores = [last[r, letter_ids[j]].max() for j in range(n_choices[i])]
            preds[i] = int(torch.stack(scores).argmax())
    return preds


def _records(name: str, items: Sequence[dict] | None, limit: int | None) -> list[dict]:
    """``limit`` items spread evenly over the data set (deterministic): the files are sorted by
    subject/source, so the first N would test only the first few subjects."""
    if items is None:
        from crafttrace.data import load_dataset
        items = load_dataset(name)
    items = list(items)
    if limit is None or limit >= len(items):
        return items
    if limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return [items[i * len(items) // limit] for i in range(limit)]


# --------------------------------------------------------------------------- multiple choice

def mmlu_prompt(item: dict, shots: Sequence[dict] = ()) -> str:
    """User message for one MMLU item, with optional worked examples (answers given) before it."""
    def block(it: dict) -> str:
        opts = "\n".join(f"{LETTERS[j]}. {c}" for j, c in enumerate(it["choices"]))
        return f"{it['question'].strip()}\n{opts}"

    subject = item.get("subject", "").replace("_", " ")
    head = f"The following are multiple choice questions about {subject}.\n\n" if subject else ""
    examples = "".join(f"{block(s)}\nAnswer: {LETTERS[s['answer']]}\n\n" for s in shots)
    letters = ", ".join(LETTERS[:len(item["choices"])])
    return f"{head}{examples}{block(item)}\nAnswer with the letter of the correct option ({letters})."


def mmlu(loaded: LoadedLike, limit: int | None = None, shots: int = 0,
         steering: AbstractContextManager | None = None, items: Sequence[dict] | None = None,
         dev: Sequence[dict] | None = None, batch_size: int = 16) -> list[bool]:
    """MMLU validation, 0-shot or k-shot (k examples of the same subject from ``mmlu_dev``)."""
    recs = _records("mmlu", items, limit)
    dev_by_subject: dict[str, list[dict]] = {}
    if shots:
        for d in _records("mmlu_dev", dev, None):
            dev_by_subject.setdefault(d["subject"], []).append(d)
    prompts = [mmlu_prompt(r, dev_by_subject.get(r.get("subject"), [])[:shots]) for r in recs]
    with steering or nullcontext():
        preds = choice_predictions(loaded, prompts, [len(r["choices"]) for r in recs], batch_size, "mmlu")
    return [p == r["answer"] for p, r in zip(preds, recs)]


def arc_challenge(loaded: LoadedLike, limit: int | None = None,
                  steering: AbstractContextManager | None = None, items: Sequence[dict] | None = None,
                  batch_size: int = 16) -> list[bool]:
    """ARC-Challenge test; the data's ``query`` already lists lettered options."""
    recs = _records("arc_challenge", items, limit)
    prompts = []
    for r in recs:
        q = re.sub(r"\s*Answer:\s*$", "", r["query"].strip())
        prompts.append(f"{q}\nAnswer with the letter of the correct option ({', '.join(r['choices'])}).")
    with steering or nullcontext():
        preds = choice_predictions(loaded, prompts, [len(r["choices"]) for r in recs], batch_size, "arc")
    return [p == r["gold"] for p, r in zip(preds, recs)]


# --------------------------------------------------------------------------- GSM8K

GSM8K_INSTRUCTION = "Solve the problem step by step. End with a line of the form 'The answer is N.'"
_NUM = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"


def extract_final_number(text: str) -> float | None:
    """The final numeric answer: 'The answer is N' / '#### N' if present, else the last number."""
    for pat in (rf"answer is[:\s]*\**\s*({_NUM})", rf"####\s*({_NUM})", rf"\\boxed\{{({_NUM})\}}"):
        m = re.findall(pat, text, flags=re.IGNORECASE)
        if m:
            return _to_float(m[-1])
    m = re.findall(_NUM, text)
    return _to_float(m[-1]) if m else None


def _to_float(s: str) -> float | None:
    try:
        return float(re.sub(r"[,$\s]", "", s))
    except ValueError:
        return None


def gsm8k(loaded: LoadedLike, limit: int | None = None, steering: AbstractContextManager | None = None,
          items: Sequence[dict] | None = None, max_new_tokens: int = 256, batch_size: int = 16) -> list[bool]:
    """GSM8K test, 0-shot chat prompt, greedy; correct when the extracted number equals the answer."""
    recs = _records("gsm8k", items, limit)
    prompts = [f"{r['question'].strip()}\n\n{GSM8K_INSTRUCTION}" for r in recs]
    with steering or nullcontext():
        responses = generate(loaded, prompts, max_new_tokens, batch_size, "gsm8k")
    out = []
    for r, resp in zip(recs, responses):
        got, gold = extract_final_number(resp), _to_float(str(r["answer"]))
        out.append(got is not None and gold is not None and abs(got - gold) < 1e-6)
    return out


# --------------------------------------------------------------------------- IFEval
# The data set ships prompts and kwargs only. These checkers re-implement the official
# google-research/instruction_following_eval rules (strict variant) for the ids below; the two
# that need NLTK sentence splitting / word tokenisation use regex approximations (noted inline).
# language:response_language (needs langdetect) is not supported: items using it are skipped.

def _compare(n: int, relation: str, target: int) -> bool:
    if relation == "less than":
        return n < target
    if relation == "at least":
        return n >= target
    raise ValueError(f"unknown IFEval relation {relation!r} (expected 'less than' or 'at least')")


def _paragraphs_stars(r: str, num_paragraphs: int) -> bool:
    parts = re.split(r"\s?\*\*\*\s?", r)
    n = len(parts)
    for i, p in enumerate(parts):
        if not p.strip():
            if i in (0, len(parts) - 1):
                n -= 1
            else:
                return False
    return n == num_paragraphs


def _nth_paragraph_first_word(r: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    parts = re.split(r"\n\n", r)
    n = sum(1 for p in parts if p.strip())
    if nth_paragraph > n or not parts[nth_paragraph - 1].strip():
        return False
    word = parts[nth_paragraph - 1].strip().split()[0].strip().lstrip("'\"")
    got = ""
    for ch in word:
        if ch in ".,?!'\"":
            break
        got += ch.lower()
    return n == num_paragraphs and got == first_word.lower()


def _highlights(r: str, num_highlights: int) -> bool:
    single = [h for h in re.findall(r"\*[^\n\*]*\*", r) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", r) if h.removeprefix("**").removesuffix("**").strip()]
    return len(single) + len(double) >= num_highlights


def _bullets(r: str, num_bullets: int) -> bool:
    star = re.findall(r"^\s*\*[^\*].*$", r, flags=re.MULTILINE)
    dash = re.findall(r"^\s*-.*$", r, flags=re.MULTILINE)
    return len(star) + len(dash) == num_bullets


def _json(r: str) -> bool:
    v = r.strip()
    for pre in ("```json", "```Json", "```JSON", "```"):
        v = v.removeprefix(pre)
    v = v.removesuffix("```").strip()
    try:
        json.loads(v)
    except ValueError:
        return False
    return True


def _postscript(r: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip().lower()
    if marker == "p.s.":
        pat = r"\s*p\.\s?s\..*$"
    elif marker == "p.p.s":
        pat = r"\s*p\.\s?p\.\s?s.*$"
    else:
        pat = r"\s*" + re.escape(marker) + r".*$"
    return bool(re.findall(pat, r.lower(), flags=re.MULTILINE))


def _two_responses(r: str) -> bool:
    parts = r.split("******")
    valid = []
    for i, p in enumerate(parts):
        if not p.strip():
            if i not in (0, len(parts) - 1):
                return False
        else:
            valid.append(p)
    return len(valid) == 2 and valid[0].strip() != valid[1].strip()


def _sentences(r: str) -> int:
    # Approximates the official regex splitter: a sentence ends at . ! or ? followed by space/end.
    return len([s for s in re.split(r"(?<=[.!?])\s+", r.strip()) if re.search(r"\w", s)])


IFEVAL_CHECKERS: dict[str, Callable[..., bool]] = {
    "punctuation:no_comma": lambda r: "," not in r,
    "change_case:english_lowercase": lambda r: r.islower(),
    "change_case:english_capital": lambda r: r.isupper(),
    "change_case:capital_word_frequency": lambda r, capital_frequency, capital_relation: _compare(
        sum(1 for w in re.findall(r"\w+", r) if w.isupper()), capital_relation, capital_frequency),
    "length_constraints:number_words": lambda r, num_words, relation: _compare(
        len(re.findall(r"\w+", r)), relation, num_words),
    "length_constraints:number_sentences": lambda r, num_sentences, relation: _compare(
        _sentences(r), relation, num_sentences),
    "length_constraints:number_paragraphs": _paragraphs_stars,
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "keywords:existence": lambda r, keywords: all(re.search(k, r, flags=re.IGNORECASE) for k in keywords),
    "keywords:forbidden_words": lambda r, forbidden_words: not any(
        re.search(r"\b" + w + r"\b", r, flags=re.IGNORECASE) for w in forbidden_words),
    "keywords:frequency": lambda r, keyword, frequency, relation: _compare(
        len(re.findall(keyword, r, flags=re.IGNORECASE)), relation, frequency),
    "keywords:letter_frequency": lambda r, letter, let_frequency, let_relation: _compare(
        r.lower().count(letter.lower()), let_relation, let_frequency),
    "detectable_format:number_highlighted_sections": _highlights,
    "detectable_format:number_bullet_lists": _bullets,
    "detectable_format:title": lambda r: any(t.lstrip("<").rstrip(">").strip()
                                             for t in re.findall(r"<<[^\n]+>>", r)),
    "detectable_format:json_format": _json,
    "detectable_format:multiple_sections": lambda r, section_spliter, num_sections: len(
        re.split(r"\s?" + section_spliter + r"\s?\d+\s?", r)) - 1 >= num_sections,
    "detectable_format:constrained_response": lambda r: any(
        o in r.strip() for o in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "detectable_content:number_placeholders": lambda r, num_placeholders: len(
        re.findall(r"\[.*?\]", r)) >= num_placeholders,
    "detectable_content:postscript": _postscript,
    "startend:end_checker": lambda r, end_phrase: r.strip().strip('"').lower().endswith(
        end_phrase.strip().lower()),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "combination:repeat_prompt": lambda r, prompt_to_repeat: r.strip().lower().startswith(
        prompt_to_repeat.strip().lower()),
    "combination:two_responses": _two_responses,
}


def ifeval_supported(item: dict) -> bool:
    return all(i in IFEVAL_CHECKERS for i in item["instruction_id_list"])


def ifeval_check(item: dict, response: str) -> list[bool]:
    """Per-instruction pass/fail for one IFEval item (strict); raises for unsupported ids."""
    out = []
    for iid, kw in zip(item["instruction_id_list"], item["kwargs"]):
        if iid not in IFEVAL_CHECKERS:
            raise KeyError(f"no checker for IFEval instruction {iid!r}; supported: {sorted(IFEVAL_CHECKERS)}")
        kw = {k: v for k, v in (kw or {}).items() if v is not None}
        out.append(bool(IFEVAL_CHECKERS[iid](response, **kw)))
    return out


def ifeval(loaded: LoadedLike, limit: int | None = None, steering: AbstractContextManager | None = None,
           items: Sequence[dict] | None = None, max_new_tokens: int = 512, batch_size: int = 8) -> list[bool]:
    """Prompt-level strict accuracy on the items whose every instruction has a checker.

    ``limit`` counts supported items (unsupported ones are dropped before the spread-out selection).
    """
    recs = _records("ifeval", [r for r in _records("ifeval", items, None) if ifeval_supported(r)], limit)
    with steering or nullcontext():
        responses = generate(loaded, [r["prompt"] for r in recs], max_new_tokens, batch_size, "ifeval")
    return [all(ifeval_check(r, resp)) for r, resp in zip(recs, responses)]


# --------------------------------------------------------------------------- language-model fidelity
# MMLU and GSM8K sit at chance / zero for a 135M model, so they cannot show a capability loss there. These
# checks can: the next-token loss on held-out English text, and how well a tuned model still predicts (and
# reproduces) the base model's own greedy answers to held-out benign requests. Hand-written because they are a
# few lines on top of the model's logits; lm-eval-harness would bring a second model-loading path.

@torch.inference_mode()
def sequence_nll(loaded: LoadedLike, sequences: Sequence[torch.Tensor], starts: Sequence[int],
                 batch_size: int = 8, desc: str = "scoring") -> tuple[list[float], list[int]]:
    """Per sequence: the summed next-token NLL (nats) of ``seq[start:]`` given everything before it, and the
    number of tokens scored. Right-padded batches, so positions are never shifted."""
    if len(sequences) != len(starts):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} start offsets")
    for i, (seq, st) in enumerate(zip(sequences, starts)):
        if not 1 <= st < len(seq):
            raise ValueError(f"sequence {i}: start {st} must be in [1, {len(seq) - 1}] (length {len(seq)})")
    sums, counts = [0.0] * len(sequences), [len(s) - st for s, st in zip(sequences, starts)]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    pad, device = _pad_id(loaded.tokenizer), next(loaded.model.parameters()).device
    for b in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=len(order) <= batch_size):
        idx = order[b:b + batch_size]
        T = max(len(sequences[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            ids[r, :len(sequences[i])], mask[r, :len(sequences[i])] = sequences[i], 1
        ids, mask = ids.to(device), mask.to(device)
        logits = loaded.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, T-1]
        for r, i in enumerate(idx):
            sums[i] = float(nll[r, starts[i] - 1:len(sequences[i]) - 1].sum())
    return sums, counts


def text_nll(loaded: LoadedLike, texts: Sequence[str], max_tokens: int = 128,
             batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Per passage: summed NLL of its first ``max_tokens`` tokens after the first (with the tokenizer's own
    special tokens), and the count."""
    seqs = []
    for i, t in enumerate(texts):
        ids = loaded.tokenizer(t, add_special_tokens=True)["input_ids"][:max_tokens]
        if len(ids) < 2:
            raise ValueError(f"text {i} has {len(ids)} token(s); need >= 2 to score a next token: {t[:40]!r}")
        seqs.append(torch.tensor(ids))
    return sequence_nll(loaded, seqs, [1] * len(seqs), batch_size, desc="text NLL")


def answer_nll(loaded: LoadedLike, prompts: Sequence[str], answers: Sequence[str],
               batch_size: int = 8) -> tuple[list[float], list[int]]:
    """Per item: summed NLL of ``answer`` as the assistant's reply to ``prompt`` (chat template), and its length."""
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    seqs, starts = [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        prompt_ids = loaded.encode_prompt(p)[0]
        ans = loaded.tokenizer(a, add_special_tokens=False)["input_ids"]
        if not ans:
            raise ValueError(f"answer {i} is empty: nothing to score")
        seqs.append(torch.cat([prompt_ids, torch.tensor(ans, dtype=prompt_ids.dtype)]))
        starts.append(len(prompt_ids))
    return sequence_nll(loaded, seqs, starts, batch_size, desc="answer NLL")


def paired_nll(base: tuple[Sequence[float], Sequence[int]], new: tuple[Sequence[float], Sequence[int]],
               n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """Token-weighted NLL per token for base and new, their perplexities, and the difference new - base with a
    95 % bootstrap interval over items (the same items and token counts on both sides)."""
    (bs, bc), (ns, nc) = base, new
    if list(bc) != list(nc) or len(bs) != len(ns) or not bc:
        raise ValueError("paired_nll needs the same non-empty items with the same token counts on both sides")
    bs, ns, c = torch.tensor(bs, dtype=torch.float64), torch.tensor(ns, dtype=torch.float64), torch.tensor(bc, dtype=torch.float64)
    b, n = float(bs.sum() / c.sum()), float(ns.sum() / c.sum())
    idx = torch.randint(len(c), (n_boot, len(c)), generator=torch.Generator().manual_seed(seed))
    boot = ((ns[idx] - bs[idx]).sum(1) / c[idx].sum(1)).sort().values
    return {"base_nll": b, "new_nll": n, "base_ppl": math.exp(b), "new_ppl": math.exp(n), "delta_nll": n - b,
            "delta_ci_low": float(boot[int(0.025 * n_boot)]), "delta_ci_high": float(boot[int(0.975 * n_boot) - 1]),
            "n_items": len(c), "n_tokens": int(c.sum())}


def lm_fidelity(base: LoadedLike, new: LoadedLike, texts: Sequence[str], prompts: Sequence[str],
                max_text_tokens: int = 128, answer_tokens: int = 48, batch_size: int = 8) -> dict[str, Any]:
    """How much of the base model's language modelling a tuned model keeps:

    * ``text``: NLL per token on held-out passages (base vs new, paired);
    * ``answers``: NLL per token of the *base model's* greedy answers to held-out requests, under each model;
    * ``greedy_agreement``: fraction of requests where the new model's greedy answer equals the base model's,
      and the mean fraction of the answer (in base-answer tokens) that matches before the first difference."""
    if not texts or not prompts:
        raise ValueError(f"lm_fidelity needs texts and prompts (got {len(texts)} texts, {len(prompts)} prompts)")
    out: dict[str, Any] = {"text": paired_nll(text_nll(base, texts, max_text_tokens, batch_size),
                                              text_nll(new, texts, max_text_tokens, batch_size))}
    base_ans = generate(base, prompts, answer_tokens, desc="base answers")
    new_ans = generate(new, prompts, answer_tokens, desc="tuned answers")
    keep = [i for i, a in enumerate(base_ans) if a]   # an empty answer (immediate end of turn) has no tokens to score
    p, a = [prompts[i] for i in keep], [base_ans[i] for i in keep]
    out["answers"] = paired_nll(answer_nll(base, p, a, batch_size), answer_nll(new, p, a, batch_size)) if keep else None
    tok = base.tokenizer
    prefix = []
    for b_, n_ in zip(base_ans, new_ans):
        bt, nt = tok(b_, add_special_tokens=False)["input_ids"], tok(n_, add_special_tokens=False)["input_ids"]
        k = next((j for j, (x, y) in enumerate(zip(bt, nt)) if x != y), min(len(bt), len(nt)))
        prefix.append(k / max(1, len(bt)) if bt != nt else 1.0)
    out["greedy_agreement"] = {"exact": sum(b_ == n_ for b_, n_ in zip(base_ans, new_ans)) / len(prompts),
                               "mean_matching_prefix": sum(prefix) / len(prefix), "n_prompts": len(prompts),
                               "answer_tokens": answer_tokens, "empty_base_answers": len(prompts) - len(keep)}
    return out


# --------------------------------------------------------------------------- generic task

class CapabilityTask(Protocol):
    """Anything that scores a model item by item: ``task(loaded, steering=None) -> list[bool]``.

    The testbed's addition task plugs in by implementing this; the items must be the same,
    in the same order, on every call so that runs can be paired.
    """

    name: str

    def __call__(self, loaded: LoadedLike, steering: AbstractContextManager | None = None) -> list[bool]: ...


@dataclass
class Task:
    """One of the built-in tasks with its settings bound: ``Task("mmlu", limit=200, kwargs={"shots": 5})``."""

    name: str
    limit: int | None = None
    kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in TASKS:
            raise ValueError(f"unknown capability task {self.name!r}; known: {sorted(TASKS)}")

    def __call__(self, loaded: LoadedLike, steering: AbstractContextManager | None = None) -> list[bool]:
        return TASKS[self.name](loaded, limit=self.limit, steering=steering, **self.kwargs)


TASKS: dict[str, Callable[..., list[bool]]] = {
    "mmlu": mmlu, "arc_challenge": arc_challenge, "gsm8k": gsm8k, "ifeval": ifeval}


def paired_run(task: CapabilityTask, loaded: LoadedLike, steering: AbstractContextManager,
               base: Sequence[bool] | None = None) -> tuple[list[bool], list[bool], Comparison]:
    """Run ``task`` without and with ``steering`` (reusing ``base`` if given) and compare."""
    base = list(base) if base is not None else task(loaded)
    new = task(loaded, steering=steering)
    return base, new, compare(base, new)
