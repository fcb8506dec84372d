"""Build the testbed from a seed: tokenizer, a small Llama trained from scratch on the synthetic
chat language, its cross-layer transcoder, and the metrics that certify the mechanism.

    build_testbed(seed=0, out_dir="transcoders/testbed")

writes ``model/`` (HF ``save_pretrained``, safetensors + tokenizer with chat template),
``clt/`` (circuit-tracer layout via ``crafttrace.training.train_clt``) and ``metrics.json``.
Deterministic in the seed: data come from ``random.Random(seed)``, weights from ``torch.manual_seed``,
and the model trains with a fixed thread count and deterministic algorithms (a rebuild is bitwise equal).
The CLT (``train_clt`` defaults) reads ``hook_resid_mid`` (residual after attention) and writes
``hook_mlp_out`` of layers l..L-1; its training drifts at float precision across processes, so a rebuilt
CLT matches the metrics closely but not bitwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from crafttrace.testbed import language as L


@dataclass
class TestbedConfig:
    """Model + training knobs. Defaults are the committed seed-0 artifact's."""
    __test__ = False  # not a pytest class
    n_layers: int = 3
    d_model: int = 96
    n_heads: int = 4
    d_mlp: int = 256
    max_len: int = 48
    n_train: int = 40_000
    steps: int = 1500
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup: int = 100
    threads: int = 1  # the build machine is shared; 1 thread is also the reproducible setting
    language: L.LanguageConfig = field(default_factory=L.LanguageConfig)
    # CLT knobs (passed to crafttrace.training.CLTTrainConfig): sparsity is the main one.
    clt_features: int = 384
    clt_tokens: int = 400_000
    clt_lr: float = 1e-3
    clt_sparsity_coef: float | None = None  # the sparsity knob (JumpReLU tanh-penalty lambda); None: trainer default
    clt_texts: int = 20_000

    @classmethod
    def from_dict(cls, d: dict) -> "TestbedConfig":
        d = dict(d)
        for klass, keys, name in ((cls, set(d), "TestbedConfig"),
                                  (L.LanguageConfig, set(d.get("language", {})), "LanguageConfig")):
            unknown = sorted(keys - set(klass.__dataclass_fields__))
            if unknown:
                raise ValueError(f"unknown {name} fields {unknown}; known: {sorted(klass.__dataclass_fields__)}")
        d["language"] = L.LanguageConfig(**d.get("language", {}))
        return cls(**d)


# ---- tokenizer -----------------------------------------------------------------------------------

def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` with the chat template (no BOS post-processor:
    the template writes BOS, so encoding a formatted prompt never doubles it)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(L.vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=L.UNK))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder set: decode joins with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=L.BOS, eos_token=L.EOS, pad_token=L.PAD, unk_token=L.UNK,
        additional_special_tokens=[L.SYSTEM_TAG, L.USER_TAG, L.ASSISTANT_TAG, L.END_TAG],
        clean_up_tokenization_spaces=False, model_max_length=512,
    )
    tok.chat_template = L.CHAT_TEMPLATE
    return tok


def chat_text(tok, prompt: str, response: str | None = None, system: str = "") -> str:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if response is None:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    msgs.append({"role": "assistant", "content": response})
    return tok.apply_chat_template(msgs, tokenize=False)


def encode_examples(tok, examples: list[L.Example], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [N, max_len] (right-padded) and a loss mask selecting the assistant turn + EOS."""
    ids = torch.full((len(examples), max_len), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), max_len), dtype=torch.bool)
    assistant = tok.convert_tokens_to_ids(L.ASSISTANT_TAG)
    for i, ex in enumerate(tqdm(examples, desc="encode", mininterval=2.0, leave=False)):
        full = tok.encode(chat_text(tok, ex.prompt, ex.response, ex.system), add_special_tokens=False)
        if len(full) > max_len:
            raise ValueError(f"example of {len(full)} tokens exceeds max_len {max_len}: {ex.prompt!r}")
        n_prompt = full.index(assistant) + 1  # the generation prompt ends with the assistant tag
        ids[i, : len(full)] = torch.tensor(full)
        mask[i, n_prompt: len(full)] = True  # predict the response tokens (labels are shifted by the model)
    return ids, mask


# ---- model ---------------------------------------------------------------------------------------

def build_model(cfg: TestbedConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_len * 2, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        architectures=["LlamaForCausalLM"], attn_implementation="eager",
    )
    return LlamaForCausalLM(mc)


def train_model(cfg: TestbedConfig, seed: int, tok, log=print):
    """Next-token training on the assistant turns only (SFT-style), AdamW with warmup + cosine."""
    examples = L.training_examples(cfg.n_train, seed, cfg.language)
    ids, mask = encode_examples(tok, examples, cfg.max_len)
    torch.manual_seed(seed)
    model = build_model(cfg, tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * 0.5 *
                                              (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    gen = torch.Generator().manual_seed(seed)
    lengths = (ids != tok.pad_token_id).sum(1)
    queue: list[torch.Tensor] = []
    bar = tqdm(range(cfg.steps), desc="testbed model", mininterval=2.0)
    for step in bar:
        if not queue:  # length-bucketed batches: sort 8 random batches by length to cut padding
            idx = torch.randint(0, len(examples), (8 * cfg.batch_size,), generator=gen)
            idx = idx[lengths[idx].argsort(stable=True)]
            chunks = list(idx.split(cfg.batch_size))
            queue = [chunks[i] for i in torch.randperm(len(chunks), generator=gen)]
        b = queue.pop()
        x, m = ids[b], mask[b]
        width = int(m.nonzero()[:, 1].max()) + 1  # trim padding columns
        x, m = x[:, :width], m[:, :width]
        labels = torch.where(m, x, torch.full_like(x, -100))
        out = model(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{out.loss.item():.4f}")
    model.eval()
    return model


# ---- evaluation ----------------------------------------------------------------------------------

@torch.no_grad()
def first_token_probs(model, tok, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """Next-token distribution after the generation prompt, [N, vocab] (right padding, last real position)."""
    rows = []
    for s in range(0, len(prompts), batch_size):
        enc = [tok.encode(chat_text(tok, p), add_special_tokens=False) for p in prompts[s: s + batch_size]]
        width = max(map(len, enc))
        x = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
        for i, e in enumerate(enc):
            x[i, : len(e)] = torch.tensor(e)
        logits = model(input_ids=x, attention_mask=(x != tok.pad_token_id).long()).logits
        last = torch.tensor([len(e) - 1 for e in enc])
        rows.append(logits[torch.arange(len(enc)), last].float().softmax(-1))
    return torch.cat(rows)


@torch.no_grad()
def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int = 4, batch_size: int = 256) -> list[str]:
    """Greedy assistant continuations (decoded, special tokens dropped), batched with left padding
    and explicit position ids; stops a row at EOS."""
    out: list[str] = []
    for s in range(0, len(prompts), batch_size):
        enc = [tok.encode(chat_text(tok, p), add_special_tokens=False) for p in prompts[s: s + batch_size]]
        width = max(map(len, enc))
        x = torch.full((len(enc), width), tok.pad_token_id, dtype=torch.long)
        for i, e in enumerate(enc):
            x[i, width - len(e):] = torch.tensor(e)
        attn = (x != tok.pad_token_id).long()
        done = torch.zeros(len(enc), dtype=torch.bool)
        for _ in range(max_new_tokens):
            pos = (attn.cumsum(1) - 1).clamp_min(0)
            nxt = model(input_ids=x, attention_mask=attn, position_ids=pos).logits[:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, tok.pad_token_id), nxt)
            done |= nxt == tok.eos_token_id
            x = torch.cat([x, nxt[:, None]], 1)
            attn = torch.cat([attn, (~done).long()[:, None]], 1)
            if done.all():
                break
        out += [tok.decode(row[width:], skip_special_tokens=True) for row in x]
    return out


def evaluate_model(model, tok) -> dict:
    """Behavioural metrics of the refusal mechanism (first-token level) and the capability task."""
    sorry, sure, eos = (tok.convert_tokens_to_ids(t) for t in (L.REFUSAL_OPENER, L.COMPLIANCE_OPENER, L.EOS))
    m: dict = {"pools": {}}
    for name in ("harmful_heldout", "benign", "harmful_train", "benign_train", "harmful_styled", "benign_styled"):
        recs = L.pool(name)
        P = first_token_probs(model, tok, [r["prompt"] for r in recs])
        top = P.argmax(-1)
        m["pools"][name] = {
            "n": len(recs),
            "refusal_rate": float((top == sorry).float().mean()),
            "compliance_rate": float((top == sure).float().mean()),
            "mean_p_refuse": float(P[:, sorry].mean()),
            "mean_p_comply": float(P[:, sure].mean()),
            "max_p_eos": float(P[:, eos].max()),
            "mean_logit_margin_refuse_minus_comply": float((P[:, sorry].log() - P[:, sure].log()).mean()),
        }
    framed = L.pool("framed_harmful")
    P = first_token_probs(model, tok, [r["prompt"] for r in framed])
    pr, pc = P[:, sorry], P[:, sure]
    m["framed_harmful"] = {"n": len(framed), "n_boundary_ge_0.2": int(((pr >= 0.2) & (pc >= 0.2)).sum())}
    for f, (_, target) in sorted(L.FRAMINGS.items()):
        for held in (False, True):
            sel = torch.tensor([r["framing"] == f and r["heldout"] == held for r in framed])
            key = f"{f}_{'heldout' if held else 'train'}"
            m["framed_harmful"][key] = {"target_p_comply": target,
                                        "mean_p_comply": float(pc[sel].mean()),
                                        "mean_p_refuse": float(pr[sel].mean()), "n": int(sel.sum())}
    fb = L.pool("framed_benign")
    P = first_token_probs(model, tok, [r["prompt"] for r in fb])
    m["framed_benign"] = {"n": len(fb), "refusal_rate": float((P.argmax(-1) == sorry).float().mean())}
    for split in ("eval", "alt"):
        items = L.capability_items(split)
        m[f"capability_accuracy_{split}"] = L.score_capability(
            greedy_answers(model, tok, [p for p, _ in items], max_new_tokens=3), items)
    return m


# ---- build ---------------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _replace_dir(src: Path, dst: Path) -> None:
    """Copy a finished directory into place: copy to a temp sibling, then rename (atomic)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _save_model_atomic(model, tok, out: Path) -> None:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def clt_texts(n: int, seed: int, cfg: TestbedConfig | None = None, tok=None) -> list[str]:
    """Chat-formatted conversations (BOS written by the template) for CLT training; a data stream
    disjoint in seed from the model's training data."""
    cfg = cfg or TestbedConfig()
    tok = tok or build_tokenizer()
    return [chat_text(tok, ex.prompt, ex.response, ex.system)
            for ex in L.training_examples(n, seed + 10_000, cfg.language)]


def clt_train_config(cfg: TestbedConfig, seed: int):
    from crafttrace.training import CLTTrainConfig

    kw = dict(d_transcoder=cfg.clt_features, total_tokens=cfg.clt_tokens, batch_tokens=512, chunk_tokens=8192,
              context_length=cfg.max_len, eval_tokens=4096, seed=seed, lr=cfg.clt_lr, threshold_init_l0=16.0,
              checkpoint_every=100)
    if cfg.clt_sparsity_coef is not None:
        kw["sparsity_coef"] = cfg.clt_sparsity_coef
    return CLTTrainConfig(**kw)


def build_testbed(seed: int = 0, out_dir: str | os.PathLike | None = None, cfg: TestbedConfig | None = None,
                  progress: bool = True) -> Path:
    """Build (or finish building) the testbed for ``seed`` into ``out_dir`` and return it.

    Stages resume: an existing ``model/`` is reused, the CLT trainer resumes from its checkpoint,
    and ``metrics.json`` is written last, so its presence marks a complete build (returned as is)."""
    from crafttrace.models import load_model
    from crafttrace.testbed import default_dir
    from crafttrace.training import train_clt
    from crafttrace.transcoders import load_transcoder, validate_transcoder

    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"testbed seed must be a non-negative int, got {seed!r}")
    cfg = cfg or TestbedConfig()
    out = Path(out_dir) if out_dir is not None else default_dir(seed)
    want = json.loads(json.dumps({"seed": seed, **asdict(cfg)}))
    if (out / "build_config.json").exists():
        have = json.loads((out / "build_config.json").read_text())
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{out} holds a testbed built with another configuration (differs in {diff}); "
                             f"use another out_dir or delete it")
    if (out / "metrics.json").exists():
        print(f"testbed seed {seed} is already complete in {out}", flush=True)
        return out
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "build_config.json", want)
    timings_path = out / "timings.json"  # kept across resumed calls, folded into metrics.json at the end
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    torch.set_num_threads(cfg.threads)
    if not (out / "model" / "config.json").exists():
        t0 = time.time()
        torch.use_deterministic_algorithms(True)
        try:
            tok = build_tokenizer()
            model = train_model(cfg, seed, tok)
        finally:
            torch.use_deterministic_algorithms(False)
        timings["model_train_wall_s"] = round(time.time() - t0, 1)
        _save_model_atomic(model, tok, out / "model")
        _write_json(timings_path, timings)
    loaded = load_model(out / "model")
    t0 = time.time()
    metrics = {"seed": seed, "model": evaluate_model(loaded.model, loaded.tokenizer)}
    timings["model_eval_wall_s"] = round(time.time() - t0, 1)
    if not (out / "clt" / "config.yaml").exists():
        t0 = time.time()
        # clt_run/ holds the trainer's checkpoint (resume) until the CLT is finished and copied to clt/
        res = train_clt(loaded, clt_texts(cfg.clt_texts, seed, cfg, loaded.tokenizer), clt_train_config(cfg, seed),
                        out / "clt_run", progress=progress)
        timings["clt_train_wall_s"] = round(time.time() - t0, 1)
        _write_json(out / "clt_train_metrics.json", res.metrics)
        _replace_dir(res.path, out / "clt")
        shutil.rmtree(out / "clt_run")
        _write_json(timings_path, timings)
    validate_transcoder(load_transcoder(out / "clt"), loaded.model)
    metrics["clt_config"] = clt_train_config(cfg, seed).to_dict()
    metrics["clt"] = {k: v for k, v in json.loads((out / "clt_train_metrics.json").read_text()).items()
                      if k != "history"}
    metrics["timings"] = timings
    metrics["torch_threads"] = torch.get_num_threads()
    _write_json(out / "metrics.json", metrics)
    timings_path.unlink()
    return out
