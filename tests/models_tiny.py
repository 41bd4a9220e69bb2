"""Tiny random causal LMs of several architectures, for fast lossless tests."""
from __future__ import annotations

import torch
from hypothesis import strategies as st
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


@st.composite
def tree_steps(draw, ragged: bool | None = None):
    """A verification step: B rows of one random tree of T nodes over a KV prefix with holes,
    (ids, mask, positions, nodes, seed). `nodes` [B, T] marks the real nodes of a ragged step
    (row b's first sizes[b]; 0: a finished row; some row has one), or is None for a dense step;
    ragged=None draws which."""
    B, T, prefix = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 30))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, T)]
    anc = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        anc[i] |= anc[parents[i]]
    valid = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=prefix, max_size=prefix), min_size=B, max_size=B)))
    valid[:, -1] = True
    mask = torch.cat([valid[:, None, :].expand(B, T, prefix), anc.repeat(B, 1, 1)], 2)[:, None]
    ids = torch.tensor(draw(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=T, max_size=T), min_size=B, max_size=B)))
    nodes = None
    if ragged or (ragged is None and draw(st.booleans())):
        sizes = torch.tensor(draw(st.lists(st.integers(0, T), min_size=B, max_size=B).filter(any)))
        nodes = torch.arange(T)[None] < sizes[:, None]
    positions = (prefix + anc.sum(1) - 1).repeat(B, 1)
    return ids, mask, positions, nodes, draw(st.integers(0, 2**31 - 1))


def twin_caches(model, batch: int, length: int, seed: int):
    """Two runtime KV caches holding the same random entries (to compare two forwards on)."""
    from propd_compile.cache import TreeKVCache

    caches = [TreeKVCache.for_model(model, batch, length) for _ in range(2)]
    g = torch.Generator().manual_seed(seed)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        a.normal_(generator=g)
        b.copy_(a)
    return caches


def q4_1_weights(model: torch.nn.Module, names: tuple[str, ...] = ("layers",)) -> torch.nn.Module:
    """Round the bias-free linear weights under `names` to GGUF Q4_1 values (blocks of 32 along
    the inputs: fp16 scale d and minimum m, w = d * q + m with q in 0..15), the form a model
    dequantized from GGUF has; in place, returns the model."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and mod.bias is None and any(n in name for n in names):
                w = mod.weight
                b = w.reshape(w.shape[0], -1, 32)
                lo = b.amin(-1, keepdim=True).half().float()
                d = ((b.amax(-1, keepdim=True) - lo) / 15).half().float().clamp_min(2**-14)
                q = ((b - lo) / d).round().clamp(0, 15)
                w.copy_((d * q + lo).reshape(w.shape))
    return model
