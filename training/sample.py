"""Generation from a trained model, as the article's ``predict``: warm the state up on a prefix, then emit."""

from __future__ import annotations

import torch

from textgen.service.vocab import Vocab

from .model import CharRNN


@torch.no_grad()
def predict(model: CharRNN, vocab: Vocab, prefix: str, num_chars: int, temperature: float = 0.0,
            seed: int = 0) -> str:
    """Feed ``prefix`` through the model, then generate ``num_chars`` characters (greedy when temperature is 0)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    ids = torch.from_numpy(vocab.encode(prefix))[None]  # (1, P)
    logits, state = model(ids)  # warmup: the whole prefix in one call, state carried to its end
    out: list[int] = []
    last = logits[0, -1]
    for _ in range(num_chars):
        if temperature == 0:
            nxt = int(last.argmax())
        else:
            probs = torch.softmax(last / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=g))
        out.append(nxt)
        logits, state = model(torch.tensor([[nxt]]), state)
        last = logits[0, -1]
    return vocab.decode(out)
