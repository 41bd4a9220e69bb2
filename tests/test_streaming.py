"""Streamers under tree decoding: exactly the calls HF's generate makes, each as soon as the
tokens it carries are verified."""
import threading
from collections import Counter

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer
from transformers.generation.streamers import BaseStreamer

from models_tiny import hf_greedy, left_padded, tiny_model, tiny_tokenizer
from propd_compile import ProPDConfig, accelerate


class Record(BaseStreamer):
    """Every put (as a list) and how many model forwards had run when it came."""

    def __init__(self, model=None):
        self.puts, self.at, self.ended, self.forwards = [], [], 0, 0
        if model is not None:
            model.register_forward_hook(lambda *a: setattr(self, "forwards", self.forwards + 1))

    def put(self, value):
        self.puts.append(value.tolist())
        self.at.append(self.forwards)

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("rows", [[[7, 8, 9, 7, 8, 9, 7]], [[7, 8, 9, 7, 8, 9, 7], [10, 11, 12], [13]]])
def test_the_streamer_receives_hfs_calls(rows):
    """The prompt, then one [B] tensor per generated position (padding for rows that stopped),
    then end(): the same calls as HF's generate, at batch 1 and with rows that stop early."""
    model = tiny_model("llama", seed=3)
    ids, mask = left_padded(rows)
    eos = hf_greedy(model, ids, mask, 30)[-1, ids.shape[1] + 4].item()  # the last row stops early
    kw = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=eos)
    hf = Record()
    ref = hf_greedy(model, ids, streamer=hf, **kw)
    accelerate(model, ProPDConfig(tree="fixed", max_tree_nodes=8))
    ours = Record()
    assert torch.equal(model.generate(ids, streamer=ours, **kw), ref)
    assert ours.puts == hf.puts and ours.ended == hf.ended == 1


def test_every_accepted_token_is_streamed_when_its_step_is_verified():
    """Batch 1: the tokens put after the k-th verification forward are exactly the tokens that
    step accepted (the first token after the prefill), so nothing waits for a later step."""
    model = tiny_model("llama", seed=3)
    accelerate(model, ProPDConfig(tree="fixed", max_tree_nodes=8))
    ids = torch.tensor([[7, 8, 9, 7, 8, 9, 7, 8, 9]])
    model.generate(ids, max_new_tokens=1)  # the state's one-off checks (which kernels to use) run a forward
    rec = Record(model)
    model.generate(ids, max_new_tokens=40, streamer=rec)
    per_forward = Counter(rec.at[1:])  # rec.at[0]: the prompt
    assert [per_forward[k] for k in range(1, max(per_forward) + 1)] == [1] + model.propd.stats.accepted
    assert max(model.propd.stats.accepted) > 1  # some step accepted drafts


def test_text_streamers_print_hfs_text():
    """TextIteratorStreamer (read from another thread) yields HF's text; TextStreamer refuses a
    batch on the prompt, as under HF's generate."""
    model, tok = tiny_model("llama", seed=3), tiny_tokenizer()
    enc = tok(["w7 w8 w9 w7 w8"], return_tensors="pt")
    ref = hf_greedy(model, enc["input_ids"], enc["attention_mask"], 20)
    accelerate(model, ProPDConfig(tree="fixed", max_tree_nodes=8))
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    worker = threading.Thread(target=model.generate, kwargs=dict(**enc, max_new_tokens=20, streamer=streamer))
    worker.start()
    text = "".join(streamer)
    worker.join()
    assert text == tok.decode(ref[0, enc["input_ids"].shape[1]:])
    batch = tok(["w7 w8", "w9"], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="batch size 1"):
        model.generate(**batch, max_new_tokens=4, streamer=TextStreamer(tok))
