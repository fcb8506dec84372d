"""Refusal and compliance token sets, resolved per tokenizer to first-response-token ids.

P(refuse) and P(comply) are the summed next-token probabilities of each set's first tokens at the
position right after the chat template's generation prompt (``LoadedModel.encode_prompt``). A set
string such as "I'm sorry" counts through its *first* token; a string whose first token is shared
with the other side is ambiguous and rejected, because it would count towards both probabilities.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

STRICT = {"refusal": ["I"], "compliance": ["Sure"]}
EXTENDED = {
    "refusal": ["I'm sorry", "I cannot", "I can't", "I apologize", "As an AI", "Sorry", "Unfortunately",
                "I must", "No"],
    "compliance": ["Sure", "Here", "Step", "**", "Certainly", "Absolutely", "Of course", "Title", "To", "1."],
}
TESTBED = {"refusal": ["sorry"], "compliance": ["sure"]}
PRESETS = {"strict": STRICT, "extended": EXTENDED, "testbed": TESTBED}


class TokenSetError(ValueError):
    """A token string cannot be used as a refusal/compliance opener for this tokenizer."""


@dataclass
class TokenSets:
    """Resolved token sets: strings, their first-token ids, and the (deduplicated) id lists."""

    name: str
    refusal: list[str]
    compliance: list[str]
    refusal_ids: list[int] = field(default_factory=list)
    compliance_ids: list[int] = field(default_factory=list)
    first_tokens: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"name": self.name, "refusal": self.refusal, "compliance": self.compliance,
                "refusal_ids": self.refusal_ids, "compliance_ids": self.compliance_ids,
                "first_tokens": self.first_tokens}


def _first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise TokenSetError(f"token string {text!r} encodes to no tokens")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and ids[0] == unk and text.strip() != getattr(tokenizer, "unk_token", None):
        raise TokenSetError(f"token string {text!r} is not in the vocabulary (encodes to the unknown token)")
    return int(ids[0])


def load_spec(spec: str | dict) -> tuple[str, dict]:
    """A preset name, a JSON file path, or an inline "refusal=a|b;compliance=c|d" spec."""
    if isinstance(spec, dict):
        return "custom", spec
    if spec in PRESETS:
        return spec, PRESETS[spec]
    if spec.endswith(".json"):
        p = Path(spec)
        if not p.exists():
            raise FileNotFoundError(f"token-set file not found: {p}")
        return p.stem, json.loads(p.read_text())
    if "refusal=" in spec and "compliance=" in spec:
        parts = dict(part.split("=", 1) for part in spec.split(";"))
        return "custom", {k: [s for s in v.split("|") if s] for k, v in parts.items()}
    raise TokenSetError(f"unknown token-set spec {spec!r}: use one of {sorted(PRESETS)}, a .json file, "
                        "or 'refusal=a|b;compliance=c|d'")


def resolve(tokenizer, spec: str | dict = "strict") -> TokenSets:
    name, sets = load_spec(spec)
    for side in ("refusal", "compliance"):
        if not sets.get(side):
            raise TokenSetError(f"token set {name!r} has an empty {side} list")
    ts = TokenSets(name=name, refusal=list(sets["refusal"]), compliance=list(sets["compliance"]))
    by_id: dict[int, tuple[str, str]] = {}
    for side, strings, ids in (("refusal", ts.refusal, ts.refusal_ids), ("compliance", ts.compliance, ts.compliance_ids)):
        for s in strings:
            tid = _first_token(tokenizer, s)
            ts.first_tokens[s] = tokenizer.convert_ids_to_tokens(tid)
            if tid in by_id and by_id[tid][0] != side:
                other_side, other = by_id[tid]
                raise TokenSetError(
                    f"ambiguous token strings: {side} {s!r} and {other_side} {other!r} share the first token "
                    f"{ts.first_tokens[s]!r} (id {tid}); remove one of them")
            if tid in by_id:
                warnings.warn(f"{side} strings {by_id[tid][1]!r} and {s!r} share the first token "
                              f"{ts.first_tokens[s]!r}; it is counted once", stacklevel=2)
            else:
                ids.append(tid)
            by_id.setdefault(tid, (side, s))
    return ts


@torch.no_grad()
def first_token_probs(model, input_ids: torch.Tensor, ts: TokenSets) -> tuple[float, float, torch.Tensor]:
    """(P_refuse, P_comply, logits[-1]) for one prompt's token ids [1, T] or [T]."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    logits = model(ids.to(model.device)).logits[0, -1].float()
    probs = logits.softmax(-1)
    return float(probs[ts.refusal_ids].sum()), float(probs[ts.compliance_ids].sum()), logits


def logit_difference_direction(unembed: torch.Tensor, ts: TokenSets) -> torch.Tensor:
    """Set-mean refusal logit minus set-mean compliance logit, as one unembedding direction.

    ``unembed`` is [vocab, d_model] (HF lm_head.weight). Its dot with the final normalised residual
    is exactly mean(logits[refusal]) - mean(logits[compliance]); circuit-tracer takes it as a CustomTarget.
    """
    return unembed[ts.refusal_ids].float().mean(0) - unembed[ts.compliance_ids].float().mean(0)
