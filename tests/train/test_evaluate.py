"""lmforge.train.evaluate: token byte lengths, the unigram floor and a model's loss and bits per byte."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.model import GPT, ModelConfig
from lmforge.tokenizer import TokenizerConfig, load_encoder, save, special_tokens, train
from lmforge.train.dist import Dist
from lmforge.train.evaluate import bits_per_byte, token_bytes, unigram_bpb

CPU = Dist(0, 1, 0, torch.device("cpu"))
TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,
         "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
         "我能吞下玻璃而不伤身体。 Emoji: 👍🏽",
         "def f(x):\n    return x**2  # squared\n"] * 5


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer"
    save(train(TEXTS, TokenizerConfig(vocab_size=300)), path)
    return path


def test_token_bytes_zero_for_specials_and_ids_past_the_tokenizer(tokenizer_dir: Path) -> None:
    enc = load_encoder(tokenizer_dir)
    assert enc.n_vocab == 300
    tb = token_bytes(tokenizer_dir, 310)
    assert tb.shape == (310,) and tb.dtype == np.int64
    specials = [enc.encode_single_token(s) for s in special_tokens(16)]
    assert sorted(specials) == list(range(16))
    assert (tb[:16] == 0).all()
    assert (tb[300:] == 0).all()
    assert (tb[16:300] >= 1).all()
    for i in range(16, 300):
        assert tb[i] == len(enc.decode_single_token_bytes(i))
    # the byte lengths of a text's tokens add up to its UTF-8 length
    for text in TEXTS[:4]:
        assert int(tb[enc.encode_ordinary(text)].sum()) == len(text.encode("utf-8"))
    # a smaller vocab_size truncates
    np.testing.assert_array_equal(token_bytes(tokenizer_dir, 100), tb[:100])


def test_unigram_bpb_matches_a_hand_computation() -> None:
    tbytes = np.array([0, 1, 2, 1, 3])  # id 0 is special (no bytes)
    train_tokens = np.array([0, 1, 1, 2, 0, 3], dtype=np.uint16)
    rows = np.array([[0, 1, 2, 4], [0, 0, 3, 1]])
    # add-one counts over ids 1..4: 3, 2, 2, 1 (total 8); the special id gets no mass.
    # targets 1, 2, 4, 0, 3, 1: the 0 is left out; bytes 1 + 2 + 3 + 1 + 1 = 8.
    bits = -(2 * math.log2(3 / 8) + math.log2(2 / 8) + math.log2(1 / 8) + math.log2(2 / 8))
    want = bits / 8
    assert want == pytest.approx((7 + 2 * math.log2(8 / 3)) / 8) == pytest.approx(1.228759, abs=1e-6)
    assert unigram_bpb(train_tokens, rows, tbytes) == pytest.approx(want, rel=1e-12)
    assert unigram_bpb(train_tokens, rows, tbytes, chunk=2) == pytest.approx(want, rel=1e-12)
    assert unigram_bpb(train_tokens.astype(np.int64), rows, tbytes, chunk=4) == pytest.approx(want, rel=1e-12)
    # a unigram fitted on the scored text itself is no worse than one fitted elsewhere
    assert unigram_bpb(rows[:, 1:].ravel(), rows, tbytes) < unigram_bpb(np.array([4, 4, 4, 4]), rows, tbytes)


VOCAB = 40
TBYTES = np.array([0, 0] + [1 + i % 3 for i in range(VOCAB - 2)])  # ids 0 and 1: special


def make_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_depth(1, vocab_size=VOCAB, aspect_ratio=32, head_dim=16))


def make_rows(n: int = 5, row_len: int = 9) -> np.ndarray:
    rows = np.random.default_rng(0).integers(0, VOCAB, size=(n, row_len))
    rows[:, 0] = 0
    rows[1, 3] = rows[2, 5] = 1
    return rows


def test_bits_per_byte_of_a_uniform_model() -> None:
    model = make_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # logits all zero: every target has probability 1 / VOCAB
    rows = make_rows()
    out = bits_per_byte(model, rows, TBYTES, CPU, micro_batch=2)
    assert set(out) == {"val_loss", "val_bpb"}
    assert out["val_loss"] == pytest.approx(math.log(VOCAB), rel=1e-6)
    targets = rows[:, 1:]
    counted = int((TBYTES[targets] > 0).sum())
    assert 0 < counted < targets.size
    assert out["val_bpb"] == pytest.approx(math.log2(VOCAB) * counted / TBYTES[targets].sum(), rel=1e-6)


def test_bits_per_byte_matches_a_direct_computation_and_restores_train_mode() -> None:
    model = make_model(3)
    with torch.no_grad():
        model.lm_head.weight.normal_(std=0.5)  # far from uniform
    rows = make_rows(7, 11)
    with torch.no_grad():  # row 0: the model's own greedy continuation, so some targets are its top choice
        for t in range(1, 6):
            rows[0, t] = int(model(torch.from_numpy(rows[:1, :t]))[0, -1].argmax())
    x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
    with torch.no_grad():
        nats = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")
    b = torch.from_numpy(TBYTES)[y.flatten()]
    want_loss = float(nats.mean())
    want_bpb = float((nats * (b > 0)).sum()) / math.log(2) / float(b.sum())
    assert abs(want_loss - math.log(VOCAB)) > 0.05
    model.train()
    with torch.no_grad():
        want_acc = float((model(x).argmax(-1) == y).double().mean())
    assert 0 < want_acc < 1
    for micro_batch in (1, 3, 7, 100):
        out = bits_per_byte(model, rows, TBYTES, CPU, micro_batch=micro_batch, accuracy=True)
        assert out["val_loss"] == pytest.approx(want_loss, rel=1e-5)
        assert out["val_bpb"] == pytest.approx(want_bpb, rel=1e-5)
        assert out["val_acc"] == pytest.approx(want_acc, rel=1e-9)
        assert model.training
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    bits_per_byte(model, rows, TBYTES, CPU, micro_batch=4)
    assert not model.training
