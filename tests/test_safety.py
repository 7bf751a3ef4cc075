"""Two safety rules, enforced by reading the source (AST), so a regression fails here at once:

1. Nothing unpickles. Artifacts are safetensors, JSON, parquet and numpy arrays; loading any of
   them must never run pickle, which executes arbitrary code from the file. So: no import of
   pickle and its kin (dill, cloudpickle, joblib, shelve, marshal), every `torch.load` passes
   `weights_only=True`, `allow_pickle` is never anything but `False`, no `read_pickle`, no MLflow
   flavour that pickles (`mlflow.<flavour>.load_model`, `mlflow.pytorch/sklearn/pyfunc` save and
   log), a Hugging Face model loads with `use_safetensors=True` and never `trust_remote_code`,
   and YAML loads safely.
2. Servers bind 127.0.0.1 unless told otherwise: every host default, host keyword, `--host`
   argument of a server command and `*_HOST` setting in the code is a loopback literal, and no
   wildcard address (0.0.0.0, ::) appears in code at all. A user who wants another address
   passes it (`lmforge serve --host`), and lmforge warns.

The scanner is tested on planted snippets first, so a scanner that stopped finding things would
fail too, and then run over the shipped code (lib, stages, pipelines, scripts, bench; tests may
use pickle on their own objects).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("lib", "stages", "pipelines", "scripts", "bench")

PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
LOOPBACK = {"127.0.0.1", "::1", "[::1]"}  # literal addresses: "localhost" resolves to whatever /etc/hosts says
WILDCARD = {"0.0.0.0", "::", "[::]", ""}
_HOST_NAME = re.compile(r"(^|_)host$", re.IGNORECASE)
_HOST_OPTION = re.compile(r"^--(host|bind|listen)(-address)?$")
_WILDCARD_IN_TEXT = re.compile(r"(--host[= ]|--bind[= ]|host=)(0\.0\.0\.0|::|\[::\])(\s|$|:)")
_PICKLING_MLFLOW = re.compile(r"^mlflow\.(\w+\.load_model|(pytorch|sklearn|pyfunc)\.(log|save)_model)$")
_SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


@dataclass
class Scan:
    violations: list[str] = field(default_factory=list)
    host_sites: list[str] = field(default_factory=list)  # every host setting checked: proof the rule looked

    def bad(self, where: str, node: ast.AST, what: str) -> None:
        self.violations.append(f"{where}:{getattr(node, 'lineno', 0)}: {what}")


def _names(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it was imported as (function-level imports included):
    `import numpy as np` gives np -> numpy, `from torch import load` gives load -> torch.load."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _dotted(node: ast.AST, names: dict[str, str]) -> str | None:
    """`np.load` -> 'numpy.load' through the import map; None for anything not rooted in an import."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in names:
        return None
    return ".".join([names[node.id], *reversed(parts)])


def _kw(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.AST | None, value: object) -> bool:
    """A literal `value` (`True` is not `1`; a variable is never safe: it can be anything)."""
    return isinstance(node, ast.Constant) and type(node.value) is type(value) and node.value == value


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _check_pickle(tree: ast.AST, where: str, scan: Scan) -> None:
    names = _names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in PICKLING_MODULES:
                    scan.bad(where, node, f"imports {mod}: pickle-based loading runs code from the file")
        if not isinstance(node, ast.Call):
            continue
        target = _dotted(node.func, names) or ""
        attr = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        if target in ("torch.load", "torch.serialization.load") and not _is_const(_kw(node, "weights_only"), True):
            scan.bad(where, node, f"{target} without weights_only=True unpickles arbitrary objects")
        allow = _kw(node, "allow_pickle")
        if allow is not None and not _is_const(allow, False):
            scan.bad(where, node, "allow_pickle must be False")
        if attr in ("read_pickle", "to_pickle", "unsafe_load", "full_load"):
            scan.bad(where, node, f".{attr}() reads or writes pickles/arbitrary objects")
        if _PICKLING_MLFLOW.match(target):
            scan.bad(where, node, f"{target} pickles the model (use safetensors and a LoggedModel, as lineage does)")
        if target in ("importlib.import_module", "__import__") or attr == "__import__":
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in PICKLING_MODULES:
                scan.bad(where, node, f"imports {arg.value} dynamically")
        trust = _kw(node, "trust_remote_code")
        if trust is not None and not _is_const(trust, False):
            scan.bad(where, node, "trust_remote_code runs code shipped with a model")
        if attr == "from_pretrained" and isinstance(node.func, ast.Attribute):
            owner = _dotted(node.func.value, names) or ""
            if ("Model" in owner.rsplit(".", 1)[-1] or owner.endswith("ForCausalLM")) and not _is_const(
                _kw(node, "use_safetensors"), True
            ):
                scan.bad(where, node, f"{owner}.from_pretrained without use_safetensors=True may torch.load a .bin")
        if target == "yaml.load":
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            name = loader.attr if isinstance(loader, ast.Attribute) else getattr(loader, "id", None)
            if name not in _SAFE_YAML_LOADERS:
                scan.bad(where, node, "yaml.load without a safe Loader builds arbitrary objects (use yaml.safe_load)")
        if target == "ruamel.yaml.YAML" and _is_const(_kw(node, "typ"), "unsafe"):
            scan.bad(where, node, "ruamel YAML(typ='unsafe') builds arbitrary objects")


def _check_host_value(value: ast.AST | None, where: str, node: ast.AST, what: str, scan: Scan) -> None:
    scan.host_sites.append(f"{where}:{getattr(node, 'lineno', 0)}: {what}")
    if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value not in LOOPBACK:
        scan.bad(where, node, f"{what} is {value.value!r}; servers bind 127.0.0.1 unless the user says otherwise")


def _check_hosts(tree: ast.AST, where: str, scan: Scan) -> None:
    docs = _docstrings(tree)
    for node in ast.walk(tree):
        # Outside docstrings even a message is flagged: a string holding a command line cannot be
        # told apart from one that only mentions it, so messages say "a wildcard address" instead.
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                and (node.value in WILDCARD - {""} or _WILDCARD_IN_TEXT.search(node.value))):
            scan.bad(where, node, f"wildcard address in {node.value!r}: binds every interface")
        if isinstance(node, ast.Call):
            opts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument" and any(
                _HOST_OPTION.match(o) for o in opts
            ):
                default = _kw(node, "default")
                if default is None:
                    scan.bad(where, node, f"{opts[0]} has no default: give it '127.0.0.1'")
                _check_host_value(default, where, node, f"default of {opts[0]}", scan)
            if (host := _kw(node, "host")) is not None:
                _check_host_value(host, where, node, "host= argument", scan)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults, strict=True))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is not None]
            for arg, default in pairs:
                if _HOST_NAME.search(arg.arg):
                    _check_host_value(default, where, node, f"default of parameter {arg.arg}", scan)
        elif isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
                if isinstance(t, ast.Subscript) and isinstance(t.slice, ast.Constant):
                    name = str(t.slice.value)
                if name and _HOST_NAME.search(name):
                    _check_host_value(node.value, where, node, f"{name} =", scan)
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values, strict=True):
                if isinstance(k, ast.Constant) and isinstance(k.value, str) and _HOST_NAME.search(k.value):
                    _check_host_value(v, where, node, f"{k.value!r}:", scan)
        elif isinstance(node, ast.List | ast.Tuple):  # a command line: [..., "--host", VALUE, ...]
            for flag, value in zip(node.elts, node.elts[1:], strict=False):
                if isinstance(flag, ast.Constant) and isinstance(flag.value, str) and _HOST_OPTION.match(flag.value):
                    _check_host_value(value, where, node, f"{flag.value} in a command", scan)


def scan_source(source: str, where: str = "<snippet>") -> Scan:
    tree = ast.parse(source, filename=where)
    scan = Scan()
    _check_pickle(tree, where, scan)
    _check_hosts(tree, where, scan)
    return scan


def scan_tree() -> Scan:
    total = Scan()
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if ".egg-info" in str(path) or "__pycache__" in path.parts:
                continue
            part = scan_source(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
            total.violations += part.violations
            total.host_sites += part.host_sites
    return total


# ---- the scanner catches planted violations ---------------------------------------------------
PLANTED = {
    "import pickle": "imports pickle",
    "import dill as d": "imports dill",
    "from joblib import load": "imports joblib",
    "from cloudpickle import loads as l": "imports cloudpickle",
    "import torch\ntorch.load('m.pt')": "torch.load without weights_only=True",
    "import torch as t\nt.load('m.pt', weights_only=False)": "torch.load without weights_only=True",
    "from torch import load\nload('m.pt', weights_only=flag)": "torch.load without weights_only=True",
    "import numpy as np\nnp.load('a.npy', allow_pickle=True)": "allow_pickle must be False",
    "import pandas as pd\npd.read_pickle('x')": ".read_pickle()",
    "import mlflow\nmlflow.pytorch.load_model('runs:/x/m')": "mlflow.pytorch.load_model pickles",
    "import mlflow.pyfunc\nmlflow.pyfunc.load_model('m')": "mlflow.pyfunc.load_model pickles",
    "import importlib\nimportlib.import_module('pickle')": "imports pickle dynamically",
    "from transformers import AutoModelForCausalLM as M\nM.from_pretrained('d')": "without use_safetensors=True",
    "from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained('d', use_safetensors=True,"
    " trust_remote_code=True)": "trust_remote_code",
    "import yaml\nyaml.load(text, Loader=yaml.FullLoader)": "yaml.load without a safe Loader",
    "import yaml\nyaml.unsafe_load(text)": ".unsafe_load()",
    "from ruamel.yaml import YAML\nYAML(typ='unsafe').load(text)": "YAML(typ='unsafe')",
    # hosts
    "p.add_argument('--host', default='0.0.0.0')": "default of --host is '0.0.0.0'",
    "p.add_argument('--host')": "--host has no default",
    "import uvicorn\nuvicorn.run(app, host='10.0.0.5')": "host= argument is '10.0.0.5'",
    "def serve(app, host='localhost'):\n    pass": "default of parameter host is 'localhost'",
    "class S:\n    bind_host: str = '192.168.1.2'": "bind_host = is '192.168.1.2'",
    "env = {'PREFECT_SERVER_API_HOST': '10.1.1.1'}": "'PREFECT_SERVER_API_HOST': is '10.1.1.1'",
    "cmd = ['mlflow', 'server', '--host', 'example.org']": "--host in a command is 'example.org'",
    "ADDR = '0.0.0.0'": "wildcard address in '0.0.0.0'",
    "os.system('prefect server start --host :: --port 1')": "wildcard address",
}


@pytest.mark.parametrize("snippet", list(PLANTED))
def test_the_scanner_catches_a_planted_violation(snippet: str) -> None:
    found = scan_source(snippet).violations
    assert len(found) >= 1 and any(PLANTED[snippet] in v for v in found), found


CLEAN = '''
"""A docstring may say: never run `prefect server start --host 0.0.0.0` without auth."""
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
import yaml

def load(path, host="127.0.0.1", port=8000):
    state = torch.load(path, weights_only=True, map_location="cpu")
    offsets = np.load(path, allow_pickle=False)
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    tok = AutoTokenizer.from_pretrained(path)
    params = yaml.safe_load(open(path)) or yaml.load(open(path), Loader=yaml.SafeLoader)
    cmd = ["mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    p.add_argument("--host", default="127.0.0.1", help="another address only behind a firewall")
    return load_file(path), {"PREFECT_SERVER_API_HOST": "127.0.0.1"}, host
'''


def test_the_scanner_passes_safe_code() -> None:
    scan = scan_source(CLEAN)
    assert scan.violations == []
    assert len(scan.host_sites) == 4  # parameter default, command, add_argument, env dict


# ---- the shipped code ------------------------------------------------------------------------
def test_no_shipped_code_unpickles_or_binds_beyond_loopback() -> None:
    scan = scan_tree()
    assert scan.violations == [], "\n".join(scan.violations)


def test_the_server_code_was_actually_checked() -> None:
    """The rule must have looked at the real servers: `lmforge serve`'s --host default and the
    local stack's Prefect and MLflow server commands. If this fails, the code moved or changed
    shape: point the scanner at it again rather than deleting the check."""
    sites = scan_tree().host_sites
    assert any(s.startswith("lib/lmforge/serve.py:") and "default of --host" in s for s in sites), sites
    stack = [s for s in sites if s.startswith("pipelines/stack.py:") and "--host in a command" in s]
    assert len(stack) == 2, sites  # prefect server start, mlflow server
