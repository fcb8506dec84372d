"""Boundary-critical sampling: harmful prompts where the first response token is undecided.

For each prompt we read P(refuse) and P(comply) (summed first-token probabilities of the token
sets, after the chat template's generation prompt) and keep prompts where *both* are high: either
both above thresholds, or the top-k by min(P_refuse, P_comply). The strict and extended token
sets are scored side by side; their pools' overlap is the paper's robustness check.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .tokens import TokenSets


class NoBoundaryPromptError(ValueError):
    pass


@dataclass
class PromptScore:
    index: int
    prompt: str
    p_refuse: float
    p_comply: float

    @property
    def margin(self) -> float:
        return min(self.p_refuse, self.p_comply)


@dataclass
class BoundaryResult:
    token_set: str
    selection: dict
    scores: list[PromptScore]
    selected: list[int] = field(default_factory=list)   # indices into the pool

    def stats(self) -> dict:
        pr = torch.tensor([s.p_refuse for s in self.scores])
        pc = torch.tensor([s.p_comply for s in self.scores])
        mn = torch.minimum(pr, pc)
        return {"n_pool": len(self.scores), "n_selected": len(self.selected),
                "mean_p_refuse": float(pr.mean()), "mean_p_comply": float(pc.mean()),
                "frac_refuse_argmax": float((pr > pc).float().mean()),
                "max_min_prob": float(mn.max()), "median_min_prob": float(mn.median())}

    def to_json(self) -> dict:
        return {"token_set": self.token_set, "selection": self.selection, "stats": self.stats(),
                "selected": self.selected,
                "scores": [{"index": s.index, "prompt": s.prompt, "p_refuse": s.p_refuse,
                            "p_comply": s.p_comply} for s in self.scores]}

    @classmethod
    def from_json(cls, d: dict) -> "BoundaryResult":
        return cls(d["token_set"], d["selection"], [PromptScore(**s) for s in d["scores"]], d["selected"])

    @property
    def prompts(self) -> list[str]:
        return [self.scores[i].prompt for i in self.selected]


@torch.no_grad()
def score_pool(loaded, prompts: list[str], token_sets: list[TokenSets], batch_size: int = 16,
               progress: bool = True) -> list[list[PromptScore]]:
    """First-token P(refuse)/P(comply) for every prompt under each token set (one forward per prompt)."""
    if not prompts:
        raise ValueError("empty prompt pool: nothing to score")
    model, tok = loaded.model, loaded.tokenizer
    out: list[list[PromptScore]] = [[] for _ in token_sets]
    encoded = [loaded.encode_prompt(p)[0] for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # length-sorted batches pad little
    results: dict[int, torch.Tensor] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="scoring prompts", disable=not progress):
        idx = order[start:start + batch_size]
        T = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), T), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):  # left padding keeps the last position aligned
            ids[r, T - len(encoded[i]):] = encoded[i]
            mask[r, T - len(encoded[i]):] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(ids.to(model.device), attention_mask=mask.to(model.device),
                       position_ids=pos.to(model.device)).logits[:, -1].float()
        probs = logits.softmax(-1).cpu()
        for r, i in enumerate(idx):
            results[i] = probs[r]
    for i, p in enumerate(prompts):
        for k, ts in enumerate(token_sets):
            out[k].append(PromptScore(i, p, float(results[i][ts.refusal_ids].sum()),
                                      float(results[i][ts.compliance_ids].sum())))
    return out


def select(scores: list[PromptScore], token_set: str, *, top_k: int | None = None,
           min_refuse: float = 0.2, min_comply: float = 0.2) -> BoundaryResult:
    """Keep prompts with P_refuse >= min_refuse and P_comply >= min_comply, best min() first, at most top_k."""
    eligible = [s for s in scores if s.p_refuse >= min_refuse and s.p_comply >= min_comply]
    eligible.sort(key=lambda s: -s.margin)
    if top_k is not None:
        eligible = eligible[:top_k]
    if not eligible:
        best = max(scores, key=lambda s: s.margin)
        raise NoBoundaryPromptError(
            f"no boundary-critical prompt under token set {token_set!r}: none of {len(scores)} prompts has "
            f"P_refuse >= {min_refuse} and P_comply >= {min_comply}; the largest min(P_refuse, P_comply) found "
            f"is {best.margin:.4f} (prompt {best.index}: P_refuse={best.p_refuse:.3f}, P_comply={best.p_comply:.3f})")
    return BoundaryResult(token_set, {"top_k": top_k, "min_refuse": min_refuse, "min_comply": min_comply},
                          scores, [s.index for s in eligible])


def overlap(a: BoundaryResult, b: BoundaryResult) -> dict:
    sa, sb = set(a.selected), set(b.selected)
    union = sa | sb
    return {"a": a.token_set, "b": b.token_set, "n_a": len(sa), "n_b": len(sb), "n_both": len(sa & sb),
            "jaccard": len(sa & sb) / len(union) if union else 0.0}
