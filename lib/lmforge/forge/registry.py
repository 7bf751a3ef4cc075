"""The delta registry: one directory per delta, safetensors + a JSON manifest.

    reg = Registry("data/forge/registry", base_sha256=weights_sha256(model), policy=Policy())
    entry = reg.add(delta, key, manifest_fields)   # refuses a wrong base, an overlapping delta, no capacity
    reg.ids(); reg.load(entry_id); reg.remove(entry_id)

Layout: `<root>/<id>/delta.safetensors` (`<module>.lora_A` (rank x in), `<module>.lora_B`
(out x rank), `router.keys`, `router.lengths`) and `<root>/<id>/manifest.json` (id, category,
facts, targets, rank, alpha, base_sha256, metrics, created, provenance, and the SHA-256 of the
tensor file). The id is the category and the first 12 hex digits of the tensor file's SHA-256.

An add is all or nothing: every check runs before anything is written, the entry is written
into a temporary directory and renamed into place, so a failed or interrupted add leaves the
registry as it was. Loading checks the manifest's fields and the tensor file's hash.

Checks on add:
- base: the manifest's `base_sha256` must be the registry's base (lmforge.forge.delta.weights_sha256);
- overlap: for every module two deltas both change, the principal angles between the column
  spaces of their weight deltas (what they write); overlap = mean squared cosine, 1 for the same
  subspace, about rank/out for random ones; refused above `max_overlap`;
- capacity: per module, the ranks of registered deltas plus the new one may not exceed
  `capacity` x min(out, in) (consolidation frees it by merging deltas into fewer ranks).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..atomic import atomic_path, remove
from ..config import Config
from ..digest import sha256_file
from ..errors import InputError, LmforgeError
from ..inputs import read_json_object
from .delta import Delta
from .router import Key

TENSORS = "delta.safetensors"
MANIFEST = "manifest.json"
REQUIRED = ("id", "category", "facts", "targets", "rank", "alpha", "base_sha256", "metrics", "created",
            "provenance", "files")
_ID = re.compile(r"[A-Za-z0-9_.-]+")


class Policy(Config):
    max_overlap: float = Field(0.5, ge=0, le=1)  # refuse a delta whose subspace overlaps a registered one more than this
    capacity: float = Field(0.5, gt=0, le=1)     # per module, registered ranks <= capacity x min(out, in)


class RegistryRefused(LmforgeError):
    """The registry would not take a delta; nothing was written."""


@dataclass
class Entry:
    manifest: dict[str, Any]
    delta: Delta
    key: Key

    @property
    def id(self) -> str:
        return str(self.manifest["id"])


def _orthonormal(m: torch.Tensor) -> torch.Tensor:
    u, s, _ = torch.linalg.svd(m.double(), full_matrices=False)
    return u[:, s > s.max() * 1e-6] if len(s) and s.max() > 0 else u[:, :0]


def overlap(a: Delta, b: Delta) -> dict[str, float]:
    """Per shared module: mean squared cosine of the principal angles between the column spaces
    of the two weight deltas (0: orthogonal, 1: the same subspace)."""
    out = {}
    for name in sorted(set(a.names) & set(b.names)):
        ua, ub = _orthonormal(a.weight_delta(name).detach()), _orthonormal(b.weight_delta(name).detach())
        k = min(ua.shape[1], ub.shape[1])
        if k == 0:
            out[name] = 0.0
            continue
        cos = torch.linalg.svdvals(ua.t() @ ub)[:k]
        out[name] = float((cos ** 2).mean())
    return out


class Registry:
    def __init__(self, root: str | Path, *, base_sha256: str, policy: Policy | None = None,
                 shapes: dict[str, tuple[int, int]] | None = None):
        self.root, self.base_sha256, self.policy = Path(root), base_sha256, policy or Policy()
        self.shapes = shapes or {}  # module -> (out, in), for capacity; learnt from deltas when absent

    # -- reading
    def ids(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def manifest(self, entry_id: str) -> dict[str, Any]:
        path = self.root / entry_id / MANIFEST
        readd = "re-add the delta (lmforge forge add)"
        m = read_json_object(path, fix=readd, missing="remove the directory, or re-add the delta")
        if missing := [k for k in REQUIRED if k not in m]:
            raise InputError(path, f"manifest lacks field(s) {', '.join(missing)}",
                             fix=f"a manifest holds {', '.join(REQUIRED)}; re-add the delta with `lmforge forge add`")
        # the fields load() computes with: a wrong type here would surface later as a bare TypeError
        for key, ok, want in (("rank", lambda v: type(v) is int and v >= 1, "an integer >= 1"),
                              ("alpha", lambda v: type(v) in (int, float), "a number"),
                              ("base_sha256", lambda v: isinstance(v, str), "a sha256 string"),
                              ("files", lambda v: isinstance(v, dict) and isinstance(v.get(TENSORS), str),
                               f"an object holding the sha256 of {TENSORS}"),
                              ("targets", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v),
                               "a list of module names"),
                              ("facts", lambda v: isinstance(v, list), "a list")):
            if not ok(m[key]):
                raise InputError(path, f"field '{key}' must be {want}, got {m[key]!r:.80}", fix=readd)
        return m

    def load(self, entry_id: str) -> Entry:
        m = self.manifest(entry_id)
        path = self.root / entry_id / TENSORS
        readd = "re-add the delta (lmforge forge add)"
        want = m["files"][TENSORS]
        if not path.is_file():
            raise InputError(path, "missing", fix="re-add the delta")
        if (got := sha256_file(path)) != want:
            raise InputError(path, f"SHA-256 {got[:16]}... does not match the manifest's {str(want)[:16]}...: "
                             "the file is damaged or was replaced", fix=readd)
        if m["base_sha256"] != self.base_sha256:
            raise InputError(self.root / entry_id / MANIFEST, f"delta was forged on base {m['base_sha256'][:16]}..., "
                             f"this base is {self.base_sha256[:16]}...", fix="forge it again on this base")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise InputError(path, f"not a readable safetensors file ({e})", fix="re-add the delta") from None
        for name in ("router.keys", "router.lengths"):
            if name not in t:
                raise InputError(path, f"tensor '{name}' is missing", fix=readd)
        if odd := sorted(k for k, v in t.items() if not v.is_floating_point() and k != "router.lengths"):
            raise InputError(path, f"tensor {odd[0]} has dtype {t[odd[0]].dtype}, expected a floating-point dtype",
                             fix=readd)
        key = Key(t.pop("router.keys"), t.pop("router.lengths"))
        if sorted({k.rsplit(".", 1)[0] for k in t}) != sorted(m["targets"]):
            raise InputError(path, f"tensors are for modules {sorted({k.rsplit('.', 1)[0] for k in t})}, the "
                             f"manifest's targets are {sorted(m['targets'])}", fix=readd)
        try:
            delta = Delta.from_tensors(t, m["rank"], float(m["alpha"]))
        except ValueError as e:  # a factor missing, or of the wrong shape for the manifest's rank
            raise InputError(path, f"{e}", fix=readd) from None
        return Entry(m, delta, key)

    def entries(self) -> list[Entry]:
        return [self.load(i) for i in self.ids()]

    # -- checks
    def usage(self, entries: list[Entry] | None = None) -> dict[str, int]:
        """Rank used per module by the registered deltas."""
        used: dict[str, int] = {}
        for e in self.entries() if entries is None else entries:
            for n in e.delta.names:
                used[n] = used.get(n, 0) + e.delta.rank
        return dict(sorted(used.items()))

    def capacity(self, name: str, delta: Delta | None = None) -> int:
        if name in self.shapes:
            out, inp = self.shapes[name]
        else:
            assert delta is not None
            a, b = delta.factors(name)
            out, inp = b.shape[0], a.shape[1]
        return int(self.policy.capacity * min(out, inp))

    def check(self, delta: Delta, base_sha256: str, *, replacing: tuple[str, ...] = ()) -> dict[str, Any]:
        """Why `delta` may not join (RegistryRefused), or its overlap and capacity figures."""
        if base_sha256 != self.base_sha256:
            raise RegistryRefused(f"delta was forged on base {base_sha256[:16]}..., the registry's base is "
                                  f"{self.base_sha256[:16]}... (fix: forge it on this base)")
        others = [e for e in self.entries() if e.id not in replacing]
        worst: dict[str, Any] = {"overlap": 0.0, "with": None, "module": None}
        for e in others:
            for name, v in overlap(delta, e.delta).items():
                if v > worst["overlap"]:
                    worst = {"overlap": v, "with": e.id, "module": name}
        if worst["overlap"] > self.policy.max_overlap:
            raise RegistryRefused(f"delta overlaps registered delta {worst['with']} on {worst['module']}: "
                                  f"{worst['overlap']:.3f} > max_overlap {self.policy.max_overlap} (fix: remove or "
                                  "consolidate the other delta, or raise forge.registry.max_overlap)")
        used = self.usage(others)
        full = {n: (used.get(n, 0) + delta.rank, self.capacity(n, delta)) for n in delta.names}
        over = {n: v for n, v in full.items() if v[0] > v[1]}
        if over:
            n, (want, cap) = sorted(over.items())[0]
            raise RegistryRefused(f"no capacity on {n}: {want} ranks needed, {cap} allowed (fix: consolidate "
                                  "deltas (lmforge.forge.consolidate), use a lower rank, or raise forge.registry.capacity)")
        return {"overlap": round(worst["overlap"], 6), "overlap_with": worst["with"],
                "capacity": {n: {"used": u, "of": c} for n, (u, c) in sorted(full.items())}}

    # -- writing
    def add(self, delta: Delta, key: Key, fields: dict[str, Any], *, replacing: tuple[str, ...] = ()) -> Entry:
        """Check, then write atomically; `replacing` ids are left out of the checks (consolidation
        removes them after this add succeeds)."""
        base = str(fields.get("base_sha256", ""))
        checks = self.check(delta, base, replacing=replacing)
        category = str(fields.get("category", ""))
        if not _ID.fullmatch(category):
            raise ValueError(f"category {category!r} must be letters, digits, '_', '.' or '-'")
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.root / f".staging-{category}") as tmp:
            tmp.mkdir()
            tensors = delta.tensors() | {"router.keys": key.vectors.contiguous(), "router.lengths": key.lengths}
            # one metadata key only: safetensors keeps metadata in a hash map, so two keys come out in either order
            save_file(tensors, str(tmp / TENSORS), metadata={"format": "lmforge-delta"})
            digest = sha256_file(tmp / TENSORS)
            entry_id = f"{category}-{digest[:12]}"
            if (self.root / entry_id).exists():
                raise RegistryRefused(f"delta {entry_id} is already registered")
            manifest = {**fields, "id": entry_id, "category": category, "targets": delta.names, "rank": delta.rank,
                        "alpha": delta.alpha, "checks": checks, "files": {TENSORS: digest}}
            if missing := [k for k in REQUIRED if k not in manifest]:
                raise ValueError(f"manifest fields missing: {missing}")
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        # the staging dir is complete: one rename makes the entry visible
        (self.root / f".staging-{category}").rename(self.root / entry_id)
        return Entry(manifest, delta, key)

    def remove(self, entry_id: str) -> None:
        path = self.root / entry_id
        if not _ID.fullmatch(entry_id) or not path.is_dir():
            raise InputError(self.root, f"no delta {entry_id!r} in the registry", fix=f"one of {self.ids()}")
        trash = self.root / f".removed-{entry_id}"
        path.rename(trash)  # invisible at once; then deleted
        remove(trash)
