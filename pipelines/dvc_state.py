"""Repair the one piece of DVC's own state that a killed `dvc` leaves broken: a torn rwlock.

DVC 3.67 rewrites `.dvc/tmp/rwlock` in place (open, truncate, write) when a stage starts and
ends. A `dvc repro` killed in between (a worker host lost, a container evicted) leaves the file
empty, and every later dvc command in that clone then fails with "Unable to read RWLock-file
'.dvc/tmp/rwlock'. JSON structure is corrupted" until someone removes it. The pipeline flow
(in the workspace) and the worker flow (in the worker's clone, where nobody is at the keyboard
and a crashed stage is resubmitted automatically) call `heal_torn_rwlock` before their dvc
commands.

Safe by construction: the file is moved aside only while this process holds DVC's repo lock
and its rwlock guard, the locks every dvc command that edits the file holds. So no dvc command
is running in the clone, and a file that does not parse was left by one that died mid-write.
Its lock entries are moot: the processes they named are gone. The torn file is kept as
`.dvc/tmp/rwlock.torn` for inspection.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipelines.proc import Logger

TORN_SUFFIX = ".torn"


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_bytes())
    except FileNotFoundError:
        return True  # nothing to repair
    except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
        return False
    return True


def heal_torn_rwlock(root: Path, log: Logger) -> bool:
    """Move a torn `.dvc/tmp/rwlock` of the DVC repo at `root` aside; True if it did.

    A file that parses, or one that cannot be examined because a dvc command holds the repo
    lock right now, is left alone (that command either is writing it or will report it)."""
    path = root / ".dvc" / "tmp" / "rwlock"
    if _parses(path):  # the common case, without touching any lock
        return False
    from dvc.lock import LockError, make_lock
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        tmp = path.parent
        guard = make_lock(str(tmp / "rwlock.lock"), tmp_dir=str(tmp),
                          hardlink_lock=repo.config["core"].get("hardlink_lock", False))
        try:
            with repo.lock, guard:
                if _parses(path):
                    return False
                aside = path.with_name(path.name + TORN_SUFFIX)
                os.replace(path, aside)
        except LockError:
            return False
    log.warning(
        "%s could not be parsed (a dvc command was killed while rewriting it) and no dvc command "
        "is running in %s: moved it to %s so that dvc can run again",
        path, root, aside,
    )
    return True
