"""Checkpoints: sharded model/optimizer state through torch.distributed.checkpoint, plus each
rank's small state (RNG, data position, counters, schedulers), checked by a manifest.

Layout of `<run.output_dir>/checkpoints/step_000040/`:

    state/          DCP shards of every trainable or moving model and its optimizer
    rank_<r>.pt     this rank's local state (loaded with weights_only=True)
    meta.json       step, world size, the resolved config, stages done, tracking run id
    manifest.json   size and checksum of every file above; written last

A checkpoint is written under `step_000040.tmp-<nonce>`. When every rank has written its files,
the files are split across the ranks, each rank reads back its share, fsyncs it and computes
its checksums; rank 0 writes the manifest, fsyncs it and the folders, and renames the folder to
its final name. A checkpoint is *complete* when its manifest verifies: every listed file
exists with its recorded size and checksum. Resume (`run.resume=auto` or a path), `launch.eval`
and the message after a `NonFiniteError` all verify before they trust a checkpoint; `auto` logs
each one that fails (path, file, reason: missing file, truncated, size, checksum mismatch) and
falls back to the newest that verifies, while an explicit path that fails is an error.
Pruning (`keep_last` >= 1) only removes checkpoints older than the one just saved or resumed,
which is verified, so the newest verified checkpoint is never removed; checkpoints that failed
verification do not count towards `keep_last`. Leftovers of interrupted saves (`step_*.tmp-*`)
are removed when training starts. A save that runs out of disk space removes its partial
folder and raises "no space left on <path>: needed ~N MB", N estimated from the state's tensor
sizes; earlier checkpoints are untouched. A save that fails for another reason leaves its
partial folder for inspection (removed at the next start).

Checksums: SHA-256 of each 8 MiB block, and SHA-256 of those digests per file (so one file's
blocks hash in parallel threads; hashlib releases the GIL). Chosen by measurement on this
project's CPU machine: hashlib sha256 1.76 GB/s, sha1 1.91, blake2b 0.93, md5 0.76, zlib.crc32
4.2 (not a cryptographic hash, 32 bits). Cost on a ~100 MB model (23.9 M float32 parameters;
with AdamW's moments a 287 MB checkpoint), page cache warm, median of 5 rounds, measured with
`python -m tests.test_checkpoint_faults [processes]` on the 2-core CI-class machine while other
jobs ran (load average ~4, so +-30%):

    processes   save: sizes only / checksums   load: sizes only / checksums   verify alone
    1           0.68 / 0.78 s                  0.29 / 0.47 s                  0.17 s
    2           0.53 / 0.67 s                  0.28 / 0.48 s                  0.17 s

Both save columns include the fsyncs. Checksums add 0.1-0.2 s to a save and one read of the
checkpoint to a load: ~1.7 GB/s on these 2 cores (1 process hashing with 2 threads, or 2 with 1
each). A rank hashes with its share of the CPUs (up to 8 threads), the ranks hash disjoint files
at the same time, and what they read stays in the page cache for the load when memory allows.

`checkpoint.verify=size` checks sizes only (no checksums written or read): for storage where
reading a checkpoint back costs more than writing it.

Resuming with another world size works for the DCP state (it reshards on load); the data
position then continues from the same epoch and global sample count, and RNG streams restart
from rank 0's, so only same-size resumes are bitwise exact.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, TypeVar

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

from core import dist
from core.config import at_least

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
MANIFEST = "manifest.json"
DIGEST = "sha256-of-8MiB-blocks"
"""The manifest's checksum: SHA-256 over the SHA-256 digests of a file's 8 MiB blocks."""
_BLOCK = 8 << 20
_MB = 1e6
T = TypeVar("T")


@dataclass(kw_only=True, slots=True)
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (and after the last step); 0: only after the last step."""
    keep_last: int = 2
    """Complete checkpoints kept (>= 1); older ones are deleted after a successful save."""
    export_hf: bool = True
    """Write the final actor as a Hugging Face folder to <run.output_dir>/hf at the end."""
    verify: Literal["full", "size"] = "full"
    """What a manifest records and resume checks: sizes and checksums, or sizes only."""

    def __post_init__(self) -> None:
        at_least(self, 0, "every")
        at_least(self, 1, "keep_last")  # the newest verified checkpoint is always kept


class CheckpointError(RuntimeError):
    """A checkpoint that could not be written, does not verify or does not load; the message
    names the path (and the file, when one is at fault)."""


class ShardedState(Stateful):
    """A sharded model (and its optimizer) as one DCP entry; DCP calls these on save/load."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])


def rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Manifest: sizes and checksums


def file_digest(path: Path, *, threads: int = 1, fsync: bool = False) -> str:
    """DIGEST of one file (hex); `fsync` also flushes the file to disk (any rank may do it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            blocks = pool.map(lambda offset: hashlib.sha256(os.pread(fd, _BLOCK, offset)).digest(),
                              range(0, size, _BLOCK))
            top = hashlib.sha256()
            for block in blocks:
                top.update(block)
        if fsync:
            os.fsync(fd)
        return top.hexdigest()
    finally:
        os.close(fd)


def _hash_threads() -> int:
    """This rank's share of the CPUs it may run on (torchrun sets OMP_NUM_THREADS=1, so the
    torch thread count says nothing here), at most 8."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cpus // max(1, local_world)))


def describe_files(folder: Path, names: list[str], *, checksums: bool, fsync: bool) -> dict[str, dict[str, Any]]:
    """Manifest entries of `names` (paths relative to `folder`): {"bytes": n, "digest": hex}."""
    threads = _hash_threads()
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        path = folder / name
        entry: dict[str, Any] = {"bytes": path.stat().st_size}
        if checksums:
            entry["digest"] = file_digest(path, threads=threads, fsync=fsync)
        elif fsync:
            _fsync(path)
        out[name] = entry
    return out


def check_files(folder: Path, entries: Mapping[str, Mapping[str, Any]], *, checksums: bool) -> list[str]:
    """"file: reason" for each entry that does not match what is on disk (empty: all match)."""
    threads = _hash_threads()
    problems = []
    for name, want in sorted(entries.items()):
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{name}: missing file")
            continue
        except OSError as e:  # a problem to report, never an exception on one rank only
            problems.append(f"{name}: unreadable ({e})")
            continue
        if size < want["bytes"]:
            problems.append(f"{name}: truncated ({size} of {want['bytes']} bytes)")
        elif size > want["bytes"]:
            problems.append(f"{name}: size {size} bytes, the manifest says {want['bytes']}")
        elif checksums and "digest" in want:
            try:
                if file_digest(path, threads=threads) != want["digest"]:
                    problems.append(f"{name}: checksum mismatch ({DIGEST})")
            except OSError as e:
                problems.append(f"{name}: unreadable ({e})")
    return problems


def read_manifest(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, "manifest.json: reason")."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        return None, (f"{MANIFEST}: missing file (the save did not finish, or the checkpoint "
                      f"predates manifests)")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{MANIFEST}: unreadable (truncated or not JSON: {e})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int)
                                              for e in files.values()):
        return None, f"{MANIFEST}: no list of files with their sizes"
    return manifest, None


def _assign(sizes: Mapping[str, int], world: int) -> list[list[str]]:
    """Files split across ranks by size (largest first to the least loaded rank)."""
    loads = [0] * world
    shares: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (loads[i], i))
        shares[r].append(name)
        loads[r] += sizes[name]
    return shares


def _rank_world() -> tuple[int, int]:
    if torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        # some network and FUSE file systems cannot fsync a directory (their renames are
        # synchronous); a file that cannot be fsynced is an error
        if not (path.is_dir() and e.errno in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP)):
            raise
    finally:
        os.close(fd)


def _free_bytes(path: Path) -> int:
    """Free space of the file system holding `path` (its nearest existing ancestor)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _step_of(path: Path) -> int:
    match = _STEP_DIR.match(path.name)
    assert match is not None, path
    return int(match.group(1))


def _nbytes(obj: Any, rank: int) -> int:
    """Bytes this rank writes for the tensors in `obj` (DCP writes a replicated tensor once)."""
    if isinstance(obj, DTensor):
        if all(p.is_replicate() for p in obj.placements) and rank != 0:
            return 0
        local = obj.to_local()
        return local.numel() * local.element_size()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size() if rank == 0 else 0
    if isinstance(obj, Mapping):
        return sum(_nbytes(v, rank) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v, rank) for v in obj)
    return 0


def _no_space_errno(error: BaseException) -> bool:
    """ENOSPC/EDQUOT anywhere in the error's chain or in DCP's per-rank failures."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(e, CheckpointException):
            todo.extend(failure[0] if isinstance(failure, tuple) else failure
                        for failure in e.failures.values())
        todo.extend([e.__cause__, e.__context__])
    return False


def _describe(error: BaseException) -> str:
    """One line for an error; DCP's CheckpointException by its first rank's underlying error."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, failure = min(error.failures.items())
        inner = failure[0] if isinstance(failure, tuple) else failure
        return f"torch.distributed.checkpoint on rank {rank}: {type(inner).__name__}: {inner}"
    return f"{type(error).__name__}: {error}"


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


# ---------------------------------------------------------------------------------------------


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, output_dir: str | Path) -> None:
        self.cfg = cfg
        self.root = Path(output_dir) / "checkpoints"
        self.failed: set[Path] = set()
        """Checkpoints that failed verification in this process (they do not count for keep_last)."""

    @property
    def checksums(self) -> bool:
        return self.cfg.verify == "full"

    # -- finding and verifying ----------------------------------------------------------------

    def candidates(self) -> list[Path]:
        """Every `step_*` folder (complete or not), oldest first; no partial saves."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()), key=_step_of)

    def verify(self, path: Path, *, collective: bool = False) -> list[str]:
        """"file: reason" for each problem of the checkpoint at `path` (empty: it verifies).

        collective=True: every rank calls it and checks a share of the files (rank 0 reads the
        manifest); every rank gets the same answer."""
        rank, world = _rank_world() if collective else (0, 1)
        manifest, problem = read_manifest(path) if rank == 0 else (None, None)
        if world > 1:
            manifest, problem = dist.broadcast_object((manifest, problem))
        if manifest is None:
            assert problem is not None
            return [problem]
        files = manifest["files"]
        share = _assign({name: int(entry["bytes"]) for name, entry in files.items()}, world)[rank]
        mine = check_files(path, {name: files[name] for name in share}, checksums=self.checksums)
        if world == 1:
            return mine
        return sorted(p for problems in dist.all_gather_objects(mine) for p in problems)

    def complete(self) -> list[Path]:
        """Checkpoints whose manifest verifies, oldest first (this process checks them all)."""
        return [p for p in self.candidates() if not self.verify(p)]

    def newest_verified(self) -> Path | None:
        """The newest checkpoint that verifies, checked by this process alone (no collective:
        safe on an error path); logs each newer one that fails."""
        for path in reversed(self.candidates()):
            problems = self.verify(path)
            if not problems:
                return path
            self.failed.add(path)
            logger.warning("checkpoint %s does not verify: %s", path, "; ".join(problems))
        return None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint `run.resume` asks for, verified (collective): "never", "auto" (the
        newest that verifies, newer ones that fail are logged; no checkpoint at all: None, a
        fresh start; checkpoints of which none verifies: an error) or a path (which must verify)."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not path.is_dir():
                raise CheckpointError(f"run.resume={resume!r} is not a checkpoint folder (it does not "
                                      f"exist); use auto, never or a checkpoints/step_* path")
            problems = self.verify(path, collective=True)
            if problems:
                raise CheckpointError(f"run.resume={resume} does not verify: {'; '.join(problems)}")
            return path
        found = self.candidates()
        for path in reversed(found):
            problems = self.verify(path, collective=True)
            if not problems:
                return path
            self.failed.add(path)
            if dist.info().is_main:  # every rank has the same answer
                logger.warning("checkpoint %s does not verify: %s; falling back to the previous checkpoint",
                               path, "; ".join(problems))
        if found:
            raise CheckpointError(f"no checkpoint in {self.root} verifies (see the warnings above); "
                                  f"run.resume=never starts over, a checkpoints/step_* path resumes "
                                  f"from a checkpoint you trust")
        return None

    def start(self, resume: str) -> Path | None:
        """At the start of training (collective): remove partial saves, resolve `run.resume`,
        and apply keep_last to the checkpoints older than the one resumed."""
        if dist.info().is_main:
            for leftover in sorted(self.root.glob("step_*.tmp-*")):
                logger.warning("removing %s, the partial folder of an interrupted save", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        dist.barrier()
        path = self.resolve(resume)
        if path is not None and dist.info().is_main:
            self._prune(keep=path)
        dist.barrier()
        return path

    # -- saving -------------------------------------------------------------------------------

    def save(self, step: int, *, sharded: Mapping[str, Stateful], local: Mapping[str, Any],
             meta: Mapping[str, Any]) -> Path:
        """Collective: every rank calls it with its own `local` state. Raises CheckpointError
        on every rank if any rank fails."""
        rank, world = _rank_world()
        final = self.root / f"step_{step:06d}"
        tmp = self.root / f"{final.name}.tmp-{dist.broadcast_object(uuid.uuid4().hex[:8])}"
        needed = sum(_nbytes(s.state_dict(), rank) for s in sharded.values()) + _nbytes(dict(local), 0)
        t0 = time.perf_counter()

        def together(fn: Callable[[], T]) -> list[T]:
            return self._together(fn, step=step, tmp=tmp, needed=needed)

        together(lambda: tmp.mkdir(parents=True) if rank == 0 else None)
        together(lambda: self._write_state(tmp, rank, sharded, local))
        t_write = time.perf_counter()
        sizes = together(lambda: self._write_meta(tmp, step, world, meta) if rank == 0 else {})[0]
        share = _assign(sizes, world)[rank]
        described = together(lambda: describe_files(tmp, share, checksums=self.checksums, fsync=True))
        entries = {name: entry for part in described for name, entry in part.items()}
        together(lambda: self._publish(tmp, final, step, entries) if rank == 0 else None)
        logger.info("checkpoint step %d saved to %s: %.1f MB in %.2f s (write %.2f s, %s and fsync %.2f s)",
                    step, final, sum(e["bytes"] for e in entries.values()) / _MB, time.perf_counter() - t0,
                    t_write - t0, "checksums" if self.checksums else "sizes", time.perf_counter() - t_write)
        return final

    @staticmethod
    def _write_state(tmp: Path, rank: int, sharded: Mapping[str, Stateful], local: Mapping[str, Any]) -> None:
        dcp.save(dict(sharded), checkpoint_id=str(tmp / "state"))
        torch.save(dict(local), tmp / f"rank_{rank}.pt")

    @staticmethod
    def _write_meta(tmp: Path, step: int, world: int, meta: Mapping[str, Any]) -> dict[str, int]:
        """Rank 0: meta.json; returns every file of the checkpoint with its size."""
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": world}))
        return {f.relative_to(tmp).as_posix(): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}

    def _publish(self, tmp: Path, final: Path, step: int, entries: Mapping[str, Any]) -> None:
        """Rank 0: the manifest, fsynced with the folders, then the atomic rename and pruning."""
        manifest = {"format": 1, "step": step, "digest": DIGEST if self.checksums else None,
                    "files": dict(sorted(entries.items()))}
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        for folder in sorted({(tmp / name).parent for name in entries} | {tmp}, reverse=True):
            _fsync(folder)
        aside = None
        if final.exists():  # re-saving the same step (e.g. after a resume): replace it
            aside = final.with_name(f"{tmp.name}-replaced")
            os.replace(final, aside)
        os.replace(tmp, final)
        _fsync(self.root)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        self.failed.discard(final)
        self._prune(keep=final)

    def _together(self, fn: Callable[[], T], *, step: int, tmp: Path, needed: int) -> list[T]:
        """Collective: fn() on this rank; every rank's result, or a CheckpointError on every rank
        when fn failed on any (after rank 0 removed the partial save if the disk is full)."""
        value: Any = None
        own: BaseException | None = None
        report: tuple[str, bool] | None = None
        try:
            value = fn()
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            own, report = e, (_describe(e), _no_space_errno(e))
        gathered = dist.all_gather_objects((value, report, needed))
        failures = [(r, rep) for r, (_, rep, _) in enumerate(gathered) if rep is not None]
        if not failures:
            return [v for v, _, _ in gathered]
        message = ""
        if dist.info().is_main:
            try:
                message = self._failure_message(step, tmp, failures, total=sum(n for _, _, n in gathered))
            except Exception as e:  # the other ranks wait for a message: always send one
                message = f"checkpoint step {step} could not be saved to {tmp} ({failures[0][1][0]}; {e})"
        raise CheckpointError(dist.broadcast_object(message)) from own

    def _failure_message(self, step: int, tmp: Path, failures: list[tuple[int, tuple[str, bool]]],
                         total: int) -> str:
        """Rank 0, once every rank stopped writing: the error, and the partial folder removed
        if the disk is full (torch's writers often lose the errno: "unexpected pos 704 vs 598",
        so a disk that could not have held the save counts as full too)."""
        partial = _folder_bytes(tmp)
        free = _free_bytes(tmp)
        no_space = any(flag for _, (_, flag) in failures) or free < max(total - partial, 0) + (1 << 20)
        first = "; ".join(f"rank {r}: {text}" for r, (text, _) in failures[:2])
        if not no_space:
            return (f"checkpoint step {step} could not be saved to {tmp} ({first}); the partial folder "
                    f"is left for inspection and removed when training starts again")
        shutil.rmtree(tmp, ignore_errors=True)
        return (f"no space left on {self.root}: needed ~{total / _MB:.1f} MB for checkpoint step {step}, "
                f"{(free + partial) / _MB:.1f} MB were free; the partial save was removed and earlier "
                f"checkpoints are untouched; free space (or lower checkpoint.keep_last, now "
                f"{self.cfg.keep_last}) and resume ({first})")

    def _prune(self, *, keep: Path) -> None:
        """Rank 0: keep `keep` (just saved or resumed, verified) and the keep_last - 1 newest
        older checkpoints that have a manifest and did not fail verification here; remove the
        other older ones. Newer folders (another branch of the run) are left alone."""
        older = [p for p in self.candidates() if _step_of(p) < _step_of(keep)]
        good = [p for p in older if p not in self.failed and (p / MANIFEST).exists()]
        kept = set(good[len(good) - (self.cfg.keep_last - 1):]) if self.cfg.keep_last > 1 else set()
        for old in older:
            if old not in kept:
                logger.info("removing checkpoint %s (checkpoint.keep_last=%d)", old, self.cfg.keep_last)
                shutil.rmtree(old, ignore_errors=True)
                self.failed.discard(old)

    # -- loading ------------------------------------------------------------------------------

    def load(self, path: Path, *, sharded: Mapping[str, Stateful],
             verified: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
        """Restore `sharded` in place (collective); returns (this rank's local state, meta).
        Verifies the checkpoint first unless `verified` (resolve() just did)."""
        info = dist.info()
        if not verified:
            problems = self.verify(path, collective=True)
            if problems:
                raise CheckpointError(f"checkpoint {path} does not verify: {'; '.join(problems)}")
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path / 'meta.json'}: {e}") from e
        try:
            dcp.load(dict(sharded), checkpoint_id=str(path / "state"))
        except (Exception, CheckpointException) as e:
            raise CheckpointError(f"cannot load the model and optimizer state in {path / 'state'}: "
                                  f"{_describe(e)}") from e
        same_world = meta["world_size"] == info.world_size
        source = path / f"rank_{info.rank if same_world else 0}.pt"
        local: dict[str, Any] = {}
        problem = None
        try:
            local = torch.load(source, weights_only=True)
        except Exception as e:  # every rank raises together, not only the one whose file is bad
            problem = f"cannot load {source}: {type(e).__name__}: {e}"
        problems = [p for p in dist.all_gather_objects(problem) if p is not None]
        if problems:
            raise CheckpointError("; ".join(problems))
        local["same_world"] = same_world
        if not same_world:
            logger.warning("resuming a %d-process checkpoint with %d processes: model and optimizer "
                           "state are resharded exactly; data order and sampling seeds are not "
                           "bitwise those of an uninterrupted run", meta["world_size"], info.world_size)
        logger.info("resumed from %s (step %d)", path, meta["step"])
        return local, meta
