"""Tiny random causal LMs of several architectures, for fast lossless tests."""
from __future__ import annotations

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64
EOS = 5
PAD = 0
ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def tiny_model(
    arch: str = "llama", seed: int = 0, kv_heads: int = 2, layers: int = 2, vocab: int = VOCAB
) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=1, attn_implementation="sdpa")
    llama_like = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, max_position_embeddings=256, **common,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**llama_like))
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**llama_like))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**llama_like))
    elif arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=256, **common))
    else:
        raise ValueError(arch)
    return model.eval()


def hf_greedy(model, input_ids, attention_mask, max_new_tokens, **kw) -> torch.Tensor:
    """The model's own greedy generate, also on an accelerated model."""
    return type(model).generate(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False, **kw
    )


def left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows), P), PAD, dtype=torch.long)
    mask = torch.zeros((len(rows), P), dtype=torch.long)
    for b, r in enumerate(rows):
        if r:
            ids[b, P - len(r) :] = torch.tensor(r)
            mask[b, P - len(r) :] = 1
    return ids, mask


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' vocabulary: token i is a short word, so
    token ids decode to text (stop strings, streamers, pipelines) without any download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # "abcdef" (id VOCAB, never generated): HF's stop-string matching decodes tokens after it
    words = ["<pad>", "<s>", "<unk>", "<x3>", "<x4>", "</s>"] + [f"w{i}" for i in range(6, VOCAB)] + ["abcdef"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok
