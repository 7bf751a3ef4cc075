"""Validation: loss and bits per byte of a model, and the unigram floor it must beat.

Bits per byte (bpb) is the model's summed cross-entropy in bits over the UTF-8 bytes those
tokens decode to; it is comparable across tokenizers. Targets that are special tokens
(`<|bos|>` and friends: zero bytes) are left out of both sums.

`unigram_bpb` fits token frequencies on the train split (add-one smoothed over the non-special
vocabulary) and scores the very same validation targets: the honest floor any model that
learned something about context must beat.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..tokenizer import load_encoder
from .dist import Dist, all_sum

LN2 = float(np.log(2.0))


def token_bytes(tokenizer_dir: str | Path, vocab_size: int) -> np.ndarray:
    """UTF-8 byte length of every token id; 0 for special tokens and ids past the tokenizer."""
    enc = load_encoder(tokenizer_dir)
    special = {enc.encode_single_token(s) for s in enc.special_tokens_set}
    out = np.zeros(vocab_size, dtype=np.int64)
    for i in range(min(vocab_size, enc.n_vocab)):
        if i not in special:
            out[i] = len(enc.decode_single_token_bytes(i))
    return out


@torch.no_grad()
def bits_per_byte(model: torch.nn.Module, rows: np.ndarray, tbytes: np.ndarray, dist: Dist, *,
                  micro_batch: int, accuracy: bool = False) -> dict[str, float]:
    """val_loss (nats per target token) and val_bpb over `rows`, split across processes; with
    `accuracy`, also val_acc (share of targets that are the model's top choice)."""
    per = -(-len(rows) // dist.world)
    mine = rows[dist.rank * per:(dist.rank + 1) * per]
    weights = torch.from_numpy(tbytes).to(dist.device)
    nats = nats_counted = n_bytes = n_targets = n_right = 0.0
    was_training = model.training
    model.eval()
    for i in range(0, len(mine), micro_batch):
        chunk = torch.from_numpy(mine[i:i + micro_batch]).to(dist.device)
        x, y = chunk[:, :-1], chunk[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        b = weights[y.flatten()]
        nats += float(loss.sum())
        n_targets += y.numel()
        nats_counted += float((loss * (b > 0)).sum())
        n_bytes += float(b.sum())
        if accuracy:
            n_right += float((logits.argmax(-1) == y).sum())
    model.train(was_training)
    nats, n_targets, nats_counted, n_bytes, n_right = all_sum([nats, n_targets, nats_counted, n_bytes, n_right], dist)
    out = {"val_loss": nats / max(n_targets, 1), "val_bpb": nats_counted / LN2 / max(n_bytes, 1)}
    return out | ({"val_acc": n_right / max(n_targets, 1)} if accuracy else {})


def unigram_bpb(train_tokens: np.ndarray, rows: np.ndarray, tbytes: np.ndarray, chunk: int = 1 << 24) -> float:
    """Bits per byte of an add-one unigram model fitted on `train_tokens`, scored on `rows`' targets."""
    vocab = len(tbytes)
    counts = np.zeros(vocab, dtype=np.int64)
    for i in range(0, len(train_tokens), chunk):
        counts += np.bincount(np.asarray(train_tokens[i:i + chunk], dtype=np.int64), minlength=vocab)[:vocab]
    real = tbytes > 0
    counts = np.where(real, counts + 1, 0)  # add-one over the tokens that carry bytes
    logp = np.zeros(vocab)
    logp[real] = np.log2(counts[real] / counts.sum())
    targets = rows[:, 1:].reshape(-1)
    scored = targets[real[targets]]
    return float(-logp[scored].sum() / max(int(tbytes[scored].sum()), 1))
