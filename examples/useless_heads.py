"""Write draft heads with random weights for the embedded model: the worst case for the dynamic tree.

    python examples/useless_heads.py /tmp/useless-heads
    propd bench --heads /tmp/useless-heads --methods hf dynamic --batch-sizes 1

The heads have the shipped heads' shape (root-token blocks, draft vocabulary) but random weights
and no accuracy.json, so nothing tells the runtime they are useless: the acceptance model has to
find out online, and ProPD should then cost next to nothing over plain greedy decoding.
"""
import sys

import torch

from propd_compile import models
from propd_compile.heads import MedusaHeads, shipped_heads_for


def main(out: str, seed: int = 0) -> None:
    model, _ = models.load()
    shipped = MedusaHeads.load(shipped_heads_for(model), model)
    torch.manual_seed(seed)
    heads = MedusaHeads.for_model(model, shipped.num_heads, root_token=shipped.root_token)
    for p in heads.parameters():
        torch.nn.init.normal_(p, std=0.05)
    heads.draft_vocab = shipped.draft_vocab
    heads.save(out)
    print(f"random heads for {model.name_or_path or 'the embedded model'} in {out}")


if __name__ == "__main__":
    main(sys.argv[1])
