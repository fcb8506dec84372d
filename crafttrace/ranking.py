"""Ranking CLT features: raw activation against influence on the refusal decision, four modes.

Modes (the rows of the paper's ablation):

* ``activation_cross_group``  mean per-prompt max activation on the harmful pool minus the benign pool
* ``activation_boundary``     mean per-prompt max activation on boundary-critical prompts
* ``influence_cross_group``   mean signed effect on harmful prompts minus mean on benign prompts
* ``influence_boundary``      CRaFT: mean signed effect on boundary-critical prompts

Effect = a feature's signed *total* effect on the set-mean refusal-minus-compliance logit difference
(``attribution.FeatureEffects.total``), summed over the positions where it is active in a prompt and
averaged over prompts (0 where it is silent). Positive = pushes towards refusal. Influence modes rank
by |score| and steer against the sign (suppress refusal-promoting, amplify compliance-promoting);
activation modes rank by score and suppress, as activation-based selection assumes harm-topic
features drive refusal. Why signed total effect is the default, not circuit-tracer's node influence:
that influence is |A| row-normalised, so it is unsigned (cannot say which way to steer) and a feature
with a tiny activation can rank first; the signed total effect equals the ablation effect in the
linearised replacement model. Features nearly silent on the prompts they will be applied to
(active on fewer than ``min_active_frac`` of them) are excluded from selection in every mode.

Optionally (``min_activation_cv`` > 0) so are *prompt-invariant* features: those whose per-prompt max activation
barely varies over the ranking prompts (coefficient of variation below the threshold). On a chat model these read
the fixed chat template (the same activation on every request): their linearised effect on the decision can be
large, but steering them edits the template itself and degrades every output (the SmolLM2 realbed, session 16).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .attribution import FeatureEffects
from .hooks import capture

MODES = ("activation_cross_group", "activation_boundary", "influence_cross_group", "influence_boundary")
INFLUENCE_SCORES = ("total", "direct", "influence_ct")


@torch.no_grad()
def max_activations(loaded, clt, input_ids_list: list[torch.Tensor], progress: bool = True) -> torch.Tensor:
    """[n_prompts, L, d_t] max activation over positions (position 0 excluded), from plain-model hooks."""
    model = loaded.model
    L = clt.n_layers
    out = torch.zeros(len(input_ids_list), L, clt.d_transcoder)
    for i, ids in enumerate(tqdm(input_ids_list, desc="feature activations", disable=not progress)):
        with capture(model, clt.feature_input_hook, list(range(L))) as store:
            model(ids.reshape(1, -1).to(model.device))
        for layer in range(L):
            acts = clt.encode_layer(store[layer][0, 1:].to(clt.dtype), layer).float()
            out[i, layer] = acts.max(0).values.clamp(min=0).cpu() if acts.shape[0] else 0
    return out


def effects_matrix(effects: list[FeatureEffects], n_layers: int, d_t: int, score: str = "total") -> torch.Tensor:
    """[n_prompts, L, d_t]: per-prompt effect of each feature, summed over its active positions."""
    if score not in INFLUENCE_SCORES:
        raise ValueError(f"unknown influence score {score!r}; choose from {INFLUENCE_SCORES}")
    out = torch.zeros(len(effects), n_layers, d_t)
    for i, e in enumerate(effects):
        if len(e.features) == 0:
            continue
        vals = getattr(e, score).float()
        if torch.isnan(vals).all():
            raise ValueError(f"influence score {score!r} is not available for these effects (path "
                             f"{e.meta.get('path', 'graph')}); use 'total'")
        flat = e.features[:, 0] * d_t + e.features[:, 2]
        out[i].view(-1).index_add_(0, flat, torch.nan_to_num(vals))
    return out


@dataclass
class Ranking:
    scores: dict[str, torch.Tensor]       # mode -> [L, d_t]
    extras: dict[str, torch.Tensor]       # other per-feature statistics, [L, d_t]
    eligible: torch.Tensor                # [L, d_t] bool: active often enough on application prompts
    influence_score: str
    min_active_frac: float
    min_activation_cv: float = 0.0

    def order(self, mode: str) -> list[tuple[int, int]]:
        s = self.scores[mode]
        key = s.abs() if mode.startswith("influence") else s
        key = torch.where(self.eligible, key, torch.full_like(key, -float("inf")))
        flat = torch.argsort(key.flatten(), descending=True)
        d_t = s.shape[1]
        return [(int(f) // d_t, int(f) % d_t) for f in flat if torch.isfinite(key.flatten()[f])]

    def top(self, mode: str, k: int = 1) -> list[tuple[int, int]]:
        order = self.order(mode)
        if not order:
            raise ValueError(f"no eligible feature for mode {mode}: every feature is active on fewer than "
                             f"{self.min_active_frac:.0%} of the application prompts"
                             + (f" or varies less than {self.min_activation_cv} (coefficient of variation) over "
                                f"the ranking prompts" if self.min_activation_cv > 0 else ""))
        return order[:k]

    def steer_sign(self, mode: str, feat: tuple[int, int], sign_from: str = "score") -> int:
        """-1: push the feature down (suppress), +1: push it up, to move away from refusal. Activation modes always
        suppress. Influence modes steer against ``sign_from``: ``"score"``, the mode's own score -- for the
        cross-group contrast that is effect(harmful) - effect(benign), whose sign a feature's *benign-side* effect
        can decide (a compliance feature active on benign prompts scores positive and gets suppressed, which moves
        boundary prompts towards refusal: seen on the SmolLM2 realbed, session 8); ``"boundary"``, the feature's
        effect on the boundary ranking prompts, i.e. on the kind of prompt it is steered on (the score where that
        effect is 0)."""
        if sign_from not in ("score", "boundary"):
            raise ValueError(f"sign_from must be 'score' or 'boundary', got {sign_from!r}")
        if mode.startswith("activation"):
            return -1
        s = float(self.scores[mode][feat])
        if sign_from == "boundary" and float(self.scores["influence_boundary"][feat]) != 0:
            s = float(self.scores["influence_boundary"][feat])
        return -1 if s > 0 else 1

    def to_json(self, top_n: int = 50) -> dict:
        feats: set[tuple[int, int]] = set()
        ranks = {m: {f: r for r, f in enumerate(self.order(m))} for m in MODES}
        for m in MODES:
            feats.update(self.order(m)[:top_n])
        rows = []
        for f in sorted(feats):
            row = {"layer": f[0], "index": f[1], "eligible": bool(self.eligible[f])}
            row.update({m: float(self.scores[m][f]) for m in MODES})
            row.update({f"rank_{m}": ranks[m].get(f) for m in MODES})
            row.update({k: float(v[f]) for k, v in self.extras.items()})
            rows.append(row)
        return {"definition": {
                    "effect": "signed total effect on mean(refusal logits) - mean(compliance logits), summed over "
                              "active positions, mean over prompts (0 where silent); positive = towards refusal",
                    "influence_score": self.influence_score,
                    "activation": "per-prompt max over positions (position 0 excluded), mean over prompts",
                    "order": "activation modes by score, influence modes by |score|",
                    "min_active_frac": self.min_active_frac,
                    "activation_cv": "std / mean of the per-prompt max activation over harmful, benign and "
                                     "boundary ranking prompts (0 where never active)",
                    "min_activation_cv": self.min_activation_cv},
                "top": {m: [list(f) for f in self.order(m)[:top_n]] for m in MODES},
                "features": rows}


def rank(act_harmful: torch.Tensor, act_benign: torch.Tensor, act_boundary: torch.Tensor,
         eff_harmful: torch.Tensor, eff_benign: torch.Tensor, eff_boundary: torch.Tensor,
         act_apply: torch.Tensor, influence_score: str = "total", min_active_frac: float = 0.25,
         min_activation_cv: float = 0.0) -> Ranking:
    """All four modes from [n, L, d_t] activation and effect tensors; ``act_apply`` = prompts steered later.
    ``min_activation_cv`` > 0 also excludes prompt-invariant features (see the module docstring)."""
    if min_activation_cv < 0:
        raise ValueError(f"min_activation_cv must be >= 0, got {min_activation_cv}")
    for name, t in (("harmful activations", act_harmful), ("benign activations", act_benign),
                    ("boundary activations", act_boundary), ("boundary effects", eff_boundary)):
        if t.shape[0] == 0:
            raise ValueError(f"empty prompt pool: no {name} to rank from")
    shapes = {t.shape[1:] for t in (act_harmful, act_benign, act_boundary, eff_harmful, eff_benign, eff_boundary,
                                    act_apply)}
    if len(shapes) != 1:
        raise ValueError(f"ranking inputs disagree on [layers, d_transcoder]: {sorted(map(tuple, shapes))}")
    active_frac = (act_apply > 0).float().mean(0)
    scores = {
        "activation_cross_group": act_harmful.mean(0) - act_benign.mean(0),
        "activation_boundary": act_boundary.mean(0),
        "influence_cross_group": eff_harmful.mean(0) - eff_benign.mean(0),
        "influence_boundary": eff_boundary.mean(0),
    }
    acts = torch.cat([act_harmful, act_benign, act_boundary])
    mean = acts.mean(0)
    cv = torch.where(mean > 0, acts.std(0, correction=0) / mean.clamp_min(1e-12), torch.zeros_like(mean))
    active = act_apply.clone()
    active[active <= 0] = float("nan")
    extras = {"active_frac_apply": active_frac,
              "typical_activation": torch.nan_to_num(active.nanmean(0), nan=0.0),
              "act_harmful": act_harmful.mean(0), "act_benign": act_benign.mean(0),
              "effect_harmful": eff_harmful.mean(0), "effect_benign": eff_benign.mean(0), "activation_cv": cv}
    eligible = (active_frac >= min_active_frac) & (cv >= min_activation_cv)
    return Ranking(scores, extras, eligible, influence_score, min_active_frac, min_activation_cv)
