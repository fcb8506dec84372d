"""Tiny random model + CLT fixtures for the pipeline stages (fast; no artifact, no hub)."""

from __future__ import annotations

import torch
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ["<pad>", "<unk>", "<bos>", "<eos>", "<|user|>", "<|assistant|>", "<|end|>",
         "sure", "sorry", "make", "burn", "a", "the", "bomb", "dog", "cake", "how", "?", "for", "story"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class TinyLoaded:
    """Duck-typed LoadedModel: the pipeline only needs model, tokenizer, encode_prompt/format_prompt."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.name = model, tokenizer, "tiny"

    def format_prompt(self, user: str, system=None) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                  add_generation_prompt=True)

    def encode_prompt(self, user: str) -> torch.Tensor:
        return torch.tensor([self.tokenizer(self.format_prompt(user), add_special_tokens=False)["input_ids"]])


def tiny_model(seed: int = 0, n_layers: int = 2, d: int = 32) -> TinyLoaded:
    torch.manual_seed(seed)
    vocab = {w: i for i, w in enumerate(WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.chat_template = TEMPLATE
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=d, intermediate_size=2 * d, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      architectures=["LlamaForCausalLM"], tie_word_embeddings=False, bos_token_id=2,
                      eos_token_id=3, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return TinyLoaded(model, tok)


def tiny_clt(n_layers: int = 2, d: int = 32, d_t: int = 16, seed: int = 1, skip: bool = False) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(n_layers, d_t, d, activation_function="jump_relu", lazy_decoder=False,
                               skip_connection=skip, device=torch.device("cpu"), dtype=torch.float32)
    with torch.no_grad():
        clt.W_enc.normal_(0, 3.0)
        clt.b_enc.normal_(0, 0.05)
        for w in clt.W_dec:
            w.normal_(0, 0.1)
        if skip:
            clt.W_skip.normal_(0, 2.0 / d ** 0.5)  # strong enough that cutting the skip path shows
    return clt
