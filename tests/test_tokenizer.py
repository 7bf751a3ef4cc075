"""Tests of lmforge.tokenizer and lmforge.tokens: `pytest tests/test_tokenizer.py`.

The corpus is real text read from disk: `tests/fixtures/sources/*.jsonl.gz` when present, else
the Python standard library (code) and its pydoc topics (prose), plus a hand-written
multilingual source. One stage run is shared by most tests (module fixture).
"""

from __future__ import annotations

import gzip
import json
import random
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from lmforge.config import build
from lmforge.digest import sha256_file
from lmforge.errors import ConfigError, InputError, LmforgeError
from lmforge.tokenizer import (
    BOS_ID,
    NAMED_SPECIALS,
    TokenizerConfig,
    _same_as_tokenizers,
    corpus_encoder,
    encoder,
    load,
    load_encoder,
    run,
    save,
    special_id,
    special_tokens,
    train,
)
from lmforge.tokens import Docs, iter_prefix, open_split, read_index, split_files, write_index, write_split

FIXTURE_SOURCES = Path(__file__).resolve().parent / "fixtures" / "sources"
SOURCE_BYTES = 400_000  # per source: enough for ~1k merges, trains in well under a second

MULTILINGUAL = [
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.",
    "Le cœur déçu mais l'âme plutôt naïve, Louÿs rêva de crapaüter en canoë au delà des îles.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "いろはにほへと ちりぬるを わかよたれそ つねならむ",
    "我能吞下玻璃而不伤身体。",
    "다람쥐 헌 쳇바퀴에 타고파",
    "Ξεσκεπάζω τὴν ψυχοφθόρα βδελυγμία.",
    "नमस्ते दुनिया, ३ + ४ = ७",
    "مرحبا بالعالم ١٢٣",
    "Emoji: 👍🏽 👩‍👩‍👧 🇫🇷 ✅ — and a zero-width joiner\u200d here.",
]

# Text that stresses the split regex and the byte-level mapping.
EDGE_CASES = [
    "",
    " ",
    "   leading and trailing   ",
    "tabs\tand\t\ttabs\n\n\nnewlines\r\n\r\nCRLF",
    "1234567890 3.14159 1e-10 0x1F ½ ² ① ٣٤٥ ३४५",
    "def f(x):\n    return x**2  # comment\n\n\n\tif a != b: pass",
    "I'm you're he'll WE'VE they'D it'S 'ſ 'K ’s",
    "<|bos|><|user_start|>hi<|user_end|><|assistant_start|> <|reserved_0|> <|reserved_99|>",
    "\x00\x01\x7f\x80\x9f\xa0\xad\ufeff\ufffd\uffff\U0010ffff\ue000",
    "a\u0301 e\u0308 \u1680\u2000\u2028\u2029\u202f\u205f\u3000\x85\x0b\x0c end",
    "".join(MULTILINGUAL),
    "🤖" * 50 + " " + "x" * 300 + " " + "=" * 80,
]


def _random_unicode(rng: random.Random, n: int) -> list[str]:
    ranges = [(0x20, 0x7E), (0x09, 0x0D), (0xA0, 0x2FF), (0x370, 0x52F), (0x2000, 0x206F),
              (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0xE000, 0xE0FF), (0x1F300, 0x1F6FF)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
        out.append("".join(chars))
    return out


def _cap(texts: list[str]) -> list[str]:
    out, total = [], 0
    for t in texts:
        if total >= SOURCE_BYTES:
            break
        out.append(t)
        total += len(t.encode("utf-8"))
    return out


def _real_sources() -> dict[str, list[str]]:
    files = sorted(FIXTURE_SOURCES.glob("*.jsonl.gz"))
    if files:
        sources = {}
        for f in files:
            with gzip.open(f, "rt", encoding="utf-8") as fh:
                sources[f.name.removesuffix(".jsonl.gz")] = _cap([json.loads(line)["text"] for line in fh])
    else:
        from pydoc_data.topics import topics

        stdlib = Path(sysconfig.get_paths()["stdlib"])
        code = [p.read_text(encoding="utf-8") for p in sorted(stdlib.glob("*.py"))]
        sources = {"code": _cap(code), "prose": _cap([topics[k] for k in sorted(topics)])}
    sources["multilingual"] = MULTILINGUAL * 3
    return sources


def _write_mix(root: Path, sources: dict[str, list[str]], n_shards: int = 2) -> Path:
    """A mix output dir: interleaved docs, every 10th to val, each split in `n_shards` parts."""
    rows = [(f"{name}-{i}", name, text) for name, texts in sources.items() for i, text in enumerate(texts)]
    random.Random(0).shuffle(rows)
    splits = {"train": [r for i, r in enumerate(rows) if i % 10], "val": [r for i, r in enumerate(rows) if not i % 10]}
    for split, part in splits.items():
        (root / split).mkdir(parents=True)
        for k in range(n_shards):
            chunk = part[k::n_shards]
            table = pa.table({c: [r[j] for r in chunk] for j, c in enumerate(("id", "source", "text"))})
            pq.write_table(table, root / split / f"part-{k:05d}.parquet")
    return root


def _split_texts(mix: Path, split: str = "val") -> list[tuple[str, str]]:
    out = []
    for f in split_files(mix, split):
        t = pq.read_table(f)
        out += list(zip(t.column("source").to_pylist(), t.column("text").to_pylist(), strict=True))
    return out


CFG = TokenizerConfig(vocab_size=1024)


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_mix(tmp_path_factory.mktemp("mix"), _real_sources())


@pytest.fixture(scope="module")
def stage(mix: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    out = tmp_path_factory.mktemp("out")
    ctx = SimpleNamespace(timings={})
    metrics = run(CFG, {"mix": mix}, out, ctx=ctx, progress=False)
    return SimpleNamespace(out=out, metrics=metrics, timings=ctx.timings, enc=load_encoder(out / "tokenizer"),
                           hf=load(out / "tokenizer"))


def _hf_ordinary(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    tok.encode_special_tokens = True
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


# --- config ---------------------------------------------------------------------------------

def test_config_rejects_bad_values_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size: .*at least 273"):
        build(TokenizerConfig, {"vocab_size": 272}, "params.yaml: tokenizer")
    with pytest.raises(ConfigError, match=r"tokenizer\.vocab_size: .*at least 289"):
        build(TokenizerConfig, {"vocab_size": 280, "n_special": 32}, "params.yaml: tokenizer")
    with pytest.raises(ConfigError, match=r"n_special: .*between 7"):
        build(TokenizerConfig, {"vocab_size": 1000, "n_special": 3}, "t")
    with pytest.raises(ConfigError, match=r"encode_threads: .*must be 0"):
        build(TokenizerConfig, {"vocab_size": 1000, "encode_threads": -1}, "t")
    with pytest.raises(ConfigError, match=r"train_max_bytes: .*must be a positive"):
        build(TokenizerConfig, {"vocab_size": 1000, "train_max_bytes": 0}, "t")
    with pytest.raises(ConfigError, match=r"t\.vocab_sise: unknown key; allowed keys here: .*vocab_size"):
        build(TokenizerConfig, {"vocab_sise": 1000}, "t")
    with pytest.raises(ConfigError, match=r"vocab_size: required key is missing"):
        build(TokenizerConfig, {}, "t")


def test_shard_dtype_follows_vocab_size() -> None:
    assert TokenizerConfig(vocab_size=65536).shard_dtype == "uint16"
    assert TokenizerConfig(vocab_size=65537).shard_dtype == "uint32"


# --- special tokens -------------------------------------------------------------------------

def test_special_tokens_have_fixed_low_ids(stage: SimpleNamespace) -> None:
    names = special_tokens(16)
    assert names[:7] == ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                         "<|assistant_end|>", "<|system_start|>", "<|system_end|>"]
    assert names[7:] == [f"<|reserved_{i}|>" for i in range(9)]
    assert special_id("bos") == BOS_ID == 0
    assert special_id("assistant_end") == 4
    assert special_id("<|reserved_0|>") == len(NAMED_SPECIALS)
    for i, name in enumerate(names):
        assert stage.hf.token_to_id(name) == i
        assert stage.enc.encode_single_token(name) == i
    with pytest.raises(LmforgeError, match="unknown special token 'tool_start'"):
        special_id("tool_start")
    # The 256 byte tokens come right after the specials, merges after them.
    assert {stage.enc.encode_single_token(bytes([b])) for b in range(256)} == set(range(16, 272))


def test_special_strings_in_plain_text_stay_text(stage: SimpleNamespace) -> None:
    text = EDGE_CASES[7]
    ids = stage.enc.encode_ordinary(text)
    assert min(ids) >= 16
    assert _hf_ordinary(stage.hf, [text])[0] == ids
    assert stage.enc.decode(ids) == text
    # Building a prompt on purpose does produce the specials.
    chat = stage.enc.encode("<|user_start|>hi<|user_end|>", allowed_special="all")
    assert chat[0] == special_id("user_start") and chat[-1] == special_id("user_end")


# --- encoding -------------------------------------------------------------------------------

def test_digits_are_split_one_by_one(stage: SimpleNamespace) -> None:
    ids = stage.enc.encode_ordinary("in 2024 we sold 1234567 units at 99.95")
    pieces = [stage.enc.decode_single_token_bytes(i) for i in ids]
    with_digits = [p for p in pieces if any(c in b"0123456789" for c in p)]
    assert with_digits == [bytes([c]) for c in b"2024" b"1234567" b"99" b"95"]
    # No token anywhere in the vocabulary holds two digits, or a digit plus anything else.
    for rank in range(16, stage.enc.n_vocab):
        token = stage.enc.decode_single_token_bytes(rank)
        if any(c in b"0123456789" for c in token):
            assert len(token) == 1, token


def test_tiktoken_ids_equal_tokenizers_ids(stage: SimpleNamespace, mix: Path) -> None:
    texts = [t for split in ("train", "val") for _, t in _split_texts(mix, split)] + EDGE_CASES + MULTILINGUAL
    texts += _random_unicode(random.Random(1), 2000)
    ours = stage.enc.encode_ordinary_batch(texts, num_threads=2)
    assert ours == _hf_ordinary(stage.hf, texts)
    assert sum(map(len, ours)) > 100_000  # the comparison covered a real amount of text


@pytest.mark.parametrize("threads", [1, 2])
def test_corpus_encoder_equals_encode_ordinary(stage: SimpleNamespace, threads: int) -> None:
    texts = EDGE_CASES + MULTILINGUAL
    with corpus_encoder(stage.enc, threads) as encode:
        arrays = encode(texts)
    assert [a.tolist() for a in arrays] == stage.enc.encode_ordinary_batch(texts)
    assert all(a.dtype == np.uint32 for a in arrays)


def test_stage_check_catches_diverging_ids(stage: SimpleNamespace) -> None:
    check = _same_as_tokenizers(stage.hf)
    text = "hello <|bos|> world 42"
    docs = Docs(ids=["doc-7"], sources=["s"], texts=[text], nbytes=np.array([len(text)]))
    good = stage.enc.encode_ordinary(text)
    check(docs, [np.array(good, dtype=np.uint32)])
    with pytest.raises(LmforgeError, match=r"document 'doc-7': tiktoken and tokenizers disagree from token 2"):
        check(docs, [good[:2] + [good[2] + 1] + good[3:]])


@pytest.mark.parametrize("text", EDGE_CASES + MULTILINGUAL)
def test_round_trip(stage: SimpleNamespace, text: str) -> None:
    ids = stage.enc.encode_ordinary(text)
    assert stage.enc.decode(ids) == text
    assert stage.hf.decode(ids) == text
    # Tokens may split a character; their bytes still concatenate to the text's UTF-8.
    assert b"".join(stage.enc.decode_single_token_bytes(i) for i in ids) == text.encode("utf-8")


def test_round_trip_random_unicode(stage: SimpleNamespace) -> None:
    texts = _random_unicode(random.Random(2), 1000)
    for text, ids in zip(texts, stage.enc.encode_ordinary_batch(texts), strict=True):
        assert stage.enc.decode(ids) == text


def test_transformers_loads_and_matches(stage: SimpleNamespace) -> None:
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    directory = stage.out / "tokenizer"
    for cls in (PreTrainedTokenizerFast, AutoTokenizer):
        hf = cls.from_pretrained(directory)
        assert hf.bos_token == "<|bos|>" and hf.bos_token_id == BOS_ID
        assert hf.model_max_length == CFG.model_max_length
        assert hf.convert_tokens_to_ids(special_tokens(16)) == list(range(16))
        assert len(hf) == stage.metrics["vocab_size"]
        for text in EDGE_CASES + MULTILINGUAL:
            ids = hf(text, split_special_tokens=True)["input_ids"]
            # A transformers encoding is exactly a document as laid out in the shards.
            assert ids == [BOS_ID] + stage.enc.encode_ordinary(text)
            assert hf.decode(ids, skip_special_tokens=True) == text
    # Without split_special_tokens, prompts built from special strings get the special ids.
    assert hf("<|user_start|>", add_special_tokens=False)["input_ids"] == [special_id("user_start")]


def test_n_special_reserves_more_ids(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    cfg = TokenizerConfig(vocab_size=400, n_special=24)
    tok = train(MULTILINGUAL * 5 + EDGE_CASES, cfg)
    save(tok, tmp_path / "tok", model_max_length=64)
    hf = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert hf.convert_tokens_to_ids(["<|bos|>", "<|reserved_0|>", "<|reserved_16|>"]) == [0, 7, 23]
    assert hf.model_max_length == 64
    enc = load_encoder(tmp_path / "tok")
    assert {enc.encode_single_token(bytes([b])) for b in range(256)} == set(range(24, 280))
    assert enc.encode_ordinary("<|reserved_16|>") == _hf_ordinary(tok, ["<|reserved_16|>"])[0]


def test_load_encoder_rejects_foreign_tokenizers(stage: SimpleNamespace, tmp_path: Path) -> None:
    spec = json.loads((stage.out / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    spec["normalizer"] = {"type": "NFC"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(InputError, match=r"tokenizer\.json: it has a normalizer.*fix:"):
        load_encoder(tmp_path)
    spec["normalizer"] = None
    spec["model"]["ignore_merges"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    with pytest.raises(InputError, match=r"ignore_merges is off"):
        load_encoder(tmp_path)
    with pytest.raises(InputError, match=r"nowhere/tokenizer\.json: not found"):
        load_encoder(tmp_path / "nowhere")


# --- shards ---------------------------------------------------------------------------------

def test_shard_format(stage: SimpleNamespace, mix: Path) -> None:
    index = read_index(stage.out / "tokens")
    assert index["dtype"] == "uint16" and index["bos_id"] == BOS_ID
    assert index["vocab_size"] == stage.metrics["vocab_size"] == CFG.vocab_size
    val_docs = _split_texts(mix)
    for split in ("train", "val"):
        s = open_split(stage.out / "tokens", split)
        meta = index["splits"][split]
        assert s.tokens.dtype == np.dtype("<u2")
        assert (stage.out / "tokens" / f"{split}.bin").stat().st_size == 2 * meta["n_tokens"]
        assert len(s.tokens) == meta["n_tokens"] == int(np.diff(s.offsets).sum())
        # Plain text never yields BOS, so BOS count == documents, each at its offset.
        assert int((s.tokens == BOS_ID).sum()) == meta["n_docs"] == len(s.offsets) - 1
        assert (s.tokens[s.offsets[:-1]] == BOS_ID).all()
        assert meta["n_text_tokens"] == sum(r["text_tokens"] for r in meta["by_source"].values())
        assert meta["n_bytes"] == sum(r["bytes"] for r in meta["by_source"].values())
        assert stage.metrics[f"{split}_tokens"] == meta["n_tokens"]
        assert stage.metrics[f"{split}_docs"] == meta["n_docs"]
    val = open_split(stage.out / "tokens", "val")
    for i, (_, text) in enumerate(val_docs):
        assert val.doc(i)[1:].tolist() == stage.enc.encode_ordinary(text)
    by_source = index["splits"]["val"]["by_source"]
    assert set(by_source) == {src for src, _ in val_docs}
    for src, row in by_source.items():
        assert row["bytes"] == sum(len(t.encode("utf-8")) for s, t in val_docs if s == src)
        assert stage.metrics["bytes_per_token_by_source"][src] == round(row["bytes"] / row["text_tokens"], 6)
    total = index["splits"]["val"]
    assert stage.metrics["bytes_per_token"] == round(total["n_bytes"] / total["n_text_tokens"], 6)
    assert 1.5 < stage.metrics["bytes_per_token"] < 8
    json.dumps(stage.metrics)  # JSON-serialisable
    assert stage.timings["encode_train_tokens_per_s"] > 0


def test_uint32_shards_round_trip(mix: Path, tmp_path: Path) -> None:
    files = split_files(mix, "val")

    def encode(texts: list[str]) -> list[list[int]]:
        return [[70_000 + len(t) % 7, 1] for t in texts]

    stats = write_split(files, tmp_path, "val", encode=encode, bos_id=0, dtype="uint32")
    write_index(tmp_path, dtype="uint32", vocab_size=80_000, bos_id=0, splits={"val": stats})
    s = open_split(tmp_path, "val")
    assert s.tokens.dtype == np.dtype("<u4") and len(s.tokens) == 3 * stats.n_docs
    assert s.doc(0).tolist()[0] == 0 and s.doc(0).tolist()[1] >= 70_000


def test_open_split_rejects_truncated_shard(stage: SimpleNamespace, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for f in (stage.out / "tokens").iterdir():
        (tokens / f.name).write_bytes(f.read_bytes())
    with open(tokens / "val.bin", "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(InputError, match=r"val\.bin: missing or not \d+ tokens"):
        open_split(tokens, "val")


# --- determinism ----------------------------------------------------------------------------

def test_outputs_are_byte_identical_across_runs(stage: SimpleNamespace, mix: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # A second run with tokenizers' thread pool on (the fixture ran with it off, see conftest).
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    again = run(CFG.model_copy(update={"encode_threads": 1}), {"mix": mix}, tmp_path, progress=False)
    assert again == stage.metrics
    files = ["tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokens/train.bin", "tokens/val.bin",
             "tokens/train.idx.npy", "tokens/val.idx.npy", "tokens/index.json"]
    for rel in files:
        assert sha256_file(tmp_path / rel) == sha256_file(stage.out / rel), rel
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer", "tokens"]  # no temp leftovers


def test_train_max_bytes_takes_an_exact_prefix(mix: Path) -> None:
    files = split_files(mix, "train")
    full = "".join(t for batch in iter_prefix(files, None) for t in batch)
    for cap in (1, 1000, 123_457):
        got = "".join(t for batch in iter_prefix(files, cap) for t in batch)
        assert len(got.encode("utf-8")) <= cap and len(got.encode("utf-8")) > cap - 4  # a cut char is dropped
        # Concatenated, the docs taken are a prefix of the split (the last one possibly cut).
        assert full.startswith(got)


def test_train_max_bytes_caps_training(mix: Path, tmp_path: Path) -> None:
    metrics = run(CFG.model_copy(update={"train_max_bytes": 200_000}), {"mix": mix}, tmp_path, progress=False)
    assert 199_996 < metrics["tokenizer_train_bytes"] <= 200_000
    assert metrics["val_docs"] > 0


# --- errors and atomicity -------------------------------------------------------------------

def test_input_errors_name_the_file(mix: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        run(CFG, {"mix": tmp_path / "missing"}, tmp_path / "out")
    with pytest.raises(LmforgeError, match="inputs has no 'mix'"):
        run(CFG, {}, tmp_path / "out")
    (tmp_path / "m" / "train").mkdir(parents=True)
    with pytest.raises(InputError, match=r"m/train: no part-\*\.parquet shards"):
        run(CFG, {"mix": tmp_path / "m"}, tmp_path / "out")
    bad = tmp_path / "bad"
    _write_mix(bad, {"a": ["x" * 10] * 20})
    pq.write_table(pa.table({"id": ["1"], "text": ["t"]}), bad / "train" / "part-00000.parquet")
    with pytest.raises(InputError, match=r"train/part-00000\.parquet: column 'source' is missing"):
        run(CFG, {"mix": bad}, tmp_path / "out")
    pq.write_table(pa.table({"id": ["1", "2"], "source": ["a", "a"], "text": ["t", None]}),
                   bad / "train" / "part-00000.parquet")
    with pytest.raises(InputError, match=r"part-00000\.parquet: column 'text' is null in row 1"):
        run(CFG, {"mix": bad}, tmp_path / "out")
    empty = _write_mix(tmp_path / "empty", {"a": [""] * 20})
    with pytest.raises(InputError, match=r"empty/train: the train split holds no text"):
        run(CFG, {"mix": empty}, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # failed runs leave nothing behind


def test_failed_run_keeps_previous_outputs(mix: Path, tmp_path: Path) -> None:
    sources = _real_sources()
    small = _write_mix(tmp_path / "mix", {name: texts[:5] for name, texts in sources.items()})
    out = tmp_path / "out"
    run(CFG, {"mix": small}, out, progress=False)
    before = {p: sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}
    val = sorted((small / "val").glob("*.parquet"))[-1]
    pq.write_table(pa.table({"id": ["1"], "source": ["a"], "text": [None]}, schema=pa.schema(
        [("id", pa.string()), ("source", pa.string()), ("text", pa.string())])), val)
    with pytest.raises(InputError, match="null"):
        run(CFG, {"mix": small}, out, progress=False)
    assert {p: sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_train_is_thread_count_independent(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [t for texts in _real_sources().values() for t in texts]
    cfg = TokenizerConfig(vocab_size=600)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    sequential = train(texts, cfg).to_str()
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    parallel = train(iter(texts), cfg)
    assert parallel.to_str() == sequential
    assert parallel.get_vocab_size() == 600
    assert encoder(parallel).n_vocab == 600
