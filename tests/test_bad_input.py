"""Bad input everywhere: one test per row of docs/bad-input.md that no other test covers.

Each case writes one bad file into a temporary directory and calls the library's own loader on
it, as the stage or CLI would; the error must be lmforge's (never a raw traceback) and its
message must name the file, the line or key, and the fix. Parameter ids are the table's row
ids, and `test_table_and_tests_agree` checks the table against the tests both ways, so neither
can drift from the other.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from lmforge import cli, inputs
from lmforge.audit import AuditLog
from lmforge.chat import ChatError
from lmforge.config import load_section
from lmforge.data.chats import ChatSet
from lmforge.data.chats import build as build_chats
from lmforge.data.mix import MixConfig
from lmforge.data.sources import read_source
from lmforge.digest import sha256_bytes
from lmforge.errors import ConfigError, InputError
from lmforge.forge import facts
from lmforge.forge.delta import weights_sha256
from lmforge.forge.registry import Registry
from lmforge.rl.pairs import PairError, read_pairs
from lmforge.tokenizer import load_encoder
from lmforge.train import checkpoint
from lmforge.weights import load_model, save_model
from tests.data.test_sources import src
from tests.forge.helpers import REAL, random_delta, tiny
from tests.forge.test_registry import KEY, _fields
from tests.test_audit import stage_body
from tests.test_rl import GOOD_PAIR
from tests.test_sft import GOOD
from tests.train.test_checkpoint import fresh, trained

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-input.md"
FIXTURES = ROOT / "tests" / "fixtures" / "sources"


@dataclass(frozen=True)
class Bad:
    """A bad input, ready to load: `load` reads it the way lmforge does; the error it raises must
    be of type `error` and hold every one of `needles` (file with line or key, problem, fix)."""

    load: Callable[[], object]
    error: type[Exception]
    needles: tuple[str, ...]


Case = Callable[[Path], Bad]
ROWS: dict[str, str] = {}  # row id -> the test function that proves it


def rows(cases: dict[str, Case]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Parametrize a test over `cases`, with the table's row ids as the parameter ids."""
    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        for rid in cases:
            assert rid not in ROWS, f"row {rid} has two tests"
            ROWS[rid] = fn.__name__
        return pytest.mark.parametrize("case", list(cases.values()), ids=list(cases))(fn)
    return wrap


def expect(bad: Bad) -> str:
    with pytest.raises(bad.error) as e:
        bad.load()
    msg = str(e.value)
    for needle in bad.needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    assert "(fix: " in msg, f"no fix in {msg!r}"
    return msg


def sparse(path: Path, size: int) -> Path:
    """A file of `size` bytes that takes no disk: size limits are checked before reading."""
    with path.open("wb") as fh:
        fh.truncate(size)
    return path


def huge_line(prefix: bytes = b'{"text": "') -> bytes:
    """One jsonl record a byte over the line limit."""
    return prefix + b"a" * inputs.MAX_JSONL_LINE_BYTES + b'"}\n'


LINE_LIMIT = f"line is longer than the {inputs.size_text(inputs.MAX_JSONL_LINE_BYTES)} limit for one record"
JSON_LIMIT = f"over the {inputs.size_text(inputs.MAX_JSON_BYTES)} limit for a JSON file"


# --- source corpora: data/sources/*.jsonl.gz, read by the mix stage -------------------------------

def _sources(tmp: Path) -> Path:
    """A copy of the fixture corpus kjv.jsonl.gz with the manifest.json that lists its digest."""
    d = tmp / "sources"
    d.mkdir()
    for name in ("kjv.jsonl.gz", "manifest.json"):
        shutil.copy(FIXTURES / name, d / name)
    return d


def _read(path: Path) -> Callable[[], object]:
    return lambda: read_source(src(path=str(path)))


def corpus_huge(tmp: Path) -> Bad:
    f = tmp / "big.jsonl.gz"
    f.write_bytes(gzip.compress(b'{"text": "ok"}\n' + huge_line(), compresslevel=1))
    return Bad(_read(f), InputError, (f"{f}:2: {LINE_LIMIT}", "fix: split the record"))


def corpus_truncated(tmp: Path) -> Bad:
    f = _sources(tmp) / "kjv.jsonl.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # an interrupted download
    (f.parent / "manifest.json").unlink()  # (with the manifest the digest check would catch it first)
    return Bad(_read(f), InputError, (f"{f}: cannot read: Compressed file ended", "fix: the file is damaged"))


def corpus_wrong_hash(tmp: Path) -> Bad:
    f = _sources(tmp) / "kjv.jsonl.gz"
    text = gzip.decompress(f.read_bytes()) + b'{"id": "extra", "text": "a record added behind the manifest"}\n'
    f.write_bytes(gzip.compress(text, mtime=0))
    return Bad(_read(f), InputError, (f"{f}: SHA-256 ", f"does not match {f.parent / 'manifest.json'}'s",
                                      "fix: restore the file"))


@rows({"corpus-huge": corpus_huge, "corpus-truncated": corpus_truncated, "corpus-wrong-hash": corpus_wrong_hash})
def test_source_corpus(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- data/sources/manifest.json: the corpora's digests, checked by the mix, quoted by the card ---

def _manifest_case(write: Callable[[Path], None], problem: str) -> Case:
    """`problem` follows the file name in the message: ":<line>: ..." or ": ..." (then a key)."""
    def case(tmp: Path) -> Bad:
        d = _sources(tmp)
        write(d / "manifest.json")
        return Bad(_read(d / "kjv.jsonl.gz"), InputError,
                   (f"{d / 'manifest.json'}{problem}", "fix: rebuild the sources and their manifest"))
    return case


def _edit_json(edit: Callable[[dict[str, Any]], None],
               at: Callable[[dict[str, Any]], dict[str, Any]] = lambda m: m) -> Callable[[Path], None]:
    """A case that rewrites a JSON file with `edit` applied to the object `at` selects."""
    def write(path: Path) -> None:
        m = json.loads(path.read_text())
        edit(at(m))
        path.write_text(json.dumps(m))
    return write


def _edit_kjv(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return _edit_json(edit, lambda m: m["sources"]["kjv"])


MANIFEST = {
    "manifest-malformed": _manifest_case(lambda p: p.write_text('{"sources": {"kjv": }'),
                                         ":1: invalid JSON: Expecting value at column 21"),
    "manifest-wrong-type": _manifest_case(_edit_kjv(lambda e: e.update(sha256=12)),
                                          ": key 'sources.kjv.sha256' must be 64 lowercase hex digits, got 12"),
    "manifest-missing-field": _manifest_case(_edit_kjv(lambda e: e.pop("sha256")),
                                             ": key 'sources.kjv.sha256' is missing"),
    "manifest-empty": _manifest_case(lambda p: p.write_bytes(b""), ": is empty"),
    "manifest-huge": _manifest_case(lambda p: sparse(p, inputs.MAX_JSON_BYTES + 1),
                                    f": is {inputs.MAX_JSON_BYTES + 1:,} bytes, {JSON_LIMIT}"),
    "manifest-non-utf8": _manifest_case(lambda p: p.write_bytes(b'{\n"built_by": "caf\xe9"}'),
                                        ":2: not UTF-8 (invalid continuation byte at byte 18)"),
}


@rows(MANIFEST)
def test_sources_manifest(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


def test_a_file_the_manifest_does_not_list_is_read_unchecked(tmp_path: Path) -> None:
    """The digest check is for the files the manifest lists: a user's own file beside them is
    read as it is, and an intact listed file passes."""
    d = _sources(tmp_path)
    (d / "mine.jsonl").write_text('{"text": "my own document"}\n')
    assert [x.text for x in read_source(src(path=str(d / "mine.jsonl")))] == ["my own document"]
    assert len(read_source(src(path=str(d / "kjv.jsonl.gz")))) == json.loads(
        (d / "manifest.json").read_text())["sources"]["kjv"]["records"]


# --- params.yaml: every stage's section, read by lmforge.config (the stage wrapper, `lmforge forge`) ---

def _params(tmp: Path, content: bytes) -> Path:
    p = tmp / "params.yaml"
    p.write_bytes(content)
    return p


def _mix_section(p: Path) -> Callable[[], object]:
    return lambda: load_section(p, "mix", MixConfig)


def params_missing_field(tmp: Path) -> Bad:
    return Bad(_mix_section(_params(tmp, b"mix:\n  seed: 1\n")), ConfigError,
               ("params.yaml: mix.sources: required key is missing", "(fix: add 'sources:')"))


def params_empty(tmp: Path) -> Bad:
    p = _params(tmp, b"")
    return Bad(_mix_section(p), ConfigError, (f"{p}: section 'mix' is missing", "(fix: add a 'mix:' block)"))


def params_huge(tmp: Path) -> Bad:
    p = sparse(tmp / "params.yaml", inputs.MAX_YAML_BYTES + 1)
    return Bad(_mix_section(p), ConfigError,
               (f"{p}: is {inputs.MAX_YAML_BYTES + 1:,} bytes, over the 4 MiB limit for a YAML file",
                "(fix: point at the params file"))


def params_non_utf8(tmp: Path) -> Bad:
    p = _params(tmp, b"mix:\n  seed: 1\n  # caf\xe9\n")
    return Bad(_mix_section(p), ConfigError,
               (f"{p}:3: not UTF-8 text (invalid continuation byte at byte 22)", "(fix: re-encode the file as UTF-8)"))


def params_not_a_mapping(tmp: Path) -> Bad:
    p = _params(tmp, b"mix: 5\n")
    return Bad(_mix_section(p), ConfigError,
               ("params.yaml: mix: expected a mapping of keys, got int", "(fix: write the section as indented"))


@rows({"params-missing-field": params_missing_field, "params-empty": params_empty, "params-huge": params_huge,
       "params-non-utf8": params_non_utf8, "params-not-a-mapping": params_not_a_mapping})
def test_params(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- conversation files for SFT: sft.data.sets[] of kind jsonl ---------------------------------------

def _chats(tmp: Path, content: bytes) -> tuple[Path, Callable[[], object]]:
    f = tmp / "mine.jsonl"
    f.write_bytes(json.dumps(GOOD).encode() + b"\n" + content)
    return f, lambda: build_chats([ChatSet(name="mine", kind="jsonl", path=str(f))], 0)


def chats_malformed(tmp: Path) -> Bad:
    f, load = _chats(tmp, b'{"messages": [{"role": "user", "content": "Hi?"}\n')
    return Bad(load, InputError, (f"{f}:2: malformed JSON: Expecting ',' delimiter at column 49",
                                  "(fix: one JSON object per line)"))


def chats_empty(tmp: Path) -> Bad:
    f, load = _chats(tmp, b"")
    f.write_bytes(b"\n")
    return Bad(load, InputError, (f"{f}: no conversations", "(fix: add lines, or remove the set)"))


def chats_huge(tmp: Path) -> Bad:
    f, load = _chats(tmp, huge_line(b'{"messages": [{"role": "user", "content": "'))
    return Bad(load, InputError, (f"{f}:2: {LINE_LIMIT}", "(fix: split the record"))


def chats_non_utf8(tmp: Path) -> Bad:
    f, load = _chats(tmp, b'{"messages": [{"role": "user", "content": "caf\xe9?"}]}\n')
    return Bad(load, InputError, (f"{f}:2: not UTF-8 (invalid continuation byte at byte 46 of the line)",
                                  "(fix: re-encode the file as UTF-8)"))


def chats_lone_surrogate(tmp: Path) -> Bad:
    f, load = _chats(tmp, b'{"messages": [{"role": "user", "content": "Hi \\ud800?"}, '
                          b'{"role": "assistant", "content": "Hello."}]}\n')
    return Bad(load, ChatError, (f"{f}:2: message 0 (user) is not valid Unicode (lone surrogate '\\ud800' at "
                                 "character 3)", "(fix: fix the \\u escape in the file)"))


@rows({"chats-malformed": chats_malformed, "chats-empty": chats_empty, "chats-huge": chats_huge,
       "chats-non-utf8": chats_non_utf8, "chats-lone-surrogate": chats_lone_surrogate})
def test_sft_conversations(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- preference files for DPO: rl.dpo.files ------------------------------------------------------------

def _pairs(tmp: Path, content: bytes) -> tuple[Path, Callable[[], object]]:
    f = tmp / "prefs.jsonl"
    f.write_bytes(json.dumps(GOOD_PAIR).encode() + b"\n" + content)
    return f, lambda: read_pairs(f)


def pairs_malformed(tmp: Path) -> Bad:
    f, load = _pairs(tmp, b'{"messages": [], "chosen": "a" "rejected": "b"}\n')
    return Bad(load, InputError, (f"{f}:2: malformed JSON: Expecting ',' delimiter at column 32",
                                  "(fix: one JSON object per line)"))


def pairs_empty(tmp: Path) -> Bad:
    f, load = _pairs(tmp, b"")
    f.write_bytes(b"")
    return Bad(load, InputError, (f"{f}: no preference pairs", "(fix: add lines, or remove the file from rl.dpo.files)"))


def pairs_empty_reply(tmp: Path) -> Bad:
    f, load = _pairs(tmp, json.dumps({**GOOD_PAIR, "rejected": "  "}).encode() + b"\n")
    return Bad(load, PairError, (f"pair {f}:2: an empty reply", "(fix: give both replies text)"))


def pairs_huge(tmp: Path) -> Bad:
    f, load = _pairs(tmp, huge_line(b'{"chosen": "'))
    return Bad(load, InputError, (f"{f}:2: {LINE_LIMIT}", "(fix: split the record"))


def pairs_non_utf8(tmp: Path) -> Bad:
    f, load = _pairs(tmp, b'{"messages": [{"role": "user", "content": "x"}], "chosen": "\xff", "rejected": "b"}\n')
    return Bad(load, InputError, (f"{f}:2: not UTF-8 (invalid start byte at byte 60 of the line)",
                                  "(fix: re-encode the file as UTF-8)"))


def pairs_prompt_ends_with_assistant(tmp: Path) -> Bad:
    turns = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    f, load = _pairs(tmp, json.dumps({**GOOD_PAIR, "messages": turns}).encode() + b"\n")
    return Bad(load, InputError, (f"{f}:2: the prompt must end with a user turn",
                                  "(fix: end 'messages' with the user turn"))


@rows({"pairs-malformed": pairs_malformed, "pairs-empty": pairs_empty, "pairs-empty-reply": pairs_empty_reply,
       "pairs-huge": pairs_huge, "pairs-non-utf8": pairs_non_utf8,
       "pairs-prompt-ends-with-assistant": pairs_prompt_ends_with_assistant})
def test_preference_pairs(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- facts for forge: forge.facts.real (data/sources/facts.jsonl.gz), `lmforge forge add --facts` ------

def _facts(tmp: Path, content: bytes) -> tuple[Path, Callable[[], object]]:
    f = tmp / "facts.jsonl"
    f.write_bytes(b'{"subject": "Yon", "relation": "capital", "object": "Ur"}\n' + content)
    return f, lambda: facts.load(f)


def facts_huge(tmp: Path) -> Bad:
    f, load = _facts(tmp, huge_line(b'{"subject": "'))
    return Bad(load, InputError, (f"{f}:2: {LINE_LIMIT}", "(fix: split the record"))


def facts_non_utf8(tmp: Path) -> Bad:
    f, load = _facts(tmp, b'{"subject": "Z\xfcrich", "relation": "capital", "object": "Bern"}\n')
    return Bad(load, InputError, (f"{f}:2: not UTF-8 (invalid start byte at byte 14 of the line)",
                                  "(fix: re-encode the file as UTF-8)"))


def facts_templates_wrong_type(tmp: Path) -> Bad:
    f, load = _facts(tmp, b'{"subject": "Zed", "relation": "owns", "object": "cat", "templates": "{s} owns a"}\n')
    return Bad(load, InputError, (f"{f}:2: 'templates' must be a list of strings, got str",
                                  '(fix: write "templates": ["... {s} ..."])'))


def _shipped_facts(tmp: Path) -> Path:
    """A copy of data/sources/facts.jsonl.gz with the facts.json that gives its digest."""
    for name in (REAL.name, facts.MANIFEST):
        shutil.copy(REAL.parent / name, tmp / name)
    return tmp / REAL.name


def facts_wrong_hash(tmp: Path) -> Bad:
    f = _shipped_facts(tmp)
    text = gzip.decompress(f.read_bytes()) + b'{"subject": "Yon", "relation": "capital", "object": "Ur"}\n'
    f.write_bytes(gzip.compress(text, mtime=0))  # a fact added behind facts.json's back
    return Bad(lambda: facts.load(f), InputError,
               (f"{f}: SHA-256 ", f"does not match {tmp / 'facts.json'}'s", "the file was changed or damaged after "
                "facts.json was written", "(fix: restore the file (git checkout / dvc checkout), or rebuild the facts"))


@rows({"facts-huge": facts_huge, "facts-non-utf8": facts_non_utf8,
       "facts-templates-wrong-type": facts_templates_wrong_type, "facts-wrong-hash": facts_wrong_hash})
def test_facts(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- data/sources/facts.json: the facts file's digest, checked by forge, quoted by the card ----------

def _facts_manifest_case(write: Callable[[Path], None], problem: str) -> Case:
    """`problem` follows the file name in the message: ":<line>: ..." or ": ..." (then a key)."""
    def case(tmp: Path) -> Bad:
        f = _shipped_facts(tmp)
        write(tmp / "facts.json")
        return Bad(lambda: facts.load(f), InputError,
                   (f"{tmp / 'facts.json'}{problem}", "(fix: rebuild the facts and their manifest"))
    return case


FACTS_MANIFEST = {
    "factsjson-malformed": _facts_manifest_case(lambda p: p.write_text('{"file": "facts.jsonl.gz",\n "sha256": }'),
                                                ":2: invalid JSON: Expecting value at column 12"),
    "factsjson-wrong-type": _facts_manifest_case(_edit_json(lambda m: m.update(sha256=12)),
                                                 ": key 'sha256' must be 64 lowercase hex digits, got 12"),
    "factsjson-missing-field": _facts_manifest_case(_edit_json(lambda m: m.pop("sha256")),
                                                    ": key 'sha256' is missing"),
    "factsjson-empty": _facts_manifest_case(lambda p: p.write_bytes(b""), ": is empty"),
    "factsjson-huge": _facts_manifest_case(lambda p: sparse(p, inputs.MAX_JSON_BYTES + 1),
                                           f": is {inputs.MAX_JSON_BYTES + 1:,} bytes, {JSON_LIMIT}"),
    "factsjson-non-utf8": _facts_manifest_case(lambda p: p.write_bytes(b'{\n"built_by": "caf\xe9"}'),
                                               ":2: not UTF-8 (invalid continuation byte at byte 18)"),
}


@rows(FACTS_MANIFEST)
def test_facts_manifest(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- training checkpoints: .lmforge/scratch/<stage>/<key>/ --------------------------------------------

def _checkpoint(tmp: Path) -> Path:
    model, opts = trained()
    return checkpoint.save(tmp / "scratch", 3, model, opts, {"data": {"row": 1}})


def _load_checkpoint(root: Path) -> Callable[[], object]:
    def load() -> object:
        ckpt = checkpoint.latest(root)
        assert ckpt is not None
        return checkpoint.load(ckpt, *fresh())
    return load


def checkpoint_wrong_type(tmp: Path) -> Bad:
    root = _checkpoint(tmp).parent
    (root / "latest.json").write_text(json.dumps({"checkpoint": "../../elsewhere", "step": 3}))
    return Bad(_load_checkpoint(root), InputError,
               (f"{root / 'latest.json'}: key 'checkpoint' must name a step-NNNNNNNN directory, got '../../elsewhere'",
                f"(fix: delete {root} to start the stage from scratch)"))


def checkpoint_manifest_wrong_type(tmp: Path) -> Bad:
    ckpt = _checkpoint(tmp)
    (ckpt / "manifest.json").write_text(json.dumps(["model.safetensors"]))
    return Bad(_load_checkpoint(ckpt.parent), InputError,
               (f"{ckpt / 'manifest.json'}: expected a JSON object, got list", f"(fix: delete {ckpt.parent}"))


def checkpoint_empty(tmp: Path) -> Bad:
    root = _checkpoint(tmp).parent
    (root / "latest.json").write_bytes(b"")
    return Bad(_load_checkpoint(root), InputError, (f"{root / 'latest.json'}: is empty", f"(fix: delete {root}"))


def checkpoint_huge(tmp: Path) -> Bad:
    root = _checkpoint(tmp).parent
    sparse(root / "latest.json", inputs.MAX_JSON_BYTES + 1)
    return Bad(_load_checkpoint(root), InputError, (f"{root / 'latest.json'}: is ", JSON_LIMIT, f"(fix: delete {root}"))


def checkpoint_non_utf8(tmp: Path) -> Bad:
    ckpt = _checkpoint(tmp)
    (ckpt / "manifest.json").write_bytes(b'{\n  "model.safetensors": "\xff"\n}\n')
    return Bad(_load_checkpoint(ckpt.parent), InputError,
               (f"{ckpt / 'manifest.json'}:2: not UTF-8 (invalid start byte at byte 26)", f"(fix: delete {ckpt.parent}"))


@rows({"checkpoint-wrong-type": checkpoint_wrong_type, "checkpoint-manifest-wrong-type": checkpoint_manifest_wrong_type,
       "checkpoint-empty": checkpoint_empty, "checkpoint-huge": checkpoint_huge,
       "checkpoint-non-utf8": checkpoint_non_utf8})
def test_checkpoint(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- model weights: a model directory (data/<stage>/model: config.json + model.safetensors) ------------

RERUN = "(fix: re-run the stage that wrote the model (dvc repro))"


def _model_dir(tmp: Path, *, tokenizer: bool = False) -> Path:
    tok = None
    if tokenizer:
        tok = tmp / "tok"
        tok.mkdir()
        (tok / "tokenizer.json").write_text("{}")
    save_model(tiny(64), tmp / "model", tokenizer_dir=tok)
    return tmp / "model"


def _edit_config(model: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    meta = json.loads((model / "config.json").read_text())
    edit(meta)
    (model / "config.json").write_text(json.dumps(meta))
    return model / "config.json"


def _set_weights(model: Path, data: bytes) -> Path:
    """Replace model.safetensors and record its digest, as a stage would have written it."""
    (model / "model.safetensors").write_bytes(data)
    _edit_config(model, lambda m: m["files"].update({"model.safetensors": sha256_bytes(data)}))
    return model / "model.safetensors"


def _tensors(model: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    state = {k: v.clone() for k, v in load_file(str(model / "model.safetensors")).items()}
    edit(state)
    return save_safetensors(state)


def weights_malformed(tmp: Path) -> Bad:
    model = _model_dir(tmp)
    (model / "config.json").write_text('{"format": "lmforge-model",\n "model": {,}}')
    return Bad(lambda: load_model(model), InputError,
               (f"{model / 'config.json'}:2: invalid JSON: Expecting property name enclosed in double quotes", RERUN))


def weights_wrong_type(tmp: Path) -> Bad:
    model = _model_dir(tmp)
    cfg = _edit_config(model, lambda m: m["model"].update(n_layer="two"))
    return Bad(lambda: load_model(model), InputError,
               (f"{cfg}: invalid model shape: model.n_layer: Input should be a valid integer (got 'two')", RERUN))


def weights_missing_field(tmp: Path) -> Bad:
    model = _model_dir(tmp)
    cfg = _edit_config(model, lambda m: m.pop("model"))
    return Bad(lambda: load_model(model), InputError, (f"{cfg}: key 'model' is missing", RERUN))


def weights_wrong_shape(tmp: Path) -> Bad:
    model = _model_dir(tmp)
    f = _set_weights(model, _tensors(model, lambda s: s.update({"model.norm.weight": torch.ones(5)})))
    return Bad(lambda: load_model(model), InputError,
               (f"{f}: tensor model.norm.weight has shape (5,), config.json's model shape gives (32,)", RERUN))


def weights_wrong_dtype(tmp: Path) -> Bad:
    model = _model_dir(tmp)
    f = _set_weights(model, _tensors(model, lambda s: s.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)})))
    return Bad(lambda: load_model(model), InputError,
               (f"{f}: tensor model.norm.weight has dtype torch.int32, expected a floating-point dtype", RERUN))


def weights_empty(tmp: Path) -> Bad:
    model = _model_dir(tmp)
    f = _set_weights(model, b"")
    return Bad(lambda: load_model(model), InputError,
               (f"{f}: not a readable safetensors file (Error while deserializing header: header too small)",
                "(fix: re-run the stage that wrote it)"))


def weights_huge(tmp: Path) -> Bad:
    model = _model_dir(tmp)
    f = _set_weights(model, (1 << 62).to_bytes(8, "little") + b"{}")  # a header "length" of 4 EiB
    return Bad(lambda: load_model(model), InputError,
               (f"{f}: not a readable safetensors file (Error while deserializing header: header too large)",
                "(fix: re-run the stage that wrote it)"))


def weights_non_utf8(tmp: Path) -> Bad:
    model = _model_dir(tmp)
    (model / "config.json").write_bytes(b'{"format": "lmforge-m\xf6del"}')
    return Bad(lambda: load_model(model), InputError,
               (f"{model / 'config.json'}:1: not UTF-8 (invalid start byte at byte 21)", RERUN))


def weights_hf_wrong_type(tmp: Path) -> Bad:
    from lmforge.export.hf import load_any

    hf = tmp / "hf"  # a Hugging Face export (data/export/hf), as `lmforge serve` and `generate` read it
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 64, "num_hidden_layers": "2", "hidden_size": 32,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}))
    return Bad(lambda: load_any(hf), InputError,
               (f"{hf / 'config.json'}: not a model shape lmforge can build: model.n_layer: Input should be a "
                "valid integer (got '2')", "(fix: re-export the model)"))


@rows({"weights-malformed": weights_malformed, "weights-wrong-type": weights_wrong_type,
       "weights-missing-field": weights_missing_field, "weights-wrong-shape": weights_wrong_shape,
       "weights-wrong-dtype": weights_wrong_dtype, "weights-empty": weights_empty, "weights-huge": weights_huge,
       "weights-non-utf8": weights_non_utf8, "weights-hf-wrong-type": weights_hf_wrong_type})
def test_model_weights(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- the tokenizer file: data/tokenizer/tokenizer/tokenizer.json and each model's tokenizer/ copy --------

def _tokenizer(tmp: Path, content: bytes) -> tuple[Path, Callable[[], object]]:
    d = tmp / "tokenizer"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(content)
    return d / "tokenizer.json", lambda: load_encoder(d)


RETOKENIZE = "(fix: re-run the tokenizer stage)"


def tokenizer_malformed(tmp: Path) -> Bad:
    f, load = _tokenizer(tmp, b'{"version": "1.0",\n "model": {"type": "BPE",}}')
    return Bad(load, InputError, (f"{f}: not a valid tokenizers file (trailing comma at line 2 column 26)", RETOKENIZE))


def tokenizer_wrong_type(tmp: Path) -> Bad:
    f, load = _tokenizer(tmp, b'["not", "a", "tokenizer"]')
    return Bad(load, InputError, (f"{f}: not a valid tokenizers file (invalid type: sequence, expected struct "
                                  "Tokenizer at line 1 column 1)", RETOKENIZE))


def tokenizer_missing_field(tmp: Path) -> Bad:
    f, load = _tokenizer(tmp, b'{"version": "1.0"}')
    return Bad(load, InputError, (f"{f}: not a valid tokenizers file (Model missing. at line 1 column 18)", RETOKENIZE))


def tokenizer_empty(tmp: Path) -> Bad:
    f, load = _tokenizer(tmp, b"")
    return Bad(load, InputError,
               (f"{f}: not a valid tokenizers file (EOF while parsing a value at line 1 column 0)", RETOKENIZE))


def tokenizer_huge(tmp: Path) -> Bad:
    f, load = _tokenizer(tmp, b"")
    sparse(f, inputs.MAX_TOKENIZER_BYTES + 1)
    return Bad(load, InputError, (f"{f}: is {inputs.MAX_TOKENIZER_BYTES + 1:,} bytes, over the 256 MiB limit for a "
                                  "tokenizer file", "(fix: re-run the tokenizer stage, or point at a tokenizer.json)"))


def tokenizer_non_utf8(tmp: Path) -> Bad:
    f, load = _tokenizer(tmp, b'{"version": "1.0", "added_tokens": ["\xff"]}')
    return Bad(load, InputError, (f"{f}: not a valid tokenizers file (stream did not contain valid UTF-8)", RETOKENIZE))


def tokenizer_wrong_hash(tmp: Path) -> Bad:
    model = _model_dir(tmp, tokenizer=True)
    (model / "tokenizer" / "tokenizer.json").write_text('{"changed": true}')
    return Bad(lambda: load_model(model), InputError,
               (f"{model / 'tokenizer'}: sha256 does not match config.json", RERUN))


@rows({"tokenizer-malformed": tokenizer_malformed, "tokenizer-wrong-type": tokenizer_wrong_type,
       "tokenizer-missing-field": tokenizer_missing_field, "tokenizer-empty": tokenizer_empty,
       "tokenizer-huge": tokenizer_huge, "tokenizer-non-utf8": tokenizer_non_utf8,
       "tokenizer-wrong-hash": tokenizer_wrong_hash})
def test_tokenizer_file(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- delta files: a forge registry entry (<registry>/<id>/manifest.json + delta.safetensors) -----------

READD = "(fix: re-add the delta (lmforge forge add))"


def _entry(tmp: Path) -> tuple[Registry, str]:
    model = tiny(64)
    reg = Registry(tmp / "registry", base_sha256=weights_sha256(model))
    return reg, reg.add(random_delta(model, 1), KEY, _fields(weights_sha256(model))).id


def _edit_manifest(reg: Registry, entry: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    path = reg.root / entry / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    return path


def _set_delta(reg: Registry, entry: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite the tensor file through `edit` and record its digest, as a consistent entry."""
    path = reg.root / entry / "delta.safetensors"
    tensors = dict(load_file(str(path)))
    edit(tensors)
    data = save_safetensors(tensors)
    path.write_bytes(data)
    _edit_manifest(reg, entry, lambda m: m["files"].update({"delta.safetensors": sha256_bytes(data)}))
    return path


def _lora_a(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k in sorted(tensors) if k.endswith(".lora_A"))


def delta_malformed(tmp: Path) -> Bad:
    reg, e = _entry(tmp)
    (reg.root / e / "manifest.json").write_text('{"id": "x"\n "rank": 4}')
    return Bad(lambda: reg.load(e), InputError,
               (f"{reg.root / e / 'manifest.json'}:2: invalid JSON: Expecting ',' delimiter at column 2", READD))


def delta_wrong_type(tmp: Path) -> Bad:
    reg, e = _entry(tmp)
    path = _edit_manifest(reg, e, lambda m: m.update(rank="four"))
    return Bad(lambda: reg.load(e), InputError, (f"{path}: field 'rank' must be an integer >= 1, got 'four'", READD))


def delta_missing_tensor(tmp: Path) -> Bad:
    reg, e = _entry(tmp)
    path = _set_delta(reg, e, lambda t: t.pop("router.keys"))
    return Bad(lambda: reg.load(e), InputError, (f"{path}: tensor 'router.keys' is missing", READD))


def delta_wrong_shape(tmp: Path) -> Bad:
    reg, e = _entry(tmp)
    path = _set_delta(reg, e, lambda t: t.update({_lora_a(t): torch.zeros(3, 32)}))  # rank 3, the manifest says 4
    return Bad(lambda: reg.load(e), InputError,
               (f"{path}: module model.layers.0.mlp.down_proj: expected lora_A (rank 4 x in) and lora_B "
                "(out x rank 4)", READD))


def delta_wrong_dtype(tmp: Path) -> Bad:
    reg, e = _entry(tmp)
    path = _set_delta(reg, e, lambda t: t.update({_lora_a(t): t[_lora_a(t)].to(torch.int64)}))
    return Bad(lambda: reg.load(e), InputError,
               (f"{path}: tensor model.layers.0.mlp.down_proj.lora_A has dtype torch.int64, expected a "
                "floating-point dtype", READD))


def delta_empty(tmp: Path) -> Bad:
    reg, e = _entry(tmp)
    (reg.root / e / "manifest.json").write_bytes(b"")
    return Bad(lambda: reg.load(e), InputError, (f"{reg.root / e / 'manifest.json'}: is empty", READD))


def delta_huge(tmp: Path) -> Bad:
    reg, e = _entry(tmp)
    path = reg.root / e / "delta.safetensors"
    data = (1 << 62).to_bytes(8, "little") + b"{}"
    path.write_bytes(data)
    _edit_manifest(reg, e, lambda m: m["files"].update({"delta.safetensors": sha256_bytes(data)}))
    return Bad(lambda: reg.load(e), InputError,
               (f"{path}: not a readable safetensors file (Error while deserializing header: header too large)",
                "(fix: re-add the delta)"))


def delta_non_utf8(tmp: Path) -> Bad:
    reg, e = _entry(tmp)
    (reg.root / e / "manifest.json").write_bytes(b'{"category": "t\xe9st"}')
    return Bad(lambda: reg.load(e), InputError,
               (f"{reg.root / e / 'manifest.json'}:1: not UTF-8 (invalid continuation byte at byte 15)", READD))


@rows({"delta-malformed": delta_malformed, "delta-wrong-type": delta_wrong_type,
       "delta-missing-tensor": delta_missing_tensor, "delta-wrong-shape": delta_wrong_shape,
       "delta-wrong-dtype": delta_wrong_dtype, "delta-empty": delta_empty, "delta-huge": delta_huge,
       "delta-non-utf8": delta_non_utf8})
def test_delta_files(case: Case, tmp_path: Path) -> None:
    expect(case(tmp_path))


# --- the audit log: audit/log.jsonl + audit/head.json, read by `lmforge audit verify` ------------------

def _audit(tmp: Path) -> AuditLog:
    log = AuditLog(tmp / "audit" / "log.jsonl")
    for i in range(2):
        log.append(stage_body(i))
    return log


def audit_wrong_type(log: AuditLog) -> tuple[str, ...]:
    log.head_path.write_text(json.dumps({"count": "3", "hash": "0" * 64}))
    return (f"audit chain BROKEN: {log.head_path}: needs an int 'count' >= 0 and a sha256 'hash'",
            "(fix: restore the log and head from a backup")


def audit_empty(log: AuditLog) -> tuple[str, ...]:
    log.path.write_bytes(b"")
    return (f"audit chain BROKEN: {log.path} is empty: not even a genesis record",
            "(fix: restore the log and head from a backup")


def audit_non_utf8(log: AuditLog) -> tuple[str, ...]:
    with log.path.open("ab") as fh:
        fh.write(b'{"kind": "caf\xe9"}\n')
    return (f"audit chain BROKEN at record 3 (line 4 of {log.path}): the line is not valid UTF-8",
            "(fix: restore the log and head from a backup")


def audit_huge(log: AuditLog) -> tuple[str, ...]:
    with log.path.open("r+b") as fh:  # a binary file appended: one "line" of 64 MiB, no disk taken
        fh.truncate(fh.seek(0, 2) + 64 * inputs.MiB)
    return (f"audit chain BROKEN at record 3 (line 4 of {log.path}): the line is longer than the "
            f"{inputs.size_text(inputs.MAX_AUDIT_LINE_BYTES)} limit for one audit record, so lmforge did not write it",
            "(fix: restore the log and head from a backup")


AUDIT = {"audit-wrong-type": audit_wrong_type, "audit-empty": audit_empty, "audit-non-utf8": audit_non_utf8,
         "audit-huge": audit_huge}
for _rid in AUDIT:
    ROWS[_rid] = "test_audit_log"


@pytest.mark.parametrize("case", list(AUDIT.values()), ids=list(AUDIT))
def test_audit_log(case: Callable[[AuditLog], tuple[str, ...]], tmp_path: Path,
                   capsys: pytest.CaptureFixture[str]) -> None:
    log = _audit(tmp_path)
    needles = case(log)
    assert cli.main(["audit", "verify", "--log", str(log.path)]) == 1
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert "(fix: " in err, f"no fix in {err!r}"


# --- the table and the tests agree -----------------------------------------------------------------

_CELL = re.compile(r"(?<!\\)\|")
_REF = re.compile(r"^`(?P<file>tests/[\w/]+\.py)::(?P<test>\w+)(?:\[(?P<param>[\w-]+)\])?`$")


OPEN: set[str] = set()  # known gaps the table explains (none today); fixing one means updating both
# Every input the pipeline reads, by row-id prefix, and the failures each must be tried with: a row
# `<input>-<kind>` for each (its cell may be N/A, with the reason, where a kind cannot apply).
INPUTS = ("corpus", "manifest", "params", "chats", "pairs", "facts", "factsjson", "checkpoint", "weights", "tokenizer",
          "delta", "audit")
KINDS = ("malformed", "wrong-type", "missing-field", "empty", "huge", "non-utf8", "wrong-hash")


def table_rows() -> dict[str, tuple[str, str]]:
    """Row id -> (error cell, test cell), from every table row of docs/bad-input.md that starts with an id."""
    out: dict[str, tuple[str, str]] = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in _CELL.split(line)[1:-1]]
        if cells and re.fullmatch(r"`[a-z0-9]+(-[a-z0-9]+)+`", cells[0]):
            rid = cells[0].strip("`")
            assert rid not in out, f"row {rid} appears twice in {DOC.name}"
            out[rid] = (cells[-2], cells[-1])
    return out


def _functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}


def test_table_and_tests_agree() -> None:
    table = table_rows()
    problems = [f"{i}-{k}: no row for this input and failure" for i in INPUTS for k in KINDS if f"{i}-{k}" not in table]
    for rid, (error, cell) in table.items():
        if cell == "N/A":
            if not error.startswith("N/A: "):
                problems.append(f"{rid}: an N/A row's error cell must say why, starting 'N/A: '")
            continue
        if cell == "open":
            if rid not in OPEN or not error.startswith("Open: "):
                problems.append(f"{rid}: an open row must be in OPEN and its error cell start 'Open: '")
            continue
        m = _REF.match(cell)
        if m is None:
            problems.append(f"{rid}: test cell {cell!r} is not `tests/<file>.py::<test>[<row>]`, N/A or open")
            continue
        if m["file"] == "tests/test_bad_input.py":
            if ROWS.get(rid) != m["test"] or m["param"] != rid:
                problems.append(f"{rid}: cites {m['test']}[{m['param']}], but this module proves it with "
                                f"{ROWS[rid]}[{rid}]" if rid in ROWS else f"{rid}: no test here has this id")
        elif m["test"] not in _functions(ROOT / m["file"]):
            problems.append(f"{rid}: {m['file']} has no test {m['test']}")
    problems += [f"{rid}: tested here ({test}) but not in {DOC.name}" for rid, test in ROWS.items() if rid not in table]
    problems += [f"{rid}: in OPEN but not an open row of {DOC.name}" for rid in OPEN
                 if table.get(rid, ("", ""))[1] != "open"]
    assert not problems, "\n".join(problems)
