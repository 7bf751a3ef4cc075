"""Rows of tokens for language modelling: packed, BOS-aligned, deterministic, resumable, sharded.

A row is `seq_len + 1` tokens (inputs are row[:-1], targets row[1:]). Rows are packed from
the documents of a token split (lmforge.tokens), every one of which starts with `<|bos|>`:

- every document contributes one *head* piece that starts with its BOS: the whole document
  if it fits in a row, else its first `h` tokens, where `h` is what is left over after cutting
  the rest into whole rows. A row is filled best-fit with the largest waiting heads that fit
  (from a buffer of `buffer` documents), so rows start at a document boundary;
- when no waiting head fits the space left, the shortest one is split: its first part ends
  the row and the rest becomes a *continuation* piece, which only ever starts a row. The rest
  of a long document follows its head as whole rows. Consecutive pieces of one document
  overlap by one token, so every token is a target exactly once per epoch and nothing is
  thrown away but the tokens of the last, partial row of an epoch.

The plan of an epoch is a pure function of (split, seq_len, seed, epoch): documents are
visited in a seeded permutation (or in file order with `shuffle=False`, used for validation;
best-fit still reorders documents within the buffer).
The loader's position is (epoch, row); `state_dict()` is that pair, so a resumed run reads
exactly the rows an uninterrupted one would. Each optimizer step takes the next
`global_batch` rows; process r of w takes the r-th contiguous slice of them.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import LmforgeError
from ..tokens import TokenSplit


class TooLittleData(LmforgeError, ValueError):
    """A split cannot fill a single row."""


@dataclass(frozen=True)
class Plan:
    """Rows as pieces: row i is the concatenation of tokens[start[j]:start[j]+length[j]] for j
    in row_ptr[i]:row_ptr[i+1]."""

    start: np.ndarray    # int64
    length: np.ndarray   # int64
    row_ptr: np.ndarray  # int64, n_rows + 1

    @property
    def n_rows(self) -> int:
        return len(self.row_ptr) - 1

    def n_pieces(self) -> int:
        return len(self.start)


def pack(offsets: np.ndarray, row_len: int, order: np.ndarray, buffer: int = 256) -> Plan:
    """Pack the documents `order` (indices into `offsets`) into rows of `row_len` tokens."""
    starts: list[int] = []
    lengths: list[int] = []
    row_ptr: list[int] = [0]
    conts: deque[tuple[int, int]] = deque()  # continuation pieces: only at the start of a row
    heads: list[tuple[int, int, int, int]] = []   # (length, arrival, start, rest), sorted
    arrival = 0
    head_tokens = 0

    def emit(pieces: list[tuple[int, int]]) -> None:
        for s, n in pieces:
            starts.append(s)
            lengths.append(n)
        row_ptr.append(len(starts))

    def add_continuation(s: int, n: int) -> None:
        # whole rows straight away; a tail (if any) waits to start a later row
        while n >= row_len:
            emit([(s, row_len)])
            s, n = s + row_len - 1, n - row_len + 1
        if n > 1:  # a single token left is already a target of the previous piece
            conts.append((s, n))

    def build_row() -> None:
        nonlocal head_tokens
        pieces: list[tuple[int, int]] = []
        later: list[tuple[int, int]] = []
        whole: list[tuple[int, int]] = []
        space = row_len
        if conts:
            s, n = conts.popleft()
            pieces.append((s, n))
            space -= n
        while space > 0 and heads:
            i = bisect.bisect_right(heads, (space, float("inf"), 0, 0)) - 1
            if i >= 0:  # the largest head that fits; a long document's rest follows as whole rows
                n, _, s, rest = heads.pop(i)
                head_tokens -= n
                pieces.append((s, n))
                space -= n
                if rest:
                    later.append((s + n - 1, rest + 1))
                    whole.append((s, n + rest))
            else:  # none fits: split the shortest, its rest continues in later rows
                n, _, s, rest = heads.pop(0)
                head_tokens -= n
                pieces.append((s, space))
                later.append((s + space - 1, n - space + 1 + rest))
                space = 0
        if space == 0:
            emit(pieces)
        else:  # out of documents: the epoch's last, partial row is dropped
            conts.clear()
            later = whole  # the row is dropped: long documents start over from their BOS
        for s, n in later:
            add_continuation(s, n)

    for doc in order.tolist():
        s, e = int(offsets[doc]), int(offsets[doc + 1])
        n = e - s
        if n >= row_len:  # head = what is left after cutting the rest into k whole rows
            k = (n - 1) // (row_len - 1)
            h = n - k * (row_len - 1)
            if h == 1:
                add_continuation(s, n)
            else:
                bisect.insort(heads, (h, arrival, s, n - h))
                arrival += 1
                head_tokens += h
        elif n > 1:
            bisect.insort(heads, (n, arrival, s, 0))
            arrival += 1
            head_tokens += n
        # build rows once the buffer is full and holds at least a row of tokens
        while len(heads) >= buffer and head_tokens + (conts[0][1] if conts else 0) >= row_len:
            build_row()
    while heads or conts:
        before = len(row_ptr)
        build_row()
        if len(row_ptr) == before:
            break
    return Plan(np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64),
                np.asarray(row_ptr, dtype=np.int64))


class PackedRows:
    """Step batches of packed rows for one process, with a resumable position."""

    def __init__(self, split: TokenSplit, seq_len: int, *, seed: int, shuffle: bool = True,
                 rank: int = 0, world: int = 1, buffer: int = 256, mask: np.ndarray | None = None):
        """`mask` (bool, one per token of `split`): train only on targets whose token is True
        there (chat SFT: the assistant's tokens); the others get target -1."""
        if mask is not None and len(mask) != len(split.tokens):
            raise ValueError(f"mask has {len(mask)} entries for {len(split.tokens)} tokens")
        self.split, self.row_len, self.seed, self.shuffle = split, seq_len + 1, seed, shuffle
        self.mask = mask
        self.rank, self.world, self.buffer = rank, world, buffer
        self.epoch, self.row = 0, 0
        self._plans: dict[int, Plan] = {}

    def plan(self, epoch: int) -> Plan:
        if epoch not in self._plans:
            n_docs = len(self.split.offsets) - 1
            order = (np.random.default_rng([self.seed, epoch]).permutation(n_docs) if self.shuffle
                     else np.arange(n_docs))
            self._plans = {epoch: pack(self.split.offsets, self.row_len, order, self.buffer)}
            if self._plans[epoch].n_rows == 0:
                raise TooLittleData(f"the split has too few tokens for one row of {self.row_len} tokens "
                                    f"({int(self.split.offsets[-1])} in all; fix: lower train.seq_len or add data)")
        return self._plans[epoch]

    def rows(self, plan: Plan, first: int, count: int, source: np.ndarray | None = None) -> np.ndarray:
        """Rows first..first+count-1 of `plan` as an int64 array (count, row_len); with `source`
        (an array parallel to the tokens, e.g. the mask), those entries instead, in its dtype."""
        tokens = self.split.tokens if source is None else source
        out = np.empty((count, self.row_len), dtype=np.int64 if source is None else source.dtype)
        for i in range(count):
            a, b = plan.row_ptr[first + i], plan.row_ptr[first + i + 1]
            pos = 0
            for s, n in zip(plan.start[a:b].tolist(), plan.length[a:b].tolist(), strict=True):
                out[i, pos:pos + n] = tokens[s:s + n]
                pos += n
        return out

    def take(self, count: int) -> np.ndarray:
        """The next `count` rows of the global stream (all processes), crossing epochs."""
        return self.take_masked(count)[0]

    def take_masked(self, count: int) -> tuple[np.ndarray, np.ndarray | None]:
        """`take`, and with a mask the rows' mask (else None)."""
        parts, keeps = [], []
        while count:
            plan = self.plan(self.epoch)
            n = min(count, plan.n_rows - self.row)
            parts.append(self.rows(plan, self.row, n))
            if self.mask is not None:
                keeps.append(self.rows(plan, self.row, n, self.mask))
            self.row += n
            count -= n
            if self.row == plan.n_rows:
                self.epoch, self.row = self.epoch + 1, 0
        return np.concatenate(parts), (np.concatenate(keeps) if keeps else None)

    def next_step(self, global_batch: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches of the next optimizer step."""
        if global_batch % (micro_batch * self.world):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch x processes "
                             f"({micro_batch} x {self.world})")
        rows, keep = self.take_masked(global_batch)
        per_rank = global_batch // self.world
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        inputs = torch.from_numpy(rows[mine])
        # a masked token is still read as input, only never predicted
        targets = inputs if keep is None else torch.from_numpy(np.where(keep[mine], rows[mine], -1))
        return [{"inputs": x[:, :-1], "targets": y[:, 1:]}
                for x, y in zip(inputs.split(micro_batch), targets.split(micro_batch), strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "row": self.row, "seed": self.seed, "row_len": self.row_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["row_len"] != self.row_len:
            raise ValueError(f"loader state is for seed {state['seed']} / row_len {state['row_len']}, "
                             f"not {self.seed} / {self.row_len}")
        self.epoch, self.row = int(state["epoch"]), int(state["row"])


def fixed_rows(split: TokenSplit, seq_len: int, max_rows: int = 0) -> np.ndarray:
    """Validation rows: the split packed in file order; with `max_rows` > 0, that many rows
    spread evenly over the whole split (a split is often ordered by source)."""
    loader = PackedRows(split, seq_len, seed=0, shuffle=False)
    plan = loader.plan(0)
    if max_rows <= 0 or max_rows >= plan.n_rows:
        return loader.rows(plan, 0, plan.n_rows)
    picks = np.linspace(0, plan.n_rows - 1, max_rows).round().astype(np.int64)
    return np.concatenate([loader.rows(plan, int(i), 1) for i in picks])


class Rows(Protocol):
    """A source of whole rows: `take(count)` gives the next `count` rows (count, row_len)."""

    def take(self, count: int) -> np.ndarray: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Blend:
    """A data source that puts `extra` rows in `main`'s batches: each step, round(fraction x
    global_batch) rows of `extra` (every target counted) take the place of rows of `main` (its
    mask, if any, applies), and the step's rows are shuffled together so every micro-batch holds
    both. Which rows go where is a function of (seed, step), so a resumed run matches.

    Uses: pretraining text in chat SFT (less forgetting of the base model), and experience replay
    (lmforge.forgetting.replay: memories of earlier domains)."""

    def __init__(self, main: PackedRows, extra: Rows, fraction: float, *, seed: int, rank: int = 0, world: int = 1):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must be in [0, 1) (got {fraction})")
        self.main, self.extra, self.fraction, self.seed = main, extra, fraction, seed
        self.rank, self.world = rank, world
        self.step = 0

    def n_extra(self, global_batch: int) -> int:
        return round(self.fraction * global_batch)

    def next_step(self, global_batch: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        if global_batch % (micro_batch * self.world):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch x processes "
                             f"({micro_batch} x {self.world})")
        k = self.n_extra(global_batch)
        rows, keep = self.main.take_masked(global_batch - k)
        extra = self.extra.take(k) if k else np.zeros((0, rows.shape[1]), dtype=np.int64)
        targets = np.where(keep, rows, -1) if keep is not None else rows
        order = np.random.default_rng([self.seed, self.step]).permutation(global_batch)
        rows, targets = np.concatenate([rows, extra])[order], np.concatenate([targets, extra])[order]
        self.step += 1
        per_rank = global_batch // self.world
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        x, y = torch.from_numpy(rows[mine]), torch.from_numpy(targets[mine])
        return [{"inputs": a[:, :-1], "targets": b[:, 1:]}
                for a, b in zip(x.split(micro_batch), y.split(micro_batch), strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return {"main": self.main.state_dict(), "extra": self.extra.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.main.load_state_dict(state["main"])
        self.extra.load_state_dict(state["extra"])
        self.step = int(state["step"])
