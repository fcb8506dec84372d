"""Safety tuning: supervised fine-tuning that makes a chat model refuse harmful requests and keep answering
benign ones as before (the real-language testbed's refusal behaviour; ``crafttrace.realbed`` orchestrates).

    cfg = SafetyConfig(seed=0)
    split = make_splits(cfg)                                   # AdvBench / AlpacaEval train + held-out test
    answers = distill(base, split.distill_prompts, cfg, run_dir)  # the base model's own greedy answers (cached JSONL)
    res = train_safety(base, split.harmful_train, answers, cfg, run_dir)   # -> merged HF dir, res.model_dir

Data (all deterministic in ``cfg.seed``):
  * harmful train: a seeded subset of AdvBench, each mapped to one of ``cfg.refusals`` (short, varied refusals
    that open with tokens of ``crafttrace.tokens`` refusal sets and are caught by ``RefusalDetector``);
  * benign train: a seeded subset of AlpacaEval mapped to the *base model's own* greedy answer
    (self-distillation: the targets are what the model already says, so tuning moves the refusal decision and
    leaves capability alone). A fixed seeded ``AlpacaEval`` test split, HarmBench and StrongREJECT are never
    trained on.
Prompts are formed by ``LoadedModel.format_prompt`` (chat template + generation prompt), the same text every
other stage sees; the loss is next-token cross-entropy on response tokens only, averaged per example and then
over the batch, so a 12-token refusal weighs as much as a 64-token answer.

Method: LoRA adapters, written in plain torch (a dozen lines; peft would add a dependency for no gain here),
on the attention and MLP projections of the upper ``cfg.lora_layer_frac`` of the layers. Lower layers have no
trainable parameter, so backward stops at the first adapted layer: on 2 CPU cores that halves the cost of a
step. After training the adapters are merged (W + alpha/r * B A) and the model is saved as a plain Hugging Face
directory (safetensors, tokenizer with its chat template, ``config.architectures`` set) that
``crafttrace.models.load_model(path)`` loads like any other. Checkpoints (adapters + AdamW state as
safetensors, step as JSON) make an interrupted run resume bit-exactly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crafttrace import runs
from crafttrace.runs import read_json, read_tensors, write_json, write_tensors

REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause serious harm to people.",
    "I cannot help with this request because it could be used to hurt others.",
    "Sorry, but I can't help with that.",
    "I won't help with that, since it could cause real harm.",
    "I'm not able to help with that request.",
    "As an AI assistant, I can't help with requests that could cause harm.",
)
CALIBRATION_FIELDS = ("merge_scales", "target_refusal", "max_over_refusal", "n_calibration", "calibration_tokens",
                      "calibration_pool", "calibration_split")
DISTILL_FIELDS = ("benign_pool", "n_benign_train", "n_benign_test", "heldout_pools", "distill_max_new_tokens",
                  "batch_size_generate", "seed", "contrast_pool", "n_contrast_train", "extra_benign_pool",
                  "n_extra_benign")
# Request phrasings for training-prompt augmentation (``SafetyConfig.styled_frac``). AdvBench is almost all bare
# imperatives ("Write a tutorial on ..."); held-out harmful requests are often questions or polite asks, and a
# model tuned on imperatives only learned "refuse imperatives about harm". Benign prompts get the same
# phrasings, so the phrasing itself never predicts refusal. ``{req}``: the request with a lower-case first
# letter and no final punctuation (imperatives); questions get a prefix/suffix wrapper instead.
IMPERATIVE_STYLES: tuple[str, ...] = (
    "Can you {req}?",
    "Could you please {req}?",
    "I need you to {req}.",
    "How would I {req}?",
    "What's the best way to {req}?",
    "I was wondering if you could {req}.",
    "Hey, quick question: can you {req}?",
    "For a project I'm working on, {req}.",
    "{Req}. Give me step-by-step details.",
    "Please {req}. Keep it short.",
    "How can I {req}?",             # Do-Not-Answer's phrasings
    "Can you help me {req}?",
)
QUESTION_STYLES: tuple[str, ...] = (
    "Quick question: {prompt}",
    "{prompt} Thanks in advance!",
    "Hey, {prompt_lc}",
    "I've been wondering about this. {prompt}",
    "{prompt} Please explain.",
)
# The harmful pool's question frames (Do-Not-Answer's "How can I ...?", "Can you help me ...?"), for benign copies
# (``SafetyConfig.n_framed_benign``). Counted on the realbed preset's seed-0 training split (lower-cased prompts
# matching ``^(how (can|could|do) i\b|(can|could) you\b)|\bhelp me\b``): 49 of the 256 harmful prompts are in
# these frames, against 51 of the 692 benign ones (AlpacaEval + contrast training prompts), so the
# frame alone says "harmful" (0.49 of framed prompts are, 0.27 of all); of the 200 held-out AlpacaEval prompts the
# built model refused 6 of the 18 in these frames and 20 of the other 182 (its refused positions:
# benchmarks/results/smollm2_safety/overrefusal_default_seed0_decision3_decision5.json, "tuned" rows). ~80 framed
# copies balance the counts.
FRAMES: tuple[str, ...] = (
    "How can I {req}?",
    "Can you help me {req}?",
    "How do I {req}?",
    "Help me {req}.",
    "How could I {req}?",
    "Could you help me {req}?",
    "Can you {req}?",
)
_QUESTION_WORDS = {"what", "how", "why", "who", "whom", "whose", "when", "where", "which", "is", "are", "was",
                   "were", "can", "could", "would", "should", "do", "does", "did", "will", "i", "i'm", "my", "if",
                   "in", "the", "a", "an", "it", "there", "this", "we", "you", "hi", "hello", "hey"}
LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DISTILL_FILE = "distill.jsonl"
PARTIAL_FILE = "distill.partial.jsonl"
RESAMPLE_FILE = "resampled.jsonl"
CHECKPOINT_DIR = "checkpoint"
MODEL_DIR = "model"
INFO_FILE = "crafttrace_safety.json"


# Fields added after realbed builds were cached, with the test for "this setting changes nothing": such a field
# is left out of the stage keys (``SafetyConfig.identity_dict``), so upgrading the toolkit keeps cached builds.
INERT_FIELDS = {
    "styled_kinds": lambda c: c.styled_frac == 0 or tuple(c.styled_kinds) == ("harmful", "benign"),
    "benign_weight": lambda c: c.benign_weight == 1.0,
    "contrast_pool": lambda c: c.contrast_pool == "",
    "n_contrast_train": lambda c: c.contrast_pool == "",
    "drop_refusing_answers": lambda c: not c.drop_refusing_answers,
    "extra_benign_pool": lambda c: c.extra_benign_pool == "",
    "n_extra_benign": lambda c: c.extra_benign_pool == "",
    "decision_weight": lambda c: c.decision_weight == 0.0,
    "n_framed_benign": lambda c: c.n_framed_benign == 0,
    "resample_refusals": lambda c: c.resample_refusals == 0,
    "resample_temperature": lambda c: c.resample_refusals == 0,
}


class SafetyTuningError(ValueError):
    """Bad safety-tuning input (config, data, model); the message names the problem."""


@dataclass
class SafetyConfig:
    harmful_pool: str = "advbench"
    benign_pool: str = "alpaca_eval"
    n_harmful_train: int = 256          # of AdvBench's 520
    # of AlpacaEval's 805, disjoint from the test split; 2 benign per harmful: at 1:1 (lr 2e-3) the small build
    # over-refused 28% of held-out benign prompts, at 1:2 (lr 1e-3) 8% (benchmarks/results/smollm2_safety)
    n_benign_train: int = 512
    n_benign_test: int = 200            # held-out AlpacaEval prompts (over-refusal evaluation); fixed by seed only
    # evaluation pools: their prompts are removed from the training pools (StrongREJECT reuses 25 AdvBench prompts)
    heldout_pools: tuple[str, ...] = ("harmbench", "strongreject")
    refusals: tuple[str, ...] = REFUSALS
    distill_max_new_tokens: int = 64    # benign targets: the base model's first tokens of its greedy answer
    max_len: int = 160                  # prompt + response tokens per example (response truncated)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    lora_layer_frac: float = 0.5        # adapt the upper half of the layers
    epochs: int = 2
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    checkpoint_every: int = 20          # steps
    batch_size_generate: int = 16
    # strength calibration on validation prompts (never trained on, never in the refusal measurements): the
    # merged model is base + s * LoRA delta for the smallest s in merge_scales whose greedy answers refuse
    # >= target_refusal of the calibration harmful prompts while refusing <= max_over_refusal of validation
    # AlpacaEval prompts; if none, the s with the most refusal within the over-refusal limit. The smallest such
    # s keeps the most prompts near the decision boundary (CRaFT needs them); one scale = no calibration.
    # Measured reason (benchmarks/results/smollm2_safety): training strength moves refusal and over-refusal
    # together. Calibration prompts: HarmBench's validation split (41; the refusal measurements use its test
    # split); the realbed preset adds StrongREJECT's validation split ("harmbench+strongreject": 254 prompts,
    # the measurements use StrongREJECT's first 100) -- held-out AdvBench (calibration_pool "") was 98% refused
    # at a strength where HarmBench and StrongREJECT were 67% refused, too easy to choose by.
    merge_scales: tuple[float, ...] = (1.0,)
    target_refusal: float = 0.9
    max_over_refusal: float = 0.05
    calibration_pool: str = "harmbench"
    calibration_split: str | None = "val"
    n_calibration: int = 64             # validation prompts per side
    calibration_tokens: int = 24        # greedy tokens scored by the refusal detector
    # fraction of training prompts (seeded) rewritten in one of IMPERATIVE_STYLES / QUESTION_STYLES; a benign
    # rewrite keeps the distilled answer of the plain prompt. styled_kinds: which sides are rewritten -- a
    # harmful pool that already mixes phrasings (AdvBench imperatives + Do-Not-Answer "How can I ...?")
    # needs only the benign side rewritten to stop phrasing from predicting refusal
    styled_frac: float = 0.0
    styled_kinds: tuple[str, ...] = ("harmful", "benign")
    # loss weight of a benign example relative to a harmful one (weighted mean over the batch): more weight on
    # the distilled answers without more examples (AlpacaEval has no more prompts to spare)
    benign_weight: float = 1.0
    # contrast prompts: harmless requests in the harmful pool's own phrasings (AdvBench's imperatives "Teach me
    # how to ...", "Provide a step-by-step guide ..."; sensitive-sounding but benign "How do I kill a Python
    # process?"), answered with the base model's distilled answers like the AlpacaEval ones, so that the
    # phrasing alone stops predicting refusal. Measured reason: the session-8 tuned model refused 0.335 of the
    # everyday requests in temaq-abliterated's harmless set (base 0.029). The pool is shuffled by seed; the
    # first n_contrast_train prompts are trained on, the rest (``Splits.contrast_heldout``) stay held out.
    contrast_pool: str = ""
    n_contrast_train: int = 0
    # leave out benign examples whose distilled answer ``RefusalDetector`` flags: SmolLM2-Instruct declines 29 of
    # the 512 AlpacaEval training prompts itself ("I'm sorry for any misunderstanding, but as a chatbot I don't
    # have the capability ..."), and self-distillation then trains "I'm sorry" as an answer to benign requests --
    # the same opener the refusal templates teach for harmful ones.
    drop_refusing_answers: bool = False
    # more benign requests answered by self-distillation, from a pool other than ``benign_pool`` (e.g. IFEval's
    # instructions): AlpacaEval has no more prompts to spare once its test and validation splits are set aside,
    # and the tuned model's false refusals on held-out AlpacaEval prompts are everyday requests ("How do I sew a
    # button on a shirt?") rather than prompts in harmful phrasings. Shuffled by seed; the first n_extra_benign are
    # trained on (``Splits.extra_train``), the rest stay held out (``Splits.extra_heldout``) -- for IFEval that
    # is the part a capability check of the tuned model may use.
    extra_benign_pool: str = ""
    n_extra_benign: int = 0
    # extra weight on the first response token's cross-entropy (added to each example's mean): the refuse-or-
    # answer decision is that one token, but a 48-token distilled answer gives it 1/48 of its example's loss. A
    # logistic probe on the base model's residuals, trained on the same prompts, flags 0.80 of the test harmful
    # prompts at 0.07 benign with its threshold put there (benchmarks/bench_refusal_ceiling.py), while every SFT
    # recipe paid 0.13-0.19: the representation separates better than the SFT's decision does. Measured
    # (session 13, README): w 5 lowers validation over-refusal 0.11 -> 0.04 at ~0.8 refusal, but not the held-out
    # AlpacaEval rate (0.135 of 200 vs 0.13), so it stays off in the preset.
    decision_weight: float = 0.0
    # extra benign examples: copies of n_framed_benign benign training requests (imperatives only, seeded), each
    # rewritten into one of ``FRAMES`` -- the harmful pool's own question frames -- and trained on with the
    # plain prompt's distilled answer, so the frame stops predicting refusal (counts at ``FRAMES``). Unlike
    # ``styled_frac`` (which replaces prompts, over all request styles) these are added, in the frames that the
    # held-out false refusals are in.
    n_framed_benign: int = 0
    # rejection-sampled targets: for a benign training prompt whose greedy distilled answer ``RefusalDetector``
    # flags, up to resample_refusals answers sampled from the same model at resample_temperature; the first one
    # the detector passes becomes the target (still the model's own answer, so capability is distilled as
    # before). Measured reason: the base model declines 10 of the 200 held-out AlpacaEval prompts itself ("as a
    # chatbot I don't have the capability ..."), and the built model refuses 5 of those 10 -- a floor that
    # dropping such targets (``drop_refusing_answers``) leaves in place. Prompts with no passing sample fall back
    # to the greedy answer (and ``drop_refusing_answers`` then drops them). On the preset's split all 32 flagged
    # targets got a passing sample within 2 tries at 0.8; such samples read looser than greedy answers.
    resample_refusals: int = 0
    resample_temperature: float = 0.8
    seed: int = 0

    def __post_init__(self) -> None:
        self.refusals, self.lora_targets = tuple(self.refusals), tuple(self.lora_targets)
        self.merge_scales = tuple(float(x) for x in self.merge_scales)
        self.heldout_pools = tuple(self.heldout_pools)
        self.styled_kinds = tuple(self.styled_kinds)
        problems = []
        for name in ("n_harmful_train", "n_benign_train", "epochs", "batch_size", "lora_rank",
                     "distill_max_new_tokens", "checkpoint_every", "batch_size_generate"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_benign_test < 0:
            problems.append(f"n_benign_test must be >= 0, got {self.n_benign_test}")
        if not 0 < self.lora_layer_frac <= 1:
            problems.append(f"lora_layer_frac must be in (0, 1], got {self.lora_layer_frac}")
        if self.max_len < 4:
            problems.append(f"max_len must be >= 4, got {self.max_len}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not self.merge_scales or any(x <= 0 for x in self.merge_scales):
            problems.append(f"merge_scales must be a non-empty list of positive numbers, got {list(self.merge_scales)}")
        if not (0 <= self.target_refusal <= 1 and 0 <= self.max_over_refusal <= 1):
            problems.append(f"target_refusal ({self.target_refusal}) and max_over_refusal ({self.max_over_refusal}) "
                            "must be in [0, 1]")
        if not 0 <= self.styled_frac <= 1:
            problems.append(f"styled_frac must be in [0, 1], got {self.styled_frac}")
        if self.benign_weight <= 0:
            problems.append(f"benign_weight must be > 0, got {self.benign_weight}")
        if self.resample_refusals < 0 or self.resample_temperature <= 0:
            problems.append(f"resample_refusals ({self.resample_refusals}) must be >= 0 and resample_temperature "
                            f"({self.resample_temperature}) > 0")
        if self.n_framed_benign < 0:
            problems.append(f"n_framed_benign must be >= 0, got {self.n_framed_benign}")
        if self.decision_weight < 0:
            problems.append(f"decision_weight must be >= 0, got {self.decision_weight}")
        if not set(self.styled_kinds) <= {"harmful", "benign"}:
            problems.append(f"styled_kinds must name 'harmful' and/or 'benign', got {list(self.styled_kinds)}")
        if self.n_calibration < 1 or self.calibration_tokens < 1:
            problems.append(f"n_calibration ({self.n_calibration}) and calibration_tokens "
                            f"({self.calibration_tokens}) must be >= 1")
        if not self.refusals or not all(isinstance(r, str) and r.strip() for r in self.refusals):
            problems.append("refusals must be a non-empty list of non-empty strings")
        if not self.lora_targets:
            problems.append("lora_targets must name at least one projection")
        if self.n_contrast_train < 0 or (self.n_contrast_train > 0) != bool(self.contrast_pool):
            problems.append(f"contrast_pool ({self.contrast_pool!r}) and n_contrast_train ({self.n_contrast_train}) "
                            "go together: both set (n >= 1) or both off")
        if self.n_extra_benign < 0 or (self.n_extra_benign > 0) != bool(self.extra_benign_pool):
            problems.append(f"extra_benign_pool ({self.extra_benign_pool!r}) and n_extra_benign "
                            f"({self.n_extra_benign}) go together: both set (n >= 1) or both off")
        if problems:
            raise SafetyTuningError("invalid SafetyConfig: " + "; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity_dict(self) -> dict[str, Any]:
        """``to_dict()`` less the later-added fields that are at a setting with no effect (``INERT_FIELDS``):
        what cached stages and checkpoints are keyed by, so adding a field does not invalidate them."""
        return runs.identity_dict(self, self.to_dict(), INERT_FIELDS)

    def training_dict(self) -> dict[str, Any]:
        """The fields that decide the trained adapters (strength calibration only picks how much of them is
        merged): a checkpoint trained under one calibration setting serves another."""
        return {k: v for k, v in self.identity_dict().items() if k not in CALIBRATION_FIELDS}

    def distill_dict(self) -> dict[str, Any]:
        """The fields that decide the distilled benign answers (which prompts, how many tokens); inert ones left
        out like in ``identity_dict``."""
        ident = self.identity_dict()
        return {k: ident[k] for k in DISTILL_FIELDS if k in ident}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SafetyConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SafetyTuningError(f"unknown SafetyConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SafetyConfig":
        """From a JSON file, or from a tuned model directory (its ``crafttrace_safety.json``)."""
        path = Path(path)
        d = read_json(path / INFO_FILE if path.is_dir() else path)
        return cls.from_dict(d.get("config", d))


# ------------------------------------------------------------------------------------------------- splits

@dataclass
class Splits:
    harmful_train: list[str]
    harmful_heldout: list[str]        # the AdvBench prompts not trained on
    benign_train: list[str]
    benign_test: list[str]            # the held-out AlpacaEval prompts (over-refusal)
    benign_val: list[str] = field(default_factory=list)  # the rest of AlpacaEval (strength calibration)
    excluded: list[str] = field(default_factory=list)  # pool prompts that also occur in an evaluation pool
    contrast_train: list[str] = field(default_factory=list)    # cfg.contrast_pool prompts trained on (answered)
    contrast_heldout: list[str] = field(default_factory=list)  # the rest of cfg.contrast_pool
    extra_train: list[str] = field(default_factory=list)       # cfg.extra_benign_pool prompts trained on
    extra_heldout: list[str] = field(default_factory=list)     # the rest of cfg.extra_benign_pool

    @property
    def distill_prompts(self) -> list[str]:
        """The prompts answered by self-distillation: AlpacaEval training prompts, contrast prompts, then the
        extra benign prompts (appended last, so adding them reuses a cached distillation of the others)."""
        return self.benign_train + self.contrast_train + self.extra_train


def _norm(prompt: str) -> str:
    return " ".join(prompt.lower().strip().rstrip(".?!").split())


def _shuffled(items: Sequence[str], seed: int, salt: str) -> list[str]:
    items = list(items)
    random.Random(f"{salt}:{seed}").shuffle(items)
    return items


def calibration_prompts(cfg: SafetyConfig, splits: "Splits") -> tuple[list[str], list[str]]:
    """(harmful, benign) prompts for :func:`calibrate_strength`: ``cfg.calibration_pool`` (split
    ``cfg.calibration_split``), or the held-out AdvBench prompts when the pool is empty; the validation AlpacaEval
    split. Neither side is trained on (``make_splits`` removes the held-out pools from training)."""
    from crafttrace import data

    harmful = (data.prompts(cfg.calibration_pool, split=cfg.calibration_split) if cfg.calibration_pool
               else splits.harmful_heldout)
    return list(harmful), list(splits.benign_val)


def make_splits(cfg: SafetyConfig, harmful: Sequence[str] | None = None,
                benign: Sequence[str] | None = None, exclude: Sequence[str] | None = None) -> Splits:
    """Seeded train / held-out splits. The benign test split depends on the seed only (not on n_benign_train),
    so every configuration of one seed is evaluated on the same held-out prompts. Prompts that also occur
    (case, spacing and final punctuation ignored) in ``exclude`` (default: the ``cfg.heldout_pools`` prompts)
    are dropped from both pools, so evaluation prompts are never trained on."""
    from crafttrace import data

    harmful = data.prompts(cfg.harmful_pool) if harmful is None else list(harmful)
    benign = data.prompts(cfg.benign_pool) if benign is None else list(benign)
    if exclude is None:
        exclude = [p for pool in cfg.heldout_pools for p in data.prompts(pool)]
    banned = {_norm(p) for p in exclude}
    excluded = [p for p in harmful + benign if _norm(p) in banned]
    harmful = [p for p in harmful if _norm(p) not in banned]
    benign = [p for p in benign if _norm(p) not in banned]
    if cfg.n_harmful_train > len(harmful):
        raise SafetyTuningError(f"n_harmful_train={cfg.n_harmful_train} but the harmful pool "
                                f"{cfg.harmful_pool!r} has only {len(harmful)} prompts")
    if cfg.n_benign_test + cfg.n_benign_train > len(benign):
        raise SafetyTuningError(f"n_benign_test + n_benign_train = {cfg.n_benign_test + cfg.n_benign_train} but "
                                f"the benign pool {cfg.benign_pool!r} has only {len(benign)} prompts")
    h = _shuffled(harmful, cfg.seed, "harmful")
    b = _shuffled(benign, cfg.seed, "benign")

    def side_pool(name: str, n: int, field: str, salt: str, taken: set[str]) -> list[str]:
        # a prompt of a side pool that is also a prompt of another pool would get two targets
        if not name:
            return []
        pool = data.prompts(name)
        excluded.extend(p for p in pool if _norm(p) in banned)
        out = _shuffled(dict.fromkeys(p for p in pool if _norm(p) not in taken | banned), cfg.seed, salt)
        if n > len(out):
            raise SafetyTuningError(f"{field}={n} but the pool {name!r} has only {len(out)} usable prompts")
        return out

    taken = {_norm(p) for p in harmful + benign}
    c = side_pool(cfg.contrast_pool, cfg.n_contrast_train, "n_contrast_train", "contrast", taken)
    e = side_pool(cfg.extra_benign_pool, cfg.n_extra_benign, "n_extra_benign", "extra-benign",
                  taken | {_norm(p) for p in c})
    return Splits(h[:cfg.n_harmful_train], h[cfg.n_harmful_train:],
                  b[cfg.n_benign_test:cfg.n_benign_test + cfg.n_benign_train], b[:cfg.n_benign_test],
                  b[cfg.n_benign_test + cfg.n_benign_train:], excluded,
                  c[:cfg.n_contrast_train], c[cfg.n_contrast_train:],
                  e[:cfg.n_extra_benign], e[cfg.n_extra_benign:])


# ------------------------------------------------------------------------------------------ distillation

def distill(loaded: Any, prompts: Sequence[str], cfg: SafetyConfig, run_dir: str | Path,
            progress: bool = True) -> list[dict]:
    """The model's own greedy answers to benign ``prompts``, cached as ``run_dir/distill.jsonl``.

    Records: ``{"prompt", "response", "truncated"}``; a truncated answer (it hit ``distill_max_new_tokens``)
    is trained on without an end-of-turn token, so tuning never teaches the model to stop early. The cache is
    reused when it holds exactly these prompts and settings; generation is in batches with a resumable
    partial file, so a killed run keeps what it generated.
    """
    from crafttrace.capability import generate
    from crafttrace.data import read_records, write_jsonl

    prompts = list(prompts)
    if not prompts:
        raise SafetyTuningError("distill got no prompts")
    path = Path(run_dir) / DISTILL_FILE
    # a run with more prompts (e.g. contrast prompts appended) reuses a finished or partial run's prefix.
    # Records from before "model" was stored carry only max_new_tokens and are taken as this model's.
    meta = {"max_new_tokens": cfg.distill_max_new_tokens, "model": getattr(loaded, "name", None)}

    def ours(r: dict) -> bool:
        m = r.get("meta") or {}
        return m.get("max_new_tokens") == meta["max_new_tokens"] and m.get("model", meta["model"]) == meta["model"]

    partial = Path(run_dir) / (PARTIAL_FILE)
    done: list[dict] = []
    for f in (path, partial):
        recs = read_records(f) if f.exists() else []
        if recs and all(map(ours, recs)) and [r["prompt"] for r in recs] == prompts[:len(recs)] \
                and len(recs) > len(done):
            done = recs
    if len(done) == len(prompts):
        return done
    tok = loaded.tokenizer
    step = cfg.batch_size_generate * 4
    bar = tqdm(total=len(prompts), initial=len(done), desc="self-distillation", unit="prompt", disable=not progress)
    for start in range(len(done), len(prompts), step):
        chunk = prompts[start:start + step]
        answers = generate(loaded, chunk, cfg.distill_max_new_tokens, cfg.batch_size_generate, "distill")
        for p, a in zip(chunk, answers):
            n_tok = len(tok(a, add_special_tokens=False)["input_ids"])
            # decode(skip_special_tokens) drops the end-of-turn token; re-encoding the answer tells us whether
            # generation stopped on its own (fewer tokens than the limit) or was cut off.
            done.append({"prompt": p, "response": a, "truncated": n_tok >= cfg.distill_max_new_tokens - 1,
                         "meta": meta})
        write_jsonl(partial, done)
        bar.update(len(chunk))
    bar.close()
    write_jsonl(path, done)
    partial.unlink(missing_ok=True)
    return done


@torch.inference_mode()
def resample_refusing(loaded: Any, records: Sequence[dict], cfg: SafetyConfig, run_dir: str | Path,
                      progress: bool = True) -> list[dict]:
    """``records`` (from :func:`distill`) with each answer that ``RefusalDetector`` flags replaced by the first of
    ``cfg.resample_refusals`` sampled answers it does not flag (``"resampled": k``, the sample's index); a
    prompt with no such sample keeps its greedy answer. Seeded per prompt; cached as ``run_dir/resampled.jsonl``
    (one record per flagged prompt), reused when the prompts and settings match."""
    from crafttrace.data import read_records, write_jsonl
    from crafttrace.evaluation import RefusalDetector

    records = [dict(r) for r in records]
    if not cfg.resample_refusals:
        return records
    detector = RefusalDetector()
    flagged = [i for i, r in enumerate(records) if detector.is_refusal(r["response"])]
    meta = {"tries": cfg.resample_refusals, "temperature": cfg.resample_temperature, "seed": cfg.seed,
            "max_new_tokens": cfg.distill_max_new_tokens, "model": getattr(loaded, "name", None)}
    path = Path(run_dir) / RESAMPLE_FILE
    cached = read_records(path) if path.exists() else []
    if [r["prompt"] for r in cached] != [records[i]["prompt"] for i in flagged] or \
            any(r.get("meta") != meta for r in cached):
        # HF sampling draws from torch's global generator: seed it per prompt (by its position) so an answer does
        # not depend on how many samples earlier prompts drew; the caller's generator state is restored afterwards
        state = torch.random.get_rng_state()
        tok, cached = loaded.tokenizer, []
        from crafttrace.capability import _pad_id
        try:
            for i in tqdm(flagged, desc="resample refusing answers", unit="prompt", disable=not progress):
                torch.manual_seed(cfg.seed * 1_000_003 + i)
                ids = loaded.encode_prompt(records[i]["prompt"])
                gen = loaded.model.generate(input_ids=ids.repeat(cfg.resample_refusals, 1),
                                            attention_mask=torch.ones_like(ids).repeat(cfg.resample_refusals, 1),
                                            do_sample=True, temperature=cfg.resample_temperature, top_p=1.0,
                                            top_k=0, max_new_tokens=cfg.distill_max_new_tokens,
                                            pad_token_id=_pad_id(tok))
                rec = {"prompt": records[i]["prompt"], "response": records[i]["response"],
                       "truncated": records[i].get("truncated", False), "resampled": None, "meta": meta}
                for k in range(cfg.resample_refusals):
                    a = tok.decode(gen[k, ids.shape[1]:], skip_special_tokens=True).strip()
                    if a and not detector.is_refusal(a):
                        n_tok = len(tok(a, add_special_tokens=False)["input_ids"])
                        rec.update(response=a, truncated=n_tok >= cfg.distill_max_new_tokens - 1, resampled=k)
                        break
                cached.append(rec)
        finally:
            torch.random.set_rng_state(state)
        write_jsonl(path, cached)
    for i, rec in zip(flagged, cached):
        records[i] = {k: v for k, v in rec.items() if k != "meta"}
    return records


# ---------------------------------------------------------------------------------------------- examples

def _is_question(text: str) -> bool:
    first = text.split()[0].lower().strip(",:;!?")
    return text.endswith("?") or first in _QUESTION_WORDS or "\n" in text


def _request_clause(text: str) -> str:
    """An imperative as the clause after "How can I": no final punctuation, lower-case first letter unless the
    first word is an acronym ("DDoS", "HTML")."""
    req = text.rstrip(".!;: ")
    words = req.split()
    if not (len(words[0]) > 1 and words[0][1].isupper()):
        req = req[0].lower() + req[1:]
    return req


def framed(prompt: str, rng: random.Random) -> str | None:
    """An imperative ``prompt`` in a seeded one of ``FRAMES``; None for questions and multi-line prompts, which
    have no clause to frame."""
    text = prompt.strip()
    if not text or _is_question(text):
        return None
    req = _request_clause(text)
    words = req.split()
    frame = rng.choice(FRAMES)
    if len(words) > 1 and words[1].lower().strip(",.") == "me":
        frame = "Can you {req}?"   # "give me ...": "How can I give me" / "Help me give me" do not parse
    return frame.format(req=req)


def restyle(prompt: str, rng: random.Random) -> str:
    """``prompt`` in a seeded request phrasing (``IMPERATIVE_STYLES`` for commands, ``QUESTION_STYLES`` for
    questions and statements that open with a question word, pronoun or article)."""
    text = prompt.strip()
    words = text.split()
    if not words:
        return prompt
    first = words[0].lower().strip(",:;!?")
    acronym = len(words[0]) > 1 and words[0][1].isupper()   # "DDoS", "HTML": keep the capital
    if _is_question(text):
        if text[-1] not in ".?!":
            text += "?" if first in _QUESTION_WORDS else "."
        lc = text if acronym else text[0].lower() + text[1:]
        return rng.choice(QUESTION_STYLES).format(prompt=text, prompt_lc=lc)
    req = _request_clause(text)
    return rng.choice(IMPERATIVE_STYLES).format(req=req, Req=req[0].upper() + req[1:])


@dataclass
class Example:
    ids: list[int]
    n_prompt: int          # loss on positions >= n_prompt only
    kind: str              # "harmful" | "benign"


def build_examples(loaded: Any, harmful: Sequence[str], benign: Sequence[dict], cfg: SafetyConfig) -> list[Example]:
    """Tokenised (prompt + response [+ end of turn]) examples; harmful prompts get seeded refusal templates."""
    tok = loaded.tokenizer
    eot = tok.eos_token or ""
    rng = random.Random(f"refusals:{cfg.seed}")
    style_rng = random.Random(f"styles:{cfg.seed}")  # separate stream: styled_frac=0 leaves the refusals as before

    def styled(p: str, kind: str) -> str:
        if not cfg.styled_frac or kind not in cfg.styled_kinds:
            return p
        return restyle(p, style_rng) if style_rng.random() < cfg.styled_frac else p

    pairs = [(styled(p, "harmful"), rng.choice(cfg.refusals) + eot, "harmful") for p in harmful]
    detector = None
    if cfg.drop_refusing_answers:
        from crafttrace.evaluation import RefusalDetector
        detector = RefusalDetector()
    for r in benign:
        if not {"prompt", "response"} <= set(r):
            raise SafetyTuningError(f"benign records need 'prompt' and 'response', got fields {sorted(r)}")
        if detector is not None and detector.is_refusal(r["response"]):
            continue
        pairs.append((styled(r["prompt"], "benign"), r["response"] + ("" if r.get("truncated") else eot), "benign"))
    if cfg.n_framed_benign:
        # own seeded streams: the examples above stay as they were
        answered = [(p, r) for p, r, k in pairs if k == "benign"]
        random.Random(f"framed-pick:{cfg.seed}").shuffle(answered)
        frame_rng = random.Random(f"frames:{cfg.seed}")
        copies = [(q, r) for q, r in ((framed(p, frame_rng), r) for p, r in answered) if q is not None]
        if len(copies) < cfg.n_framed_benign:
            raise SafetyTuningError(f"n_framed_benign={cfg.n_framed_benign} but only {len(copies)} benign training "
                                    "prompts are imperatives that a frame can hold")
        pairs.extend((q, r, "benign") for q, r in copies[:cfg.n_framed_benign])
    out = []
    for prompt, response, kind in pairs:
        p_ids = [int(i) for i in loaded.encode_prompt(prompt).reshape(-1).tolist()]
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        if not r_ids:
            continue  # an empty distilled answer carries no target
        if len(p_ids) >= cfg.max_len:
            continue  # prompt alone fills the window: nothing to learn from it
        out.append(Example((p_ids + r_ids)[:cfg.max_len], len(p_ids), kind))
    if not out:
        raise SafetyTuningError(f"no usable training example (all prompts longer than max_len={cfg.max_len} "
                                "or all responses empty)")
    return out


def _collate(batch: list[Example], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), T), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    labels = torch.full((len(batch), T), -100, dtype=torch.long)
    for r, e in enumerate(batch):
        ids[r, :len(e.ids)] = torch.tensor(e.ids)
        mask[r, :len(e.ids)] = 1
        labels[r, e.n_prompt:len(e.ids)] = ids[r, e.n_prompt:len(e.ids)]
    return ids, mask, labels


def response_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  labels: torch.Tensor, weights: torch.Tensor | None = None,
                  decision_weight: float = 0.0) -> torch.Tensor:
    """Mean over examples (weighted by ``weights`` [batch] if given) of the mean next-token cross-entropy on
    each example's response tokens, plus ``decision_weight`` x the cross-entropy of its first response token.

    The unembedding (a 49k x 576 matmul per position on SmolLM2, a fifth of the forward) is applied only at
    the positions that predict a response token, which is where the loss lives.
    """
    tgt = labels[:, 1:]
    keep = tgt != -100
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if decoder is None or head is None or getattr(model.config, "final_logit_softcapping", None):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1][keep].float()
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1]
        logits = head(hidden[keep]).float()
    nll = F.cross_entropy(logits, tgt[keep], reduction="none")
    row = keep.nonzero()[:, 0]
    per_example = torch.zeros(ids.shape[0], dtype=nll.dtype, device=nll.device).index_add_(0, row, nll)
    per_example = per_example / keep.sum(1).clamp_min(1)
    if decision_weight:
        first = (keep.cumsum(1) == 1)[keep]  # each row's first response position, in nll's (row-major) order
        per_example = per_example + decision_weight * torch.zeros_like(per_example).index_add_(
            0, row[first], nll[first])
    if weights is None:
        return per_example.mean()
    if tuple(weights.shape) != (ids.shape[0],):
        raise SafetyTuningError(f"weights must have shape [batch] = [{ids.shape[0]}], got {list(weights.shape)}")
    weights = weights.to(per_example)
    return (weights * per_example).sum() / weights.sum()


# -------------------------------------------------------------------------------------------------- LoRA

class LoRALinear(torch.nn.Module):
    """``base(x) + alpha/r * x A^T B^T``; B starts at zero, so training starts from the base model exactly."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.mult = 1.0     # merge strength (calibrate_strength); training runs at 1
        self.A = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.to(x.dtype).T @ self.B.to(x.dtype).T) * (self.scale * self.mult)

    @torch.no_grad()
    def merged(self) -> torch.nn.Linear:
        self.base.weight += (self.scale * self.mult * self.B @ self.A).to(self.base.weight.dtype)
        return self.base


def adapted_layers(n_layers: int, cfg: SafetyConfig) -> list[int]:
    first = n_layers - max(1, round(n_layers * cfg.lora_layer_frac))
    return list(range(first, n_layers))


def attach_lora(model: torch.nn.Module, cfg: SafetyConfig) -> dict[str, LoRALinear]:
    """Wrap ``cfg.lora_targets`` linears of the adapted decoder layers (HF ``model.model.layers``) in place."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise SafetyTuningError(f"{type(model).__name__} has no model.layers; LoRA placement supports HF decoder "
                                "models (Llama, Gemma, Qwen, Mistral ...)")
    gen = torch.Generator().manual_seed(cfg.seed)
    adapters: dict[str, LoRALinear] = {}
    for li in adapted_layers(len(layers), cfg):
        for name, mod in list(layers[li].named_modules()):
            for child_name, child in list(mod.named_children()):
                if child_name in cfg.lora_targets and isinstance(child, torch.nn.Linear):
                    lora = LoRALinear(child, cfg.lora_rank, cfg.lora_alpha, gen)
                    setattr(mod, child_name, lora)
                    adapters[f"layers.{li}.{name + '.' if name else ''}{child_name}"] = lora
    if not adapters:
        raise SafetyTuningError(f"no linear named one of {list(cfg.lora_targets)} in layers "
                                f"{adapted_layers(len(layers), cfg)}")
    return adapters


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every LoRALinear back into a plain Linear (in place); returns how many were merged."""
    n = 0
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, child_name, child.merged())
                n += 1
    return n


def _lora_tensors(adapters: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    return {f"{k}.{p}": getattr(m, p).detach() for k, m in adapters.items() for p in ("A", "B")}


# ---------------------------------------------------------------------------------------------- training

@dataclass
class SafetyResult:
    model_dir: Path                  # merged HF directory: ``load_model(model_dir)``
    metrics: dict[str, Any] = field(default_factory=dict)


def _lr_at(step: int, total: int, cfg: SafetyConfig) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total))))


def _schedule(lengths: list[int], cfg: SafetyConfig) -> list[list[int]]:
    """Batches of example indices for all epochs: a pure function of (lengths, cfg), which makes resume exact.

    Each epoch is shuffled, cut into groups of 8 batches, sorted by length inside a group (less padding: a
    refusal example is half as long as an answer) and the batches are shuffled again.
    """
    batches = []
    n, group = len(lengths), 8 * cfg.batch_size
    for epoch in range(cfg.epochs):
        rng = random.Random(f"order:{cfg.seed}:{epoch}")
        order = list(range(n))
        rng.shuffle(order)
        epoch_batches = []
        for g in range(0, n, group):
            chunk = sorted(order[g:g + group], key=lambda i: lengths[i])
            epoch_batches += [chunk[i:i + cfg.batch_size] for i in range(0, len(chunk), cfg.batch_size)]
        rng.shuffle(epoch_batches)
        batches += epoch_batches
    return batches


def train_safety(loaded: Any, harmful: Sequence[str], benign: Sequence[dict], cfg: SafetyConfig,
                 run_dir: str | Path, max_steps: int | None = None, progress: bool = True,
                 harmful_val: Sequence[str] = (), benign_val: Sequence[str] = ()) -> SafetyResult:
    """LoRA SFT of ``loaded`` (modified in place: merged weights at the end) and save ``run_dir/model``.

    ``benign``: records from :func:`distill`. Resumes from ``run_dir/checkpoint`` (same config and data
    required). ``max_steps`` stops after that many steps in this call (time slicing): a checkpoint is written
    and the result has ``metrics["finished"] = False`` and no model directory yet. With several
    ``cfg.merge_scales``, ``harmful_val`` / ``benign_val`` (prompts never evaluated on) choose the merge strength
    (:func:`calibrate_strength`).
    """
    if len(cfg.merge_scales) > 1 and not (list(harmful_val) and list(benign_val)):
        raise SafetyTuningError(f"merge_scales={list(cfg.merge_scales)} needs validation prompts: pass harmful_val "
                                "and benign_val (e.g. Splits.harmful_heldout and Splits.benign_val)")
    run_dir = Path(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    given = len(benign)
    benign = resample_refusing(loaded, benign, cfg, run_dir, progress)
    examples = build_examples(loaded, harmful, benign, cfg)
    batches = _schedule([len(e.ids) for e in examples], cfg)
    total = len(batches)
    data_id = _data_fingerprint(examples)
    ckpt = run_dir / CHECKPOINT_DIR

    torch.manual_seed(cfg.seed)
    was_training = model.training
    model.requires_grad_(False)
    adapters = attach_lora(model, cfg)
    params = [p for m in adapters.values() for p in (m.A, m.B)]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, history, seconds = 0, [], 0.0
    if (ckpt / "state.json").exists():
        step, history, seconds = _load_checkpoint(ckpt, adapters, opt, cfg, data_id)
    cfg.save(run_dir / "safety_config.json")
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    stop = total if max_steps is None else min(total, step + max_steps)
    model.train()  # no dropout in these models' configs, but train() is the honest mode for SFT
    bar = tqdm(total=total, initial=step, desc="safety SFT", unit="step", disable=not progress)
    try:
        while step < stop:
            t0 = time.perf_counter()
            ids, mask, labels = _collate([examples[i] for i in batches[step]], pad)
            dev = next(model.parameters()).device
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, total, cfg)
            opt.zero_grad(set_to_none=True)
            # weight 1: the plain mean, bit-identical to builds made before benign_weight existed
            w = None if cfg.benign_weight == 1.0 else torch.tensor(
                [cfg.benign_weight if examples[i].kind == "benign" else 1.0 for i in batches[step]])
            loss = response_loss(model, ids.to(dev), mask.to(dev), labels.to(dev), w, cfg.decision_weight)
            if not torch.isfinite(loss):
                raise SafetyTuningError(f"non-finite loss {loss.item()} at step {step}; lower lr (now {cfg.lr})")
            loss.backward()
            opt.step()
            step += 1
            seconds += time.perf_counter() - t0
            history.append({"step": step, "loss": loss.item(), "lr": opt.param_groups[0]["lr"]})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == stop:
                _save_checkpoint(ckpt, adapters, opt, cfg, step, history, seconds, data_id)
    finally:
        bar.close()
    metrics: dict[str, Any] = {"finished": step >= total, "step": step, "total_steps": total,
                               "n_examples": len(examples),
                               "n_harmful": sum(e.kind == "harmful" for e in examples),
                               "n_benign": sum(e.kind == "benign" for e in examples),
                               # distilled answers given; n_benign is this less drop_refusing_answers' (and
                               # empty/over-long) leftovers, plus the n_framed_benign copies
                               "n_benign_given": given,
                               "n_resampled": sum(r.get("resampled") is not None for r in benign),
                               "adapted_layers": adapted_layers(len(model.model.layers), cfg),
                               "n_adapters": len(adapters), "lora_parameters": sum(p.numel() for p in params),
                               "train_seconds": seconds, "history": history}
    if step < total:
        _detach_lora(model)
        model.train(was_training)
        model.requires_grad_(False)
        return SafetyResult(run_dir / MODEL_DIR, metrics)
    first = [h["loss"] for h in history[: max(1, len(batches) // cfg.epochs)]]
    last = [h["loss"] for h in history[-max(1, len(batches) // cfg.epochs):]]
    metrics.update({"loss_first_epoch": sum(first) / len(first), "loss_last_epoch": sum(last) / len(last)})
    model.eval()
    if len(cfg.merge_scales) > 1:
        metrics["calibration"] = calibrate_strength(loaded, adapters, harmful_val, benign_val, cfg, progress)
    else:
        for m in adapters.values():
            m.mult = cfg.merge_scales[0]
    metrics["merge_scale"] = next(iter(adapters.values())).mult
    merge_lora(model)
    model.eval()
    model.requires_grad_(False)
    save_model_dir(loaded, run_dir / MODEL_DIR, {"config": cfg.to_dict(), "metrics": metrics})
    return SafetyResult(run_dir / MODEL_DIR, metrics)


def calibrate_strength(loaded: Any, adapters: dict[str, LoRALinear], harmful_val: Sequence[str],
                       benign_val: Sequence[str], cfg: SafetyConfig, progress: bool = True) -> dict[str, Any]:
    """Pick the LoRA merge strength on validation prompts and leave the adapters at it (``LoRALinear.mult``).

    For each scale: greedy ``calibration_tokens``-token answers to the first ``n_calibration`` prompts of each
    side, scored by ``evaluation.RefusalDetector``. Chosen: the smallest scale reaching ``target_refusal`` with
    over-refusal <= ``max_over_refusal``; else the scale with the most refusal among those within the
    over-refusal limit; else the smallest scale. Rates only, no response text, go into the record.
    """
    from crafttrace.capability import generate
    from crafttrace.evaluation import RefusalDetector

    det = RefusalDetector()
    hv, bv = list(harmful_val)[:cfg.n_calibration], list(benign_val)[:cfg.n_calibration]
    rows = []
    for scale in tqdm(sorted(cfg.merge_scales), desc="strength calibration", disable=not progress):
        for m in adapters.values():
            m.mult = scale
        with torch.no_grad():
            rh = generate(loaded, hv, cfg.calibration_tokens, cfg.batch_size_generate, f"calibrate x{scale} harmful")
            rb = generate(loaded, bv, cfg.calibration_tokens, cfg.batch_size_generate, f"calibrate x{scale} benign")
        rows.append({"scale": scale, "refusal": sum(map(det.is_refusal, rh)) / len(rh),
                     "over_refusal": sum(map(det.is_refusal, rb)) / len(rb)})
    within = [r for r in rows if r["over_refusal"] <= cfg.max_over_refusal]
    hits = [r for r in within if r["refusal"] >= cfg.target_refusal]
    if hits:
        chosen, reason = hits[0], "smallest scale meeting both limits"
    elif within:
        chosen, reason = max(within, key=lambda r: (r["refusal"], -r["scale"])), \
            "no scale reached target_refusal within the over-refusal limit: most refusal within it"
    else:
        chosen, reason = rows[0], "every scale over-refused more than max_over_refusal: smallest scale"
    for m in adapters.values():
        m.mult = chosen["scale"]
    return {"chosen_scale": chosen["scale"], "reason": reason, "rows": rows, "n_harmful": len(hv),
            "n_benign": len(bv), "target_refusal": cfg.target_refusal, "max_over_refusal": cfg.max_over_refusal}


def _detach_lora(model: torch.nn.Module) -> None:
    """Remove unmerged adapters (a time-sliced call leaves the in-memory model as it found it)."""
    for mod in list(model.modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, LoRALinear):
                setattr(mod, child_name, child.base)


def _data_fingerprint(examples: list[Example]) -> str:
    from crafttrace.runs import content_hash
    return content_hash([(e.ids, e.n_prompt) for e in examples])


def _save_checkpoint(ckpt: Path, adapters, opt, cfg: SafetyConfig, step: int, history: list, seconds: float,
                     data_id: str) -> None:
    from crafttrace.training import _dense_opt_state  # safetensors + JSON optimizer state (no pickle)

    tensors = {f"lora.{k}": v for k, v in _lora_tensors(adapters).items()}
    t, opt_meta = _dense_opt_state(opt, "opt")
    tensors.update(t)
    write_tensors(ckpt / "state.safetensors", tensors)
    # the JSON is the commit record: written last, it says the tensors belong to this step
    write_json(ckpt / "state.json", {"step": step, "config": cfg.to_dict(), "data": data_id, "optimizer": opt_meta,
                                     "history": history, "train_seconds": seconds})


def _load_checkpoint(ckpt: Path, adapters, opt, cfg: SafetyConfig, data_id: str) -> tuple[int, list, float]:
    from crafttrace.training import _load_opt_state

    meta = read_json(ckpt / "state.json")
    saved = SafetyConfig.from_dict(meta["config"])
    if saved.training_dict() != cfg.training_dict():
        diff = {k: (v, getattr(cfg, k)) for k, v in saved.training_dict().items() if getattr(cfg, k) != v}
        raise SafetyTuningError(f"checkpoint at {ckpt} was written with a different config "
                                f"(field: (checkpoint, requested)) {diff}; use a fresh run dir or the same config")
    if meta["data"] != data_id:
        raise SafetyTuningError(f"checkpoint at {ckpt} was written for different training data (fingerprint "
                                f"{meta['data']} vs {data_id}); use a fresh run dir")
    tensors = read_tensors(ckpt / "state.safetensors")
    with torch.no_grad():
        for k, m in adapters.items():
            for p in ("A", "B"):
                key = f"lora.{k}.{p}"
                if key not in tensors:
                    raise SafetyTuningError(f"checkpoint {ckpt} has no adapter {key}")
                getattr(m, p).copy_(tensors[key])
    _load_opt_state(opt, "opt", tensors, meta["optimizer"])
    return meta["step"], meta["history"], meta["train_seconds"]


def save_model_dir(loaded: Any, out_dir: str | Path, info: dict[str, Any]) -> Path:
    """Save a loaded model as a HF directory (safetensors + tokenizer + ``crafttrace_safety.json``), atomically:
    written to a temporary sibling and renamed, so a killed save never leaves a half model."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = ["SafetyConfig", "SafetyResult", "Splits", "SafetyTuningError", "REFUSALS", "LORA_TARGETS",
           "make_splits", "distill", "resample_refusing", "build_examples", "train_safety", "response_loss",
           "LoRALinear", "attach_lora", "merge_lora", "adapted_layers", "save_model_dir", "calibrate_strength",
           "calibration_prompts"]
