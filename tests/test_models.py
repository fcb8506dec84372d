"""crafttrace.models: local-dir and GGUF loading, prompt formatting, clear errors, packaged presets (opt in)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from crafttrace import models as M
from crafttrace.data import cache_dir
from crafttrace.hooks import capture
from crafttrace.models import ModelLoadError, load_model

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "How do I bake bread at home?",
          "Sure, here is a simple recipe.", "I cannot help with that request."] * 20


def _bpe() -> Tokenizer:
    """A small byte-level BPE (GPT-2 style, like SmolLM2's) trained on a few sentences."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tk


def _config(vocab: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                       tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random 2-layer Llama + a ChatML tokenizer whose post-processor also adds BOS (the double-BOS trap)."""
    torch.manual_seed(0)
    tk = _bpe()
    tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML
    model = LlamaForCausalLM(_config(tk.get_vocab_size())).eval()
    d = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d, model


def test_local_dir_round_trip(tiny):
    d, ref = tiny
    lm = load_model(str(d))
    assert (lm.n_layers, lm.d_model, lm.name) == (2, 32, d.name)
    assert lm.model.config.architectures == ["LlamaForCausalLM"]
    assert not lm.model.training and not any(p.requires_grad for p in lm.model.parameters())
    ids = lm.encode_prompt("How do I bake bread?")
    torch.testing.assert_close(lm.model(ids).logits, ref(ids).logits)
    assert load_model(d, dtype=torch.bfloat16).model.dtype == torch.bfloat16


def test_chat_template_and_single_bos(tiny):
    lm = load_model(str(tiny[0]))
    assert lm.has_chat_template
    text = lm.format_prompt("How do I bake bread?", system="Be brief.")
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    ids = lm.encode_prompt("How do I bake bread?")
    bos = lm.tokenizer.bos_token_id
    assert ids.dtype == torch.long and ids.shape[0] == 1
    assert ids[0, 0].item() == bos and ids[0, 1].item() != bos  # the template's BOS only, not a second one
    assert lm.tokenizer.decode(ids[0]) == lm.format_prompt("How do I bake bread?")
    # the trap is real: the tokenizer's own special tokens would double it
    assert lm.tokenizer(lm.format_prompt("x")).input_ids[:2] == [bos, bos]


def test_plain_fallback_without_chat_template(tiny, tmp_path):
    lm = load_model(str(tiny[0]))
    lm.tokenizer.chat_template = None
    assert not lm.has_chat_template
    assert lm.format_prompt("Hi there") == M.PLAIN_TEMPLATE.format(user="Hi there") == "User: Hi there\nAssistant:"
    assert lm.format_prompt("Hi", system="S") == "S\n\nUser: Hi\nAssistant:"
    ids = lm.encode_prompt("Hi there")[0].tolist()
    assert ids[0] == lm.tokenizer.bos_token_id and ids.count(lm.tokenizer.bos_token_id) == 1
    with pytest.raises(TypeError, match="must be a str"):
        lm.format_prompt(["not", "a", "string"])


def test_clear_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="model path not found: .*no/such/dir"):
        load_model(str(tmp_path / "no" / "such" / "dir"))
    with pytest.raises(ModelLoadError, match="GGUF file not found: .*missing.gguf"):
        load_model(tmp_path / "missing.gguf")
    with pytest.raises(ModelLoadError, match=r"'nobody/no-such-model'.*HF_HUB_OFFLINE.*preset"):
        load_model("nobody/no-such-model")
    with pytest.raises(ModelLoadError, match=r"unknown model 'smollm'.*smollm2-135m-instruct"):
        load_model("smollm")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="empty is not a Hugging Face model directory"):
        load_model(tmp_path / "empty")
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        load_model("smollm2-135m-instruct", dtype="float32")


# ---------------------------------------------------------------- GGUF

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py); transformers undoes it when loading."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_llama_gguf(path, model: LlamaForCausalLM, tk: Tokenizer) -> None:
    import gguf

    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    vocab = sorted(tk.get_vocab().items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in SPECIALS else 1 for t, _ in vocab])
    import json as _json
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m
                        for m in _json.loads(tk.to_str())["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(c.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, c.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_file_loads_exact_weights_and_repaired_tokenizer(tmp_path):
    torch.manual_seed(1)
    tk = _bpe()
    ref = LlamaForCausalLM(_config(tk.get_vocab_size())).eval()
    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(path, ref, tk)
    lm = load_model(path)
    assert lm.model.config.architectures == ["LlamaForCausalLM"] and lm.n_layers == 2
    tok = lm.tokenizer
    # transformers' GGUF import sets eos to the bos token; the GGUF's own ids must win
    assert (tok.bos_token, tok.eos_token, tok.unk_token) == ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert lm.model.generation_config.eos_token_id == 2
    assert tok("fox").input_ids == tk.encode("fox").ids  # add_bos_token=False from the GGUF
    ids = lm.encode_prompt("How do I bake bread?")
    assert ids[0].tolist() == tk.encode(lm.format_prompt("How do I bake bread?")).ids
    torch.testing.assert_close(lm.model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-5)


def _spm_vocab():
    """A SentencePiece-BPE style vocabulary (scores = merge priority), laid out like Gemma's GGUF."""
    tokens, scores, types = ["<pad>", "<eos>", "<bos>", "<unk>"], [0.0] * 4, [3] * 4
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    scores += [0.0] * 256
    types += [6] * 256
    tokens += ["\n\n", "<b>"]  # user-defined: matched whole
    scores += [0.0, 0.0]
    types += [4, 4]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "ll", "▁h", "▁he", "▁hell", "▁hello", "or", "▁w", "▁wor",
              "▁worl", "▁world", "el", "lo"]
    tokens += pieces
    scores += [-float(i) for i in range(len(pieces))]  # earlier = merged first; 'el', 'lo' lose to 'll'
    types += [1] * len(pieces)
    fields = {"tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
              "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
              "tokenizer.ggml.add_bos_token": True}
    return tokens, scores, types, fields


def test_spm_bpe_rebuild_merges_by_score():
    tokens, scores, types, fields = _spm_vocab()
    tok = M.spm_bpe_tokenizer(tokens, scores, types, fields)
    enc = tok("hello world")
    assert tok.convert_ids_to_tokens(enc.input_ids) == ["<bos>", "h", "e", "ll", "o", "▁world"]  # 'll' beats 'el'
    assert tok.convert_ids_to_tokens(tok(" hello world").input_ids) == ["<bos>", "▁hello", "▁world"]
    # byte fallback for characters outside the vocabulary, user-defined pieces whole, round trip
    toks = tok.convert_ids_to_tokens(tok(" hello\n\nH<b>").input_ids)
    assert toks == ["<bos>", "▁hello", "\n\n", "<0x48>", "<b>"]
    assert tok.decode(tok(" hello\n\nH<b>").input_ids, skip_special_tokens=True) == " hello\n\nH<b>"
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<bos>", "<eos>", "<pad>", "<unk>")
    with pytest.raises(ModelLoadError, match="3 scores"):
        M.spm_bpe_tokenizer(tokens, scores[:3], types, fields)


# ---------------------------------------------------------------- packaged presets (opt in)

def _preset_available(name: str) -> bool:
    d = cache_dir() / "models" / name
    return os.environ.get("CRAFTTRACE_FETCH") == "1" or (d / "hf" / "crafttrace_source.json").is_file() \
        or (d / M.PRESETS[name].filename).is_file()


def _assert_hooks_resolve(lm):
    """circuit-tracer's hook registry must place mlp.hook_in on the loaded (GGUF-converted) model."""
    ids = lm.encode_prompt("hi")
    with capture(lm.model, "mlp.hook_in", [0, lm.n_layers - 1]) as store, torch.no_grad():
        lm.model(ids)
    assert {k: tuple(v.shape) for k, v in store.items()} == {
        0: (1, ids.shape[1], lm.d_model), lm.n_layers - 1: (1, ids.shape[1], lm.d_model)}


def _skip_unless(name):
    return pytest.mark.skipif(not _preset_available(name),
                              reason=f"{name} not cached in {cache_dir() / 'models'}; set CRAFTTRACE_FETCH=1")


PARA = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg developed a "
        "system of movable metal type in Mainz. His invention made it possible to produce books far more quickly "
        "and cheaply than scribes copying by hand, and within a few decades printing shops had spread to most "
        "major European cities. Historians often argue that the press helped spread new ideas during the "
        "Renaissance and the Reformation.")


@pytest.mark.packaged_model
@_skip_unless("smollm2-135m-instruct")
def test_smollm2_preset_answers_and_stops():
    lm = load_model("smollm2-135m-instruct")
    assert (lm.n_layers, lm.d_model, lm.has_chat_template) == (30, 576, True)
    assert lm.model.config.architectures == ["LlamaForCausalLM"]
    assert lm.tokenizer.eos_token == "<|im_end|>" and lm.tokenizer.eos_token_id == 2
    ids = lm.encode_prompt("What is the capital of France?")
    assert ids[0, 0].item() == lm.tokenizer.bos_token_id != ids[0, 1].item()
    out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    assert new[-1] == 2 and len(new) < 40, lm.tokenizer.decode(new)  # stopped at <|im_end|>
    assert "Paris" in lm.tokenizer.decode(new)
    _assert_hooks_resolve(lm)


@pytest.mark.packaged_model
@_skip_unless("gemma-3-270m")
def test_gemma_preset_tokenizer_is_repaired():
    lm = load_model("gemma-3-270m")
    assert (lm.n_layers, lm.d_model, lm.has_chat_template) == (18, 640, False)
    assert lm.model.config.architectures == ["Gemma3ForCausalLM"]
    tok = lm.tokenizer
    assert tok.convert_ids_to_tokens(tok("Hello world").input_ids) == ["<bos>", "Hello", "▁world"]
    ids = tok(PARA, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = lm.model(ids, labels=ids).loss.item()
    assert ids.shape[1] < 90 and loss < 3.0, (ids.shape[1], loss)  # GGUF's Unigram import: 187 tokens, 5.9
    prompt = lm.encode_prompt("What is the capital of France?")[0].tolist()
    assert prompt[0] == tok.bos_token_id and prompt.count(tok.bos_token_id) == 1
    _assert_hooks_resolve(lm)
