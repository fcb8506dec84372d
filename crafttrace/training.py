"""Train a cross-layer transcoder (CLT) for any Hugging Face causal LM, from plain text.

Hook points (TransformerLens names, resolved on the plain HF model by ``crafttrace.hooks``):
  features READ  ``cfg.feature_input_hook``  (default ``hook_resid_mid``: residual stream after attention)
  features WRITE ``cfg.feature_output_hook`` (default ``hook_mlp_out``: the MLP output)
exactly where circuit-tracer reads and writes them during attribution.

Architecture (circuit-tracer's ``CrossLayerTranscoder`` layout): layer ``l`` has an encoder
``W_enc[l] [d_t, d_model]``, ``b_enc[l]``, a JumpReLU threshold, and a decoder ``W_dec[l] [d_t, L-l, d_model]``
writing to the MLP outputs of layers ``l..L-1``. The reconstruction of MLP output ``j`` is
``b_dec[j] + sum_{l<=j} a_l @ W_dec[l][:, j-l]``.

Sparsity: ``activation="jumprelu"`` trains log-thresholds with a straight-through estimator (Rajamanoharan et
al. 2024) under the tanh penalty of Anthropic's circuit-tracing methods paper,
``lambda * sum_{l,i} tanh(c * a_i^l * ||W_dec,i^l||)`` (lambda ramped up from 0), plus an optional pre-activation
penalty against dead features. ``activation="topk"`` keeps the k largest pre-activations per layer and token;
circuit-tracer only runs ReLU/JumpReLU, so TopK is exported as JumpReLU with per-feature thresholds calibrated to
match each feature's TopK firing rate, and ``metrics.json`` reports the NMSE of that exported model.

Sparse decode (``_CLTDecode``): only the decoder rows of active features are read, written and differentiated:
``F.embedding_bag`` with ``per_sample_weights`` per (source, target) block of the target-major decoders
``[L-l, d_t, d_model]``, a hand-written backward (gathers + SDDMM, cost O(nnz * d_model) per block), and a
sparse encoder backward (``_GatherPre``) when nothing else needs dense pre-activation gradients (TopK, or
JumpReLU with ``preact_coef=0``). With ``sparse_adam`` decoder gradients are sparse over the features active in
the batch and updated by ``torch.optim.SparseAdam`` (pays off when d_transcoder >> tokens per batch * L0).
``sparse_decode=False`` is the dense reference (materialised activations times full decoders, same algebra),
kept for tests and ``benchmarks/bench_clt_training.py``.

Training runs on CPU (the model may sit anywhere; activations are moved to CPU). On a shared, oversubscribed
machine ``torch.set_num_threads(1)`` can be several times faster than the default (OpenMP spin-waits).

Data: texts are tokenised into windows of ``context_length`` (BOS re-prefixed when the tokenizer uses one);
position 0 of every window is skipped (circuit-tracer zeroes position-0 features). Activations are collected
in chunks of ``chunk_tokens`` positions and shuffled inside the chunk; with ``outlier_norm_ratio`` the
massive-activation (attention-sink) positions of a chunk are left out of its batches and of the evaluation.
Everything is a deterministic function of (texts, cfg, step), which is what makes resume exact: a restarted run re-collects the current chunk and
continues with the same batches. The first texts (in seeded order) are held out for evaluation.

Inputs and outputs are normalised by one scalar per layer during training (so one lambda/lr works across
models); the scales are folded into the saved weights, which therefore act on raw activations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from crafttrace.hooks import capture
from crafttrace import runs
from crafttrace.runs import read_json, read_tensors, write_json, write_tensors
from crafttrace.transcoders import load_transcoder, save_transcoder

CHECKPOINT_DIR = "checkpoint"
TRANSCODER_DIR = "transcoder"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.json"


# --------------------------------------------------------------------------------------------------- config

# fields added after CLTs were cached, with the setting that reproduces the old behaviour
CLT_INERT_FIELDS = {"outlier_norm_ratio": lambda c: c.outlier_norm_ratio == 0,
                    "topk_grad": lambda c: c.topk_grad == "relu"}


@dataclass
class CLTTrainConfig:
    d_transcoder: int = 512                  # features per layer
    activation: Literal["jumprelu", "topk"] = "jumprelu"
    k: int = 16                              # TopK: active features per layer and token
    sparsity_coef: float = 2e-3              # JumpReLU: final lambda of the tanh penalty
    sparsity_c: float = 4.0                  # JumpReLU: c inside tanh(c * a * ||W_dec||)
    sparsity_ramp_frac: float = 1.0          # lambda rises linearly from 0 over this fraction of training
    preact_coef: float = 3e-6                # JumpReLU: penalty on relu(theta - pre) * ||W_dec|| (dead features)
    threshold_init_l0: float = 64.0          # JumpReLU: initial thresholds give about this many active features
    bandwidth: float = 0.1                   # JumpReLU: straight-through estimator kernel width
    lr: float = 1e-3
    lr_warmup_steps: int = 50
    lr_decay_frac: float = 0.2               # linear decay to 0 over the last fraction of training
    batch_tokens: int = 1024                 # tokens per optimizer step
    total_tokens: int = 1_000_000            # training tokens (steps = total_tokens // batch_tokens)
    context_length: int = 128
    chunk_tokens: int = 16384                # activation buffer: collected, shuffled, consumed, repeated
    # passes over each collected chunk (each pass in its own seeded order). On CPU the model forward that
    # collects activations costs about as much per token as a TopK training step (SmolLM2-135M, 2 cores:
    # 4.7 ms vs 2.1 ms per token), so reusing a chunk buys more steps per second; total_tokens counts
    # training tokens, so total_tokens / chunk_passes tokens are collected.
    chunk_passes: int = 1
    collect_batch_size: int = 16             # sequences per model forward during collection
    eval_tokens: int = 4096                  # held-out tokens for metrics.json
    seed: int = 0
    feature_input_hook: str = "hook_resid_mid"
    feature_output_hook: str = "hook_mlp_out"
    checkpoint_every: int = 200              # steps
    sparse_decode: bool = True
    sparse_adam: bool = True                 # sparse decoder gradients + SparseAdam (needs sparse_decode)
    log_every: int = 10
    # affine skip connection y_l += x_l @ W_skip[l] (Paulo et al. 2025, arXiv:2501.18823; circuit-tracer's
    # ``compute_skip``): the part of each MLP that is linear in its input is carried exactly (and attributed as a
    # linear path), so the sparse features only have to explain the rest. Initialised by ridge regression.
    skip_connection: bool = False
    # clip the global gradient norm (0 = off). Massive-activation tokens give rare huge gradients; without a
    # clip Adam's first steps on one move every weight by ~lr and lr 4e-3 diverged on the tuned SmolLM2
    grad_clip: float = 0.0
    # leave out positions whose input (``feature_input_hook``) norm at some layer exceeds this multiple of that
    # layer's median over the chunk (0 = keep every position). Attention-sink tokens carry "massive activations"
    # (Sun et al. 2024, arXiv:2402.17762), which is why circuit-tracer zeroes position 0; but in windows cut
    # mid-text the sink sometimes lands on position 1. On the tuned SmolLM2 two such tokens per 16k sit ~180x
    # above the median from layer 12 on (every other token < 13x): they dominated the per-layer scales and the
    # ridge skip fit (layer 11: NMSE 17 on held-out text from the skip alone, 1.46 for the trained CLT).
    outlier_norm_ratio: float = 0.0
    # TopK: gradient of a selected feature's value relu(pre). "relu": zero when pre < 0, so a selected feature
    # pushed below 0 never comes back -- on the tuned SmolLM2 the mean L0 fell from 16 to ~4 within 576 steps
    # while the training NMSE stopped improving. "straight_through": the forward value stays relu(pre), the
    # backward treats it as pre (identity), so a selected feature whose decoder would reduce the error is pulled
    # back above 0 -- a cheap stand-in for the AuxK loss of Gao et al. 2024 (arXiv:2406.04093). Measured
    # (benchmarks/bench_clt_variant.py, 192 steps): L0 stays ~12 (dead 11 %) but the batch NMSE on the same
    # batches matched the ReLU run's (0.284 vs 0.288 at step 130): more live features, no better fit.
    topk_grad: Literal["relu", "straight_through"] = "relu"

    def __post_init__(self) -> None:
        problems = []
        if self.topk_grad not in ("relu", "straight_through"):
            problems.append(f"topk_grad must be 'relu' or 'straight_through', got {self.topk_grad!r}")
        if self.activation not in ("jumprelu", "topk"):
            problems.append(f"activation must be 'jumprelu' or 'topk', got {self.activation!r}")
        if self.d_transcoder < 1:
            problems.append(f"d_transcoder must be >= 1, got {self.d_transcoder}")
        if self.activation == "topk" and not 1 <= self.k <= self.d_transcoder:
            problems.append(f"k must be in [1, d_transcoder={self.d_transcoder}], got {self.k}")
        if self.chunk_passes < 1:
            problems.append(f"chunk_passes must be >= 1, got {self.chunk_passes}")
        if self.batch_tokens < 1 or self.chunk_tokens < 1:
            problems.append(f"batch_tokens ({self.batch_tokens}) and chunk_tokens ({self.chunk_tokens}) must be >= 1")
        elif self.chunk_tokens % self.batch_tokens:
            problems.append(f"chunk_tokens ({self.chunk_tokens}) must be a multiple of batch_tokens ({self.batch_tokens})")
        if self.total_tokens < self.batch_tokens:
            problems.append(f"total_tokens ({self.total_tokens}) must be >= batch_tokens ({self.batch_tokens})")
        if self.context_length < 2:
            problems.append(f"context_length must be >= 2 (position 0 is skipped), got {self.context_length}")
        if self.eval_tokens < 1:
            problems.append(f"eval_tokens must be >= 1, got {self.eval_tokens}")
        if self.bandwidth <= 0 or self.lr <= 0:
            problems.append(f"bandwidth ({self.bandwidth}) and lr ({self.lr}) must be > 0")
        if self.outlier_norm_ratio < 0 or 0 < self.outlier_norm_ratio <= 1:
            problems.append(f"outlier_norm_ratio must be 0 (off) or > 1, got {self.outlier_norm_ratio}")
        if self.grad_clip < 0:
            problems.append(f"grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.sparse_adam and not self.sparse_decode:
            problems.append("sparse_adam needs sparse_decode=True (dense decode gives dense gradients)")
        if problems:
            raise ValueError("invalid CLTTrainConfig: " + "; ".join(problems))

    @property
    def total_steps(self) -> int:
        return self.total_tokens // self.batch_tokens

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def identity_dict(self) -> dict[str, Any]:
        """``to_dict()`` less the later-added fields at their no-effect setting (``CLT_INERT_FIELDS``): what
        cached stages are keyed by, so adding a field does not invalidate CLTs trained before it existed."""
        return runs.identity_dict(self, self.to_dict(), CLT_INERT_FIELDS)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLTTrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CLTTrainConfig fields {unknown}; known: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "CLTTrainConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "CLTTrainConfig":
        """Read a config from a JSON file or from a training output directory."""
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_FILE
        return cls.from_dict(read_json(path))


@dataclass
class TrainResult:
    path: Path                       # the saved CLT (circuit-tracer layout): ``load_transcoder(path)``
    metrics: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None      # out_dir: metrics.json, train_config.json, checkpoint/


# ----------------------------------------------------------------------------------------------------- texts

def read_texts(source: str | Path | Iterable[str], field_name: str = "text", limit: int | None = None) -> list[str]:
    """Texts from a .jsonl file (``field_name``), a .txt file (one text per non-empty line),
    a ``crafttrace.data`` dataset name (e.g. ``"text"``, the shared text corpus), or any iterable of strings."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.suffix == ".jsonl" and path.exists():
            texts = []
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if field_name not in row:
                        raise ValueError(f"{path}:{n} has no field {field_name!r} (fields: {sorted(row)})")
                    texts.append(row[field_name])
        elif path.suffix == ".txt" and path.exists():
            texts = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        elif path.suffix in (".jsonl", ".txt"):
            raise FileNotFoundError(f"text file not found: {path}")
        else:
            try:
                from crafttrace.data import load_dataset
            except ImportError as e:
                raise FileNotFoundError(f"{source!r} is not a .jsonl/.txt file and crafttrace.data is unavailable ({e})") from None
            rows = load_dataset(str(source), limit=limit)
            texts = [r[field_name] if isinstance(r, dict) else r for r in rows]
    else:
        texts = list(source)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts[:limit] if limit is not None else texts


# ----------------------------------------------------------------------------------------- activation stream

class ActivationStream:
    """Deterministic stream of (input, output) activations [n, L, d_model] at the CLT hook points.

    Windows are grouped into fixed forward batches (``collect_batch_size`` windows each), so chunk ``c`` is
    bitwise the same whether it is reached by streaming or by resuming straight at chunk ``c``.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, texts: list[str], cfg: CLTTrainConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.n_layers = model.config.num_hidden_layers
        self.layers = list(range(self.n_layers))
        self.device = next(model.parameters()).device
        probe_plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        probe_special = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix = [bos] if bos is not None and len(probe_special) > len(probe_plain) and probe_special[0] == bos else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        texts = [texts[i] for i in order if texts[i].strip()]
        # hold out whole texts for evaluation, so no evaluation token is ever trained on
        n_eval_pos, n_eval_texts = 0, 0
        while n_eval_pos < cfg.eval_tokens and n_eval_texts < len(texts) - 1:
            n_eval_pos += sum(len(w) - 1 for w in self._windows_of(texts[n_eval_texts]))
            n_eval_texts += 1
        self.eval_texts, self.train_texts = texts[:n_eval_texts], texts[n_eval_texts:]
        if not self.train_texts or n_eval_pos == 0:
            raise ValueError(
                f"not enough text: {len(texts)} non-empty texts cannot fill eval_tokens={cfg.eval_tokens} "
                "held-out positions and still leave training text")
        self._train_windows = [w for t in self.train_texts for w in self._windows_of(t)]
        self.positions_per_epoch = sum(len(w) - 1 for w in self._train_windows)
        if self.positions_per_epoch == 0:
            raise ValueError("training texts tokenise to windows of length < 2; nothing to train on")

    def _windows_of(self, text: str) -> list[list[int]]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        step = self.cfg.context_length - len(self.prefix)
        return [self.prefix + ids[i:i + step] for i in range(0, len(ids), step) if len(self.prefix + ids[i:i + step]) >= 2]

    @torch.inference_mode()
    def _forward(self, windows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations for all positions >= 1 of the windows, in window order: ([n, L, d], [n, L, d])."""
        T = max(len(w) for w in windows)
        ids = torch.full((len(windows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(windows), T, dtype=torch.long)
        for i, w in enumerate(windows):
            ids[i, :len(w)] = torch.tensor(w)
            mask[i, :len(w)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        with capture(self.model, self.cfg.feature_input_hook, self.layers) as xs, \
                capture(self.model, self.cfg.feature_output_hook, self.layers) as ys:
            try:  # the logits are not needed: skip the unembedding where the model allows it
                self.model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            except TypeError:
                self.model(input_ids=ids, attention_mask=mask)
        keep = mask.bool()
        keep[:, 0] = False  # circuit-tracer zeroes position-0 features: never train on them
        x = torch.stack([xs[l] for l in self.layers], dim=2)[keep]
        y = torch.stack([ys[l] for l in self.layers], dim=2)[keep]
        return x.float().cpu(), y.float().cpu()

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        windows = [w for t in self.eval_texts for w in self._windows_of(t)]
        bs = self.cfg.collect_batch_size
        parts = [self._forward(windows[i:i + bs]) for i in range(0, len(windows), bs)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        return x[:self.cfg.eval_tokens], y[:self.cfg.eval_tokens]

    def chunks(self, start_chunk: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (chunk index, x, y) with exactly ``chunk_tokens`` shuffled positions each, forever (epochs)."""
        C, bs = self.cfg.chunk_tokens, self.cfg.collect_batch_size
        n_w = len(self._train_windows)
        target = start_chunk * C            # global position where the first yielded chunk starts
        pos, w = 0, 0                       # global position at the start of forward batch starting at window w
        # skip whole forward batches without running the model (tokenised lengths are enough)
        epoch_batches = [(i, sum(len(x) - 1 for x in self._train_windows[i:i + bs])) for i in range(0, n_w, bs)]
        epochs_skipped = target // self.positions_per_epoch
        pos = epochs_skipped * self.positions_per_epoch
        bi = 0
        while pos + epoch_batches[bi][1] <= target:
            pos += epoch_batches[bi][1]
            bi += 1
        buf_x: list[torch.Tensor] = []
        buf_y: list[torch.Tensor] = []
        have, drop, c = 0, target - pos, start_chunk
        while True:
            w = epoch_batches[bi][0]
            x, y = self._forward(self._train_windows[w:w + bs])
            if drop:
                x, y, drop = x[drop:], y[drop:], 0
            buf_x.append(x)
            buf_y.append(y)
            have += len(x)
            bi = (bi + 1) % len(epoch_batches)
            while have >= C:
                X, Y = torch.cat(buf_x), torch.cat(buf_y)
                perm = torch.randperm(C, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + c))
                yield c, X[:C][perm], Y[:C][perm]
                buf_x, buf_y, have, c = [X[C:]], [Y[C:]], have - C, c + 1


# ---------------------------------------------------------------------------------------------------- model

@dataclass
@dataclass
class SparsePattern:
    """Nonzero positions of one source layer as CSR rows over tokens: ``crow`` [n+1] row pointers and
    ``feats`` (sorted within a token). The regrouping by feature that both backward passes need (decoder and
    encoder gradients gather over each feature's tokens) is computed once, on first use."""
    crow: torch.Tensor
    feats: torch.Tensor
    n_feat: int
    _by_feature: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def by_feature(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, tokens in feature order, start of each feature's run): nonzero ``order[i]`` is the i-th."""
        if self._by_feature is None:
            order = self.feats.argsort(stable=True)
            tokens = torch.repeat_interleave(torch.arange(len(self.crow) - 1), self.crow.diff())[order]
            starts = torch.searchsorted(self.feats[order], torch.arange(self.n_feat + 1))
            self._by_feature = (order, tokens, starts)
        return self._by_feature


@dataclass
class SparseActs:
    """Active features of one source layer: their positions and values (with grad)."""
    pattern: SparsePattern
    values: torch.Tensor

    @property
    def feats(self) -> torch.Tensor:
        return self.pattern.feats


class _CLTDecode(torch.autograd.Function):
    """recon[:, j] = sum_{l<=j} a_l @ W_dec[l][j-l] for all target layers j at once: [n, L, d].
    Decoders are target-major here, ``W_dec[l]`` is [L-l, d_t, d_model], so every (source, target) block is
    one contiguous [d_t, d_model] matrix.

    Hand-written (forward and backward) because autograd's versions are what make naive CLT training slow:
    (1) accumulating L slices of one output (``recon[:, l:] += ...``) makes every backward step copy the
    full [n, L, d] gradient; (2) ``embedding_bag``'s backward materialises one decoder row per nonzero
    (nnz x (L-l)*d_model). Sparse mode instead runs three gathers over the nonzeros only, per block:
      forward   out[t]  = sum_f a_tf W[f]            (embedding_bag over decoder rows)
      d/dW      gW[f]   = sum_t a_tf g[t]            (embedding_bag over gradient rows, nonzeros sorted by feature)
      d/da      ga_tf   = <g[t], W[f]>               (SDDMM: G W^T only at the nonzeros)
    Per-block gathers keep the gathered matrix (d_t x d_model weights or n x d_model gradient) in cache; the
    gathers are memory-bound, so this is several times faster than gathering whole (L-l)*d_model rows.
    Cost is O(nnz * (L-l) * d_model) per source layer, never O(n * d_t * ...).
    Dense mode (``acts`` are [n, d_t] tensors) is the reference: the same algebra with dense matmuls.
    With ``sparse_grad`` the decoder gradient is a coalesced sparse tensor over the features active in the
    batch, for ``torch.optim.SparseAdam``.
    """

    @staticmethod
    def forward(ctx, patterns, sparse_grad: bool, n: int, d: int, *tensors):
        L = len(tensors) // 2
        acts, Ws = tensors[:L], tensors[L:]
        ctx.patterns, ctx.sparse_grad = patterns, sparse_grad
        ctx.save_for_backward(*tensors)
        recon = acts[0].new_zeros(L, n, d)                         # target-major while accumulating
        for l in range(L):
            if patterns is None:
                recon[l:] += torch.matmul(acts[l], Ws[l])          # [L-l, n, d]
                continue
            pat = patterns[l]
            for j in range(L - l):
                recon[l + j] += F.embedding_bag(pat.feats, Ws[l][j], pat.crow[:-1], mode="sum",
                                                per_sample_weights=acts[l])
        return recon.transpose(0, 1)

    @staticmethod
    def backward(ctx, g):
        tensors = ctx.saved_tensors
        L = len(tensors) // 2
        acts, Ws = tensors[:L], tensors[L:]
        patterns = ctx.patterns
        gT = g.transpose(0, 1).contiguous()                        # [L, n, d]: contiguous per target layer
        n = gT.shape[1]
        g_acts: list[torch.Tensor | None] = [None] * L
        g_Ws: list[torch.Tensor | None] = [None] * L
        for l in range(L):
            W = Ws[l]                                              # [L-l, F, d]
            if patterns is None:
                g_acts[l] = torch.einsum("jnd,jfd->nf", gT[l:], W)
                g_Ws[l] = torch.matmul(acts[l].t(), gT[l:])
                continue
            pat = patterns[l]
            values = acts[l]
            n_feat = W.shape[1]
            with warnings.catch_warnings():  # "CSR support is in beta": sampled_addmm is exactly what we need
                warnings.simplefilter("ignore", UserWarning)
                pattern = torch.sparse_csr_tensor(pat.crow, pat.feats, torch.zeros_like(values), (n, n_feat),
                                                  check_invariants=False)
            # nonzeros regrouped by feature: bags of tokens for the decoder-gradient gather
            order, tokens, starts = pat.by_feature()
            vals_sorted = values[order]
            if ctx.sparse_grad:
                rows = (starts.diff() > 0).nonzero().squeeze(1)    # features active in this batch
                starts = starts[rows]
            else:
                rows, starts = torch.arange(n_feat), starts[:-1]
            g_vals = torch.zeros_like(values)
            g_rows = W.new_empty(L - l, len(rows), W.shape[2])
            for j in range(L - l):
                g_vals += torch.sparse.sampled_addmm(pattern, gT[l + j], W[j].t()).values()
                g_rows[j] = F.embedding_bag(tokens, gT[l + j], starts, mode="sum", per_sample_weights=vals_sorted)
            g_acts[l] = g_vals
            if ctx.sparse_grad:
                idx = torch.stack([torch.arange(L - l).repeat_interleave(len(rows)), rows.repeat(L - l)])
                g_Ws[l] = torch.sparse_coo_tensor(idx, g_rows.reshape(-1, W.shape[2]), W.shape,
                                                  is_coalesced=True, check_invariants=False)
            else:
                g_Ws[l] = g_rows
        return (None, None, None, None, *g_acts, *g_Ws)


class _DecoderNorms(torch.autograd.Function):
    """||W_dec[l][:, f, :]|| (over all target layers) for the features ``feats``; with ``sparse_grad`` the
    gradient is a sparse tensor over those features only (SparseAdam), else dense."""

    @staticmethod
    def forward(ctx, W, feats, sparse_grad: bool):
        rows = W[:, feats]                                          # [L-l, u, d]
        norms = rows.pow(2).sum((0, 2)).sqrt()
        ctx.save_for_backward(rows, norms, feats)
        ctx.sparse_grad, ctx.shape = sparse_grad, W.shape
        return norms

    @staticmethod
    def backward(ctx, g):
        rows, norms, feats = ctx.saved_tensors
        g_rows = rows * (g / norms.clamp_min(1e-12))[None, :, None]
        J, u = rows.shape[0], rows.shape[1]
        if ctx.sparse_grad:
            idx = torch.stack([torch.arange(J).repeat_interleave(u), feats.repeat(J)])
            return torch.sparse_coo_tensor(idx, g_rows.reshape(-1, rows.shape[2]), ctx.shape,
                                           check_invariants=False), None, None
        g_W = rows.new_zeros(ctx.shape)
        g_W[:, feats] = g_rows                                     # feats are unique
        return g_W, None, None


class _GatherPre(torch.autograd.Function):
    """Pre-activations of the selected (token, feature) pairs of one layer, with encoder gradients that only
    touch those pairs: dW_enc[f] = sum_t g_tf x_t as one ``embedding_bag`` over input rows. The values come
    from the dense no-grad encoder pass; only the backward is sparse. Valid whenever every other
    pre-activation has zero gradient (TopK; JumpReLU without the dense pre-activation penalty), which
    removes the dense [n, d_t, d_model] encoder-gradient matmul, the largest remaining cost of a step."""

    @staticmethod
    def forward(ctx, W_enc, b_enc, pre_vals, x, pattern: SparsePattern):
        ctx.save_for_backward(x)
        ctx.pattern = pattern
        return pre_vals.clone()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        order, tokens, starts = ctx.pattern.by_feature()
        g_W = F.embedding_bag(tokens, x, starts[:-1], mode="sum", per_sample_weights=g[order])
        g_b = g.new_zeros(ctx.pattern.n_feat).index_add_(0, ctx.pattern.feats, g)
        return g_W, g_b, None, None, None


class _JumpReLUSTE(torch.autograd.Function):
    """x * (x > theta); pseudo-gradient for theta from a rectangle kernel of width ``bandwidth``
    (Rajamanoharan et al. 2024). Elementwise, so it works on dense [n, L, F] and on gathered sparse values."""

    @staticmethod
    def forward(ctx, x, theta, bandwidth: float):
        ctx.save_for_backward(x, theta)
        ctx.bandwidth = bandwidth
        return x * (x > theta)

    @staticmethod
    def backward(ctx, g):
        x, theta = ctx.saved_tensors
        bw = ctx.bandwidth
        window = ((x - theta) / bw).abs() < 0.5
        g_theta = _sum_to(-(theta / bw) * window * g, theta.shape)
        return (x > theta) * g, g_theta, None


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Undo broadcasting over leading dims (theta [L, F] against pre-activations [n, L, F])."""
    while t.dim() > len(shape):
        t = t.sum(0)
    return t


class CLTModel(torch.nn.Module):
    """Training-time CLT on normalised activations. Decoders are target-major, ``W_dec[l]`` is
    ``[L-l, d_t, d_model]`` (circuit-tracer's ``[d_t, L-l, d_model]`` with the first two axes swapped), so
    each (source, target) block is a contiguous matrix for the blocked sparse gathers."""

    def __init__(self, n_layers: int, d_model: int, cfg: CLTTrainConfig):
        super().__init__()
        L, F_, d = n_layers, cfg.d_transcoder, d_model
        self.n_layers, self.d_model, self.cfg = L, d, cfg
        g = torch.Generator().manual_seed(cfg.seed)
        # initialisation from Anthropic's circuit-tracing methods paper
        self.W_enc = torch.nn.Parameter((torch.rand(L, F_, d, generator=g) * 2 - 1) / math.sqrt(F_))
        self.b_enc = torch.nn.Parameter(torch.zeros(L, F_))
        self.log_threshold = torch.nn.Parameter(torch.zeros(L, F_))
        bound = 1 / math.sqrt(L * d)
        self.W_dec = torch.nn.ParameterList(
            [torch.nn.Parameter((torch.rand(L - l, F_, d, generator=g) * 2 - 1) * bound) for l in range(L)])
        self.b_dec = torch.nn.Parameter(torch.zeros(L, d))
        self.W_skip = torch.nn.Parameter(torch.zeros(L, d, d)) if cfg.skip_connection else None

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """[n, L, d] -> [n, L, d]: x_l @ W_skip[l] (zeros without a skip connection)."""
        if self.W_skip is None:
            return torch.zeros_like(x)
        return torch.bmm(x.transpose(0, 1), self.W_skip).transpose(0, 1)

    # ------------------------------------------------------------------ encode
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """[n, L, d] -> [n, L, F]"""
        # one batched GEMM with the bias fused in; the result is a [n, L, F] view of [L, n, F] memory
        return torch.baddbmm(self.b_enc[:, None, :], x.transpose(0, 1), self.W_enc.transpose(1, 2)).transpose(0, 1)

    def sparse_acts(self, pre: torch.Tensor, x: torch.Tensor | None = None) -> list[SparseActs]:
        """Per source layer, the features that are active -- or, for JumpReLU, close enough to the threshold to
        receive a straight-through gradient (their value is 0 but they must still see the decoder).
        With ``x`` given, ``pre`` is a no-grad tensor and encoder gradients flow through the selected pairs
        only (``_GatherPre``)."""
        out = []
        n = pre.shape[0]
        if self.cfg.activation == "topk":
            with torch.no_grad():
                idx = pre.topk(self.cfg.k, dim=-1).indices.sort(dim=-1).values  # CSR: sorted columns per row
            vals = pre.gather(-1, idx)                                         # [n, L, k]
            crow = torch.arange(0, n * self.cfg.k + 1, self.cfg.k)
            for l in range(self.n_layers):
                pat = SparsePattern(crow, idx[:, l].reshape(-1), self.cfg.d_transcoder)
                v = vals[:, l].reshape(-1)
                if x is not None:
                    v = _GatherPre.apply(self.W_enc[l], self.b_enc[l], v, x[:, l], pat)
                out.append(SparseActs(pat, self._topk_value(v)))
            return out
        theta = self.log_threshold.exp()
        with torch.no_grad():
            candidates = (((pre - theta) / self.cfg.bandwidth) > -0.5) | (pre > theta)
        for l in range(self.n_layers):
            tok, feat = candidates[:, l].nonzero(as_tuple=True)   # row-major: sorted by token, then feature
            pat = SparsePattern(torch.searchsorted(tok, torch.arange(n + 1)), feat, self.cfg.d_transcoder)
            v = pre[tok, l, feat]
            if x is not None:
                v = _GatherPre.apply(self.W_enc[l], self.b_enc[l], v, x[:, l], pat)
            out.append(SparseActs(pat, _JumpReLUSTE.apply(v, theta[l, feat], self.cfg.bandwidth)))
        return out

    def _topk_value(self, v: torch.Tensor) -> torch.Tensor:
        """relu(v); with ``topk_grad="straight_through"`` its gradient is the identity (see the config)."""
        if self.cfg.topk_grad == "straight_through":
            return v + (F.relu(v) - v).detach()
        return F.relu(v)

    def dense_acts(self, pre: torch.Tensor) -> torch.Tensor:
        """Reference path: [n, L, F] activations, materialised."""
        if self.cfg.activation == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, self._topk_value(vals))
        return _JumpReLUSTE.apply(pre, self.log_threshold.exp(), self.cfg.bandwidth)

    # ------------------------------------------------------------------ decode
    def decode_sparse(self, acts: list[SparseActs], n: int, sparse_grad: bool = False) -> torch.Tensor:
        patterns = [a.pattern for a in acts]
        return self.b_dec + _CLTDecode.apply(patterns, sparse_grad, n, self.d_model,
                                             *[a.values for a in acts], *self.W_dec)

    def decode_dense(self, acts: torch.Tensor) -> torch.Tensor:
        return self.b_dec + _CLTDecode.apply(None, False, acts.shape[0], self.d_model,
                                             *acts.unbind(1), *self.W_dec)

    # ------------------------------------------------------------------ loss
    def loss(self, x: torch.Tensor, y: torch.Tensor, lam: float, sparse: bool | None = None,
             sparse_grad: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
        """Reconstruction (sum over layers of per-layer MSE / d_model, on normalised activations) + sparsity."""
        sparse = self.cfg.sparse_decode if sparse is None else sparse
        cfg, n = self.cfg, x.shape[0]
        preact = cfg.activation == "jumprelu" and cfg.preact_coef > 0
        sparse_encoder = sparse and not preact and torch.is_grad_enabled()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse_encoder):
            pre = self.pre_activations(x)
        penalty = pre.new_zeros(())
        if sparse:
            acts = self.sparse_acts(pre, x if sparse_encoder else None)
            recon = self.decode_sparse(acts, n, sparse_grad)
            l0 = pre.new_tensor([float((a.values > 0).sum()) / n for a in acts])
            if cfg.activation == "jumprelu" and lam > 0:
                for l, a in enumerate(acts):
                    uniq, inv = a.feats.unique(return_inverse=True)   # only features seen in this batch
                    norms = _DecoderNorms.apply(self.W_dec[l], uniq, sparse_grad)[inv]
                    penalty = penalty + torch.tanh(cfg.sparsity_c * a.values * norms).sum() / n
        else:
            dense = self.dense_acts(pre)
            recon = self.decode_dense(dense)
            l0 = (dense > 0).float().sum(-1).mean(0)
            if cfg.activation == "jumprelu" and lam > 0:
                norms = torch.stack([w.pow(2).sum((0, 2)).sqrt() for w in self.W_dec])   # [L, F]
                penalty = torch.tanh(cfg.sparsity_c * dense * norms).sum() / n
        if self.W_skip is not None:
            recon = recon + self.skip(x)
        err = (recon - y).pow(2).sum(-1)                                          # [n, L]
        recon_loss = err.mean(0).sum() / self.d_model
        loss = recon_loss + lam * penalty
        if preact:
            with torch.no_grad():  # detached norms: the decoder gradient stays sparse
                norms = torch.stack([w.pow(2).sum((0, 2)).sqrt() for w in self.W_dec])
            theta = self.log_threshold.exp()
            loss = loss + cfg.preact_coef * (F.relu(theta - pre) * norms).sum() / n
        with torch.no_grad():
            var = (y - y.mean(0)).pow(2).sum(-1).sum(0)
            nmse = (err.sum(0) / var.clamp_min(1e-12)).mean()
        return loss, {"loss": float(loss.detach()), "recon": float(recon_loss.detach()), "penalty": float(penalty.detach()),
                      "nmse": float(nmse), "l0": float(l0.mean())}

    def dense_parameters(self) -> list[torch.nn.Parameter]:
        return [self.W_enc, self.b_enc, self.log_threshold, self.b_dec] + \
            ([self.W_skip] if self.W_skip is not None else [])


# ------------------------------------------------------------------------------------------------- export

def to_circuit_tracer(model: CLTModel, in_scale: torch.Tensor, out_scale: torch.Tensor, threshold: torch.Tensor,
                      cfg: CLTTrainConfig):
    """circuit-tracer ``CrossLayerTranscoder`` (JumpReLU, float32, CPU) acting on RAW activations:
    pre = (W_enc / s_in) x + b_enc, every write to layer j is scaled by s_out[j], W_skip by s_out / s_in."""
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder

    L, d, F_ = model.n_layers, model.d_model, cfg.d_transcoder
    clt = CrossLayerTranscoder(L, F_, d, activation_function="jump_relu", lazy_decoder=False, lazy_encoder=False,
                               feature_input_hook=cfg.feature_input_hook,
                               feature_output_hook=cfg.feature_output_hook,
                               skip_connection=model.W_skip is not None,
                               device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        if model.W_skip is not None:  # raw: y = s_out * ((x / s_in) @ S)
            clt.W_skip.copy_(model.W_skip * (out_scale / in_scale)[:, None, None])
        clt.W_enc.copy_(model.W_enc / in_scale[:, None, None])
        clt.b_enc.copy_(model.b_enc)
        clt.b_dec.copy_(model.b_dec * out_scale[:, None])
        clt.activation_function.threshold.copy_(threshold[:, None, :])
        for l in range(L):
            clt.W_dec[l].copy_((model.W_dec[l] * out_scale[l:, None, None]).transpose(0, 1))
    return clt


def inlier_mask(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[n] bool: positions whose norm stays within ``ratio`` x the median norm at every layer of ``x`` [n, L, d]
    (all True when ratio is 0). A function of the chunk alone, so a resumed run drops the same positions."""
    if not ratio:
        return torch.ones(x.shape[0], dtype=torch.bool)
    norms = x.norm(dim=-1)                                            # [n, L]
    return (norms <= ratio * norms.median(0).values.clamp_min(1e-12)).all(1)


@torch.no_grad()
def calibrate_topk_thresholds(model: CLTModel, x: torch.Tensor) -> torch.Tensor:
    """Per-feature JumpReLU thresholds reproducing each feature's TopK firing rate on ``x`` (normalised):
    theta_f = the (1 - rate_f) quantile of feature f's pre-activations, never below 0; features that never
    make the TopK get a threshold above every pre-activation seen."""
    pre = model.pre_activations(x)                                   # [n, L, F]
    n = pre.shape[0]
    _, idx = pre.topk(model.cfg.k, dim=-1)
    counts = torch.zeros_like(pre[0]).scatter_add_(-1, idx.transpose(0, 1).reshape(model.n_layers, -1),
                                                   torch.ones(model.n_layers, n * model.cfg.k))
    sorted_pre = pre.sort(dim=0, descending=True).values             # [n, L, F]
    kth = counts.long().clamp(min=1) - 1                             # index of the last firing value
    last_in = sorted_pre.gather(0, kth[None]).squeeze(0)
    next_out = sorted_pre.gather(0, (kth + 1).clamp(max=n - 1)[None]).squeeze(0)
    theta = ((last_in + next_out) / 2).clamp_min(0.0)                # midway between firing and not firing
    never = counts == 0
    theta[never] = sorted_pre[0][never].clamp_min(0.0) + 1.0
    return theta


def _dense_opt_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer state as safetensors-ready tensors + JSON (no pickle)."""
    sd = opt.state_dict()
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{prefix}.{pid}.{key}"] = v
                meta["state"][str(pid)][key] = "tensor"
            else:
                meta["state"][str(pid)][key] = v
    return tensors, meta


def _load_opt_state(opt: torch.optim.Optimizer, prefix: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"{prefix}.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


# --------------------------------------------------------------------------------------------------- train

def _model_and_tokenizer(loaded: Any) -> tuple[torch.nn.Module, Any]:
    if isinstance(loaded, tuple) and len(loaded) == 2:
        return loaded
    if hasattr(loaded, "model") and hasattr(loaded, "tokenizer"):
        return loaded.model, loaded.tokenizer
    raise TypeError(f"train_clt needs a LoadedModel (with .model and .tokenizer) or a (model, tokenizer) pair, "
                    f"got {type(loaded).__name__}")


def _lr_factor(step: int, cfg: CLTTrainConfig) -> float:
    total = cfg.total_steps
    warm = min(1.0, (step + 1) / max(1, cfg.lr_warmup_steps))
    decay_start = total * (1 - cfg.lr_decay_frac)
    decay = 1.0 if step < decay_start else max(0.0, (total - step) / max(1.0, total - decay_start))
    return warm * decay


def _lambda(step: int, cfg: CLTTrainConfig) -> float:
    ramp = max(1.0, cfg.sparsity_ramp_frac * cfg.total_steps)
    return cfg.sparsity_coef * min(1.0, (step + 1) / ramp)


def _clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> float:
    """Global-norm clipping that also takes SparseAdam's sparse COO gradients (``clip_grad_norm_`` does not).
    Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    sq = sum(float((g.coalesce().values() if g.is_sparse else g).float().pow(2).sum()) for g in grads)
    norm = math.sqrt(sq)
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / (norm + 1e-6))
    return norm


class _Trainer:
    def __init__(self, n_layers: int, d_model: int, cfg: CLTTrainConfig):
        self.cfg = cfg
        self.clt = CLTModel(n_layers, d_model, cfg)
        self.sparse_grad = cfg.sparse_decode and cfg.sparse_adam
        if self.sparse_grad:
            self.opts = [torch.optim.Adam(self.clt.dense_parameters(), lr=cfg.lr, fused=True),
                         torch.optim.SparseAdam(list(self.clt.W_dec), lr=cfg.lr)]
        else:
            # fused: one pass over each parameter instead of one per Adam op (the decoders are most of the memory)
            self.opts = [torch.optim.Adam(self.clt.parameters(), lr=cfg.lr, fused=True)]
        self.in_scale = torch.ones(n_layers)
        self.out_scale = torch.ones(n_layers)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self.outliers_dropped = 0           # positions left out by ``outlier_norm_ratio`` (chunks counted once)

    @torch.no_grad()
    def initialise_from(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data-dependent init from the first chunk: per-layer scales (E||x||^2 = d_model after scaling),
        b_dec = mean output, and JumpReLU thresholds giving about ``threshold_init_l0`` active features."""
        d = x.shape[-1]
        self.in_scale = (x.pow(2).sum(-1).mean(0) / d).sqrt().clamp_min(1e-8)
        self.out_scale = (y.pow(2).sum(-1).mean(0) / d).sqrt().clamp_min(1e-8)
        xn, yn = x / self.in_scale[:, None], y / self.out_scale[:, None]
        self.clt.b_dec.copy_(yn.mean(0))
        if self.clt.W_skip is not None:
            # ridge regression of the centred outputs on the centred inputs, per layer (float64 normal equations:
            # d_model x d_model, cheap); the decoders then start from the residual the skip cannot explain
            xc = (xn - xn.mean(0)).transpose(0, 1).double()             # [L, n, d]
            yc = (yn - yn.mean(0)).transpose(0, 1).double()
            gram = xc.transpose(1, 2) @ xc
            ridge = 1e-2 * gram.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(d, dtype=gram.dtype)
            # one layer at a time: batched linalg.solve (MKL LU) fails on 2 threads with torch 2.13 ("Pivots
            # given to lu_solve must all be greater or equal to 1"; measured on [30, 576, 576] float64)
            for l in range(self.clt.n_layers):
                self.clt.W_skip[l].copy_(torch.linalg.solve(gram[l] + ridge[l], xc[l].T @ yc[l]).float())
            self.clt.b_dec.sub_((xn.mean(0)[:, None, :] @ self.clt.W_skip).squeeze(1))
        if self.cfg.activation == "jumprelu":
            pre = self.clt.pre_activations(xn[:2048])
            q = 1 - min(1.0, self.cfg.threshold_init_l0 / self.cfg.d_transcoder)
            theta = torch.quantile(pre.transpose(0, 1).reshape(self.clt.n_layers, -1), q, dim=1).clamp_min(1e-3)
            self.clt.log_threshold.copy_(theta.log()[:, None].expand_as(self.clt.log_threshold))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        xn, yn = x / self.in_scale[:, None], y / self.out_scale[:, None]
        for opt in self.opts:
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(self.step, cfg)
            opt.zero_grad(set_to_none=True)
        loss, info = self.clt.loss(xn, yn, _lambda(self.step, cfg), sparse_grad=self.sparse_grad)
        loss.backward()
        if cfg.grad_clip > 0:
            info["grad_norm"] = _clip_grad_norm(self.clt.parameters(), cfg.grad_clip)
        for opt in self.opts:
            opt.step()
        self.step += 1
        return info

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, ckpt_dir: Path) -> None:
        tensors = {f"model.{k}": v for k, v in self.clt.state_dict().items()}
        tensors["in_scale"], tensors["out_scale"] = self.in_scale, self.out_scale
        metas = []
        for i, opt in enumerate(self.opts):
            t, m = _dense_opt_state(opt, f"opt{i}")
            tensors.update(t)
            metas.append(m)
        write_tensors(ckpt_dir / "state.safetensors", tensors)
        # the JSON is written last: it is the commit record that says the tensors belong to this step
        write_json(ckpt_dir / "state.json", {"step": self.step, "config": self.cfg.to_dict(), "optimizers": metas,
                                              "history": self.history, "train_seconds": self.train_seconds,
                                              "outliers_dropped": self.outliers_dropped})

    def load_checkpoint(self, ckpt_dir: Path) -> None:
        meta = read_json(ckpt_dir / "state.json")
        saved_cfg = CLTTrainConfig.from_dict(meta["config"])
        if saved_cfg != self.cfg:
            diff = {k: (v, getattr(self.cfg, k)) for k, v in saved_cfg.to_dict().items() if getattr(self.cfg, k) != v}
            raise ValueError(f"checkpoint at {ckpt_dir} was written with a different config "
                             f"(field: (checkpoint, requested)) {diff}; use a fresh out_dir or the same config")
        tensors = read_tensors(ckpt_dir / "state.safetensors")
        self.clt.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        self.in_scale, self.out_scale = tensors["in_scale"], tensors["out_scale"]
        for i, (opt, m) in enumerate(zip(self.opts, meta["optimizers"])):
            _load_opt_state(opt, f"opt{i}", tensors, m)
        self.step, self.history, self.train_seconds = meta["step"], meta["history"], meta["train_seconds"]
        self.outliers_dropped = meta.get("outliers_dropped", 0)


@torch.no_grad()
def evaluate_clt(clt: Any, x: torch.Tensor, y: torch.Tensor, batch: int = 1024) -> dict[str, Any]:
    """Metrics of a circuit-tracer ``CrossLayerTranscoder`` on raw activations x, y [n, L, d]:
    per-layer NMSE = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 (fraction of variance unexplained),
    mean L0 per layer, and the fraction of features that never fire on these tokens."""
    L, d = clt.n_layers, clt.d_model
    err = torch.zeros(L)
    l0 = torch.zeros(L)
    fired = torch.zeros(L, clt.d_transcoder, dtype=torch.bool)
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch].to(clt.dtype), y[i:i + batch].to(clt.dtype)
        n = xb.shape[0]
        acts = clt.encode(xb.transpose(0, 1))                      # [L, n, F], circuit-tracer's own encoder
        recon = clt.b_dec.expand(n, L, d).clone()
        for l in range(L):
            tok, feat = acts[l].nonzero(as_tuple=True)
            offsets = torch.searchsorted(tok, torch.arange(n))
            dec = clt._get_decoder_vectors(l).reshape(clt.d_transcoder, -1)
            recon[:, l:] += F.embedding_bag(feat, dec, offsets, mode="sum",
                                            per_sample_weights=acts[l][tok, feat]).view(n, L - l, d)
        if getattr(clt, "W_skip", None) is not None:   # circuit-tracer's compute_skip, all layers at once
            recon += torch.bmm(xb.transpose(0, 1), clt.W_skip).transpose(0, 1)
        err += (recon - yb).pow(2).sum(-1).sum(0).float()
        l0 += (acts > 0).sum(-1).sum(-1).float()
        fired |= (acts > 0).any(1)
    var = (y - y.mean(0)).pow(2).sum(-1).sum(0)
    nmse = err / var.clamp_min(1e-12)
    return {"nmse_per_layer": nmse.tolist(), "nmse_mean": float(nmse.mean()),
            "nmse_total": float(err.sum() / var.sum().clamp_min(1e-12)),
            "l0_per_layer": (l0 / x.shape[0]).tolist(), "l0_mean": float(l0.mean() / x.shape[0]),
            "dead_fraction_per_layer": (~fired).float().mean(1).tolist(),
            "dead_fraction": float((~fired).float().mean()), "eval_tokens": int(x.shape[0])}


def train_clt(loaded: Any, texts: Iterable[str] | str | Path, cfg: CLTTrainConfig, out_dir: str | Path,
              max_steps: int | None = None, progress: bool = True) -> TrainResult:
    """Train a CLT on ``texts`` for ``loaded`` (a LoadedModel or a (model, tokenizer) pair) and save it in
    circuit-tracer's layout in ``out_dir/transcoder`` (``save_transcoder`` owns that directory) next to
    ``metrics.json`` and ``train_config.json``.

    Resumes from ``out_dir/checkpoint`` when present (same config required). ``max_steps`` stops after that
    many steps in this call (time-sliced runs): a checkpoint is written and the result has
    ``metrics["finished"] = False`` and no transcoder yet.
    """
    model, tokenizer = _model_and_tokenizer(loaded)
    texts = read_texts(texts) if isinstance(texts, (str, Path)) else read_texts(list(texts))
    if not texts:
        raise ValueError("train_clt got no texts")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    model.eval()

    stream = ActivationStream(model, tokenizer, texts, cfg)
    trainer = _Trainer(stream.n_layers, model.config.hidden_size, cfg)
    batches_per_pass = cfg.chunk_tokens // cfg.batch_tokens
    steps_per_chunk = batches_per_pass * cfg.chunk_passes
    if (ckpt_dir / "state.json").exists():
        trainer.load_checkpoint(ckpt_dir)
    cfg.save(out_dir / CONFIG_FILE)

    stop_at = cfg.total_steps if max_steps is None else min(cfg.total_steps, trainer.step + max_steps)
    bar = tqdm(total=cfg.total_steps, initial=trainer.step, desc="CLT training", unit="step", disable=not progress)
    chunks = stream.chunks(trainer.step // steps_per_chunk)
    t_wall = time.perf_counter()
    t_collect = 0.0
    x_chunk = None
    while trainer.step < stop_at:
        t0 = time.perf_counter()
        c, x_chunk, y_chunk = next(chunks)
        t_collect += time.perf_counter() - t0
        keep = inlier_mask(x_chunk, cfg.outlier_norm_ratio)
        if trainer.step == 0:
            trainer.initialise_from(x_chunk[keep], y_chunk[keep])
        first = trainer.step - c * steps_per_chunk
        if first == 0:
            trainer.outliers_dropped += int((~keep).sum())
        order = None
        for s in range(first, steps_per_chunk):
            if trainer.step >= stop_at:
                break
            p, b = divmod(s, batches_per_pass)
            sl = slice(b * cfg.batch_tokens, (b + 1) * cfg.batch_tokens)
            if p == 0:  # the chunk's own shuffled order
                xb, yb, kb = x_chunk[sl], y_chunk[sl], keep[sl]
            else:       # a later pass: a fresh order, a pure function of (seed, chunk, pass) so resume is exact
                if order is None or order[0] != p:
                    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + c * 1_009 + p)
                    order = (p, torch.randperm(cfg.chunk_tokens, generator=g))
                xb, yb, kb = x_chunk[order[1][sl]], y_chunk[order[1][sl]], keep[order[1][sl]]
            if not kb.all():   # outliers leave the batch; batch sizes vary slightly, step numbering does not
                xb, yb = xb[kb], yb[kb]
            t0 = time.perf_counter()
            if len(xb):
                info = trainer.train_step(xb, yb)
            else:              # a batch of outliers only: no update, but the step still counts (exact resume)
                trainer.step += 1
            trainer.train_seconds += time.perf_counter() - t0
            if len(xb) and (trainer.step % cfg.log_every == 0 or trainer.step == stop_at):
                trainer.history.append({"step": trainer.step, **info})
                bar.set_postfix(loss=f"{info['loss']:.4f}", nmse=f"{info['nmse']:.3f}", l0=f"{info['l0']:.1f}")
            bar.update(1)
            if trainer.step % cfg.checkpoint_every == 0 and trainer.step < cfg.total_steps:
                trainer.save_checkpoint(ckpt_dir)
    bar.close()
    wall = time.perf_counter() - t_wall
    if trainer.step < cfg.total_steps:
        trainer.save_checkpoint(ckpt_dir)
        return TrainResult(out_dir / TRANSCODER_DIR, {"finished": False, "step": trainer.step,
                                                      "history": trainer.history}, out_dir)

    # ---- export: fold the normalisation into the weights, save, reload from disk, evaluate the saved model
    if cfg.activation == "topk":
        if x_chunk is None:  # resumed exactly at the end: re-collect one chunk for calibration
            _, x_chunk, _ = next(stream.chunks(0))
        x_cal = x_chunk[inlier_mask(x_chunk, cfg.outlier_norm_ratio)]
        threshold = calibrate_topk_thresholds(trainer.clt, x_cal / trainer.in_scale[:, None])
    else:
        threshold = trainer.clt.log_threshold.detach().exp()
    clt = to_circuit_tracer(trainer.clt, trainer.in_scale, trainer.out_scale, threshold, cfg)
    tc_dir = out_dir / TRANSCODER_DIR
    save_transcoder(clt, tc_dir, extra_config={"trained_by": "crafttrace.training", "train_config": cfg.to_dict()})
    saved = load_transcoder(tc_dir)   # metrics describe the files on disk, not the in-memory model
    x_eval, y_eval = stream.eval_set()
    keep_eval = inlier_mask(x_eval, cfg.outlier_norm_ratio)
    x_eval, y_eval = x_eval[keep_eval], y_eval[keep_eval]
    metrics: dict[str, Any] = {"finished": True, "step": trainer.step, "train_tokens": trainer.step * cfg.batch_tokens,
                               "collected_tokens": -(-trainer.step // steps_per_chunk) * cfg.chunk_tokens,
                               "outliers_dropped_train": trainer.outliers_dropped,
                               "outliers_dropped_eval": int((~keep_eval).sum())}
    metrics.update(evaluate_clt(saved, x_eval, y_eval))
    with torch.no_grad():  # the in-memory model (for TopK: before the JumpReLU export) on the same tokens
        _, info = trainer.clt.loss(x_eval / trainer.in_scale[:, None], y_eval / trainer.out_scale[:, None], 0.0)
    metrics["train_model_nmse_mean"] = info["nmse"]
    if cfg.activation == "topk":
        metrics["topk_nmse_mean"] = info["nmse"]
    metrics["train_tokens_per_s"] = cfg.batch_tokens * cfg.total_steps / max(trainer.train_seconds, 1e-9)
    metrics["collect_seconds_this_call"] = t_collect
    metrics["wall_seconds_this_call"] = wall
    metrics["history"] = trainer.history
    write_json(out_dir / METRICS_FILE, metrics)
    trainer.save_checkpoint(ckpt_dir)
    return TrainResult(tc_dir, metrics, out_dir)
