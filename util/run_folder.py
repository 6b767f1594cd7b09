"""The run folder, ``<checkpoints_dir>/<name>/``: the one module that knows its layout.

What a run folder holds::

    train_opt.json            every option of the run, for code (format below); train_opt.txt for people
    <label>_net_<N>.pth       network N (G, D; CycleGAN: G_A, G_B, D_A, D_B) of checkpoint <label>: a plain state dict,
                              named and keyed as upstream pix2pix names them
    <label>_train_state.pth   schedules, random-generator states and (for latest and best, or every
                              label with --save_optimizer_every_epoch) optimisers
    <label>_checkpoint.json   the manifest of checkpoint <label>: where training continues, and the
                              size and SHA-256 of each file of the set; written last
    .lock                     held by the live training run (see RunLock)

Checkpoint labels: ``latest``, ``best`` (best validation MAE), an epoch number, or ``iter_<N>``.

**One save is one unit.** :func:`save_checkpoint` writes every file of a set under a
temporary name, keeps hard links to the previous set in ``.<label>.previous/``, renames the
new files into place and commits by renaming the manifest last. :func:`open_checkpoint`
checks every file against the manifest; a set that a kill interrupted between the renames
is recognised and the previous set, whole, is read from ``.<label>.previous/``. A set that
matches neither is refused with a message saying which file does not match. Nothing a
reader can see is ever a mix of two saves.

``train_opt.json`` formats: 1 (before manifests) is the flat dict of options; 2 adds the
key ``"format_version": 2`` to the same dict. Both are read; a newer one is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from util.errors import UserError

logger = logging.getLogger(__name__)

OPTIONS_JSON = "train_opt.json"
OPTIONS_FORMAT = 2
LATEST, BEST = "latest", "best"
LOCK_FILE = ".lock"
_PARTIAL = ".partial-"  # temporary files: .<final name>.partial-<pid>
MANIFEST_FORMAT = 1

# Options that rebuild the generator and the slices it was trained on (inference, test, export).
GENERATOR_OPTIONS = (
    "input_nc", "output_nc", "ngf", "netG", "norm", "no_dropout", "residual", "init_type", "init_gain",
    "axial_slice", "slice_axis", "resize_to", "intensity", "hu_min", "hu_max", "context_slices",
)
# The breathing phases a generator makes (data/phases.py), beside GENERATOR_OPTIONS; a run
# saved before they existed lacks them and loads with these values: phase 0 alone.
PHASE_OPTION_DEFAULTS = {"phases": "0", "phase_conditioning": "output", "num_phases": 1, "phase_list": [0]}
# Options that define the model as a whole: a run folder's train_opt.json supplies them as
# defaults at test time and on resume; an explicit flag still wins.
MODEL_DEFINING_OPTIONS = (
    *GENERATOR_OPTIONS, "model", "netD", "ndf", "n_layers_D", "gan_mode", "direction",
    "phases", "phase_conditioning", "num_phases",
)


def phase_options(options: dict) -> dict:
    """The phase options of a run's saved ``options`` (:data:`PHASE_OPTION_DEFAULTS` for what it lacks)."""
    return {key: options.get(key, default) for key, default in PHASE_OPTION_DEFAULTS.items()}


def phase_outputs(options: dict) -> bool:
    """Whether the generator has one output channel per phase (``--phase_conditioning output``
    with several phases): then ``--residual`` adds the input slice to every output channel."""
    values = phase_options(options)
    return values["phase_conditioning"] == "output" and len(values["phase_list"]) > 1


class CheckpointError(UserError, FileNotFoundError):
    """A run folder or checkpoint that is missing, damaged, in use, or does not fit the network.

    ``str(err)`` starts with the file or folder at fault.
    """


# -- names --------------------------------------------------------------------------------
def checkpoint_label(epoch: str | int, load_iter: int = 0) -> str:
    """The label ``--epoch``/``--load_iter`` name: ``iter_<N>`` when ``load_iter`` > 0, else ``epoch``."""
    return f"iter_{load_iter}" if load_iter and load_iter > 0 else str(epoch)


def network_file(label: str | int, net_name: str) -> str:
    """``latest``, ``G`` -> ``latest_net_G.pth`` (upstream's name)."""
    return f"{label}_net_{net_name}.pth"


# The networks whose file marks a checkpoint set of a run: pix2pix's G, or CycleGAN's G_A.
GENERATOR_NETWORKS = ("G", "G_A")


def generator_file(folder: Path, label: str | int) -> Path:
    """The file that marks checkpoint ``label`` in ``folder``: ``<label>_net_G.pth`` (pix2pix) or
    ``<label>_net_G_A.pth`` (CycleGAN), whichever exists; the first if neither does."""
    candidates = [Path(folder) / network_file(label, name) for name in GENERATOR_NETWORKS]
    return next((path for path in candidates if path.is_file()), candidates[0])


def train_state_file(label: str | int) -> str:
    return f"{label}_train_state.pth"


def manifest_file(label: str | int) -> str:
    return f"{label}_checkpoint.json"


def check_run_name(name: str) -> None:
    """Refuse a run name that would leave ``--checkpoints_dir`` (``..``, a path, an absolute name).

    Raises:
        ValueError: with the reason.
    """
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"--name {name!r}: a run name is one folder name inside --checkpoints_dir (no '/', '..' or empty)")


# -- options ------------------------------------------------------------------------------
def save_options(folder: Path, options: dict) -> Path:
    """Write ``train_opt.json`` (format :data:`OPTIONS_FORMAT`) atomically; infinities become null."""
    values = {k: (None if v == float("inf") else v) for k, v in options.items()}
    values["format_version"] = OPTIONS_FORMAT
    path = Path(folder) / OPTIONS_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_text_atomically(path, json.dumps(values, indent=2, sort_keys=True) + "\n")
    return path


def load_options(folder: Path) -> dict | None:
    """The options a run was trained with, or None if the folder has no ``train_opt.json``.

    Raises:
        CheckpointError: the file is unreadable, or written by a newer version.
    """
    path = Path(folder) / OPTIONS_JSON
    if not path.is_file():
        return None
    try:
        values = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); delete it or pass every model flag explicitly") from err
    if not isinstance(values, dict):
        raise CheckpointError(f"{path}: not a dict of options")
    version = values.pop("format_version", 1)
    if not isinstance(version, int) or version > OPTIONS_FORMAT:
        raise CheckpointError(f"{path}: format {version!r} is newer than this version reads ({OPTIONS_FORMAT}); update the code")
    return values


# -- checkpoint sets ----------------------------------------------------------------------
@dataclass
class Checkpoint:
    """A checkpoint set that was found whole.

    Attributes:
        label: ``latest``, ``best``, an epoch or ``iter_<N>``.
        files: role (``net_G``, ``net_D``, ``train_state``) -> the file to read.
        counters: where training continues: ``epoch`` (epochs complete), ``next_epoch``,
            ``next_step`` (steps of ``next_epoch`` already done), ``total_iters`` (samples
            seen), and whatever else the trainer stored (``best_val_mae_hu``).
        verified: the files were checked against a manifest (False for sets saved before manifests).
        train_state: what the trainer loaded from the ``train_state`` file (filled by the model).
    """

    label: str
    files: dict[str, Path]
    counters: dict = field(default_factory=dict)
    verified: bool = True
    train_state: dict = field(default_factory=dict)


def save_checkpoint(folder: Path, label: str | int, networks: dict[str, dict], train_state: dict | None,
                    counters: dict) -> None:
    """Write checkpoint ``label`` as one unit (see the module docstring).

    Args:
        folder: the run folder.
        label: checkpoint label.
        networks: network name (``G``) -> state dict (tensors are copied to the CPU).
        train_state: what ``<label>_train_state.pth`` holds, or None for no such file.
        counters: where training continues (see :class:`Checkpoint`).

    Raises:
        CheckpointError: a file cannot be written (disk full, read-only folder); the
            previous set of ``label`` is left as it was and no temporary file stays.
    """
    folder = Path(folder)
    label = str(label)
    contents: dict[str, object] = {
        f"net_{name}": {k: v.detach().cpu() for k, v in state.items()} for name, state in networks.items()
    }
    if train_state is not None:
        contents["train_state"] = train_state
    names = {role: _role_file(label, role) for role in contents}
    temporaries: list[Path] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_leftovers(folder)
        _check_free_space(folder, label, contents)
        entries = {}
        for role, obj in contents.items():
            temporary = _temporary(folder / names[role])
            temporaries.append(temporary)
            _torch_save(obj, temporary)
            entries[names[role]] = {"bytes": temporary.stat().st_size, "sha256": _sha256(temporary)}
        manifest = {"format": MANIFEST_FORMAT, "label": label, "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "counters": counters, "files": entries}
        manifest_temporary = _temporary(folder / manifest_file(label))
        temporaries.append(manifest_temporary)
        manifest_temporary.write_text(json.dumps(manifest, indent=2) + "\n")
        _fsync(manifest_temporary)

        previous = _keep_previous(folder, label)
        for role in contents:
            os.replace(temporaries[list(contents).index(role)], folder / names[role])
        os.replace(manifest_temporary, folder / manifest_file(label))  # the commit
        # Files of the previous set that the new one does not have (a train state kept
        # every epoch before, not now) would look like part of the new set.
        for stale in _set_files(folder, label) - set(names.values()):
            (folder / stale).unlink(missing_ok=True)
        (folder / f"{label}_train_state.json").unlink(missing_ok=True)  # counters as runs before manifests kept them
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
    except (OSError, RuntimeError) as err:
        # torch.save reports a failed write as RuntimeError ("... failed writing file ...").
        raise CheckpointError(
            f"{folder / names.get('net_G', manifest_file(label))}: cannot save checkpoint '{label}' "
            f"({_reason(err)}); the previous '{label}', if any, is kept"
        ) from err
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)


def open_checkpoint(folder: Path, label: str | int, verify: bool = True) -> Checkpoint:
    """Find checkpoint ``label`` whole, checking its files against the manifest.

    A set whose save was interrupted between its renames is read from the hard links to
    the previous set (``.<label>.previous/``). A folder without a manifest for ``label``
    (runs saved before manifests, upstream checkpoints) gives its files unverified, with
    the counters of the old ``<label>_train_state.json`` if there is one.

    Raises:
        CheckpointError: the generator is missing, the manifest is unreadable, or the files
            match neither the manifest nor the previous set; the message names the file.
    """
    folder = Path(folder)
    label = str(label)
    path = folder / manifest_file(label)
    if not path.is_file():
        return _unverified_checkpoint(folder, label)
    manifest = _read_manifest(path)
    problem = _mismatch(folder, manifest) if verify else None
    if problem is None:
        return Checkpoint(label, _files_of(folder, manifest), manifest.get("counters", {}))
    previous = folder / f".{label}.previous"
    if previous.is_dir() and (previous / manifest_file(label)).is_file():
        old_manifest = _read_manifest(previous / manifest_file(label))
        if old_manifest == manifest and _mismatch(previous, manifest) is None:
            logger.warning("checkpoint '%s': the last save was interrupted; using the set before it, which is whole", label)
            return Checkpoint(label, _files_of(previous, manifest), manifest.get("counters", {}))
    raise CheckpointError(
        f"{problem}: does not match {path.name} (an interrupted save or a damaged file); "
        f"resume from another checkpoint with --epoch (this run has: {', '.join(list_labels(folder)) or 'none'})"
    )


def list_labels(folder: Path) -> list[str]:
    """The labels of the generators in ``folder``, e.g. ``["5", "10", "best", "latest"]``."""
    labels = {p.name.removesuffix(f"_net_{net}.pth") for net in GENERATOR_NETWORKS
              for p in Path(folder).glob(f"*_net_{net}.pth") if not p.name.startswith(".")}
    return sorted(labels, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s))


def holds_checkpoints(folder: Path) -> bool:
    return bool(list_labels(folder))


def remove_leftovers(folder: Path) -> None:
    """Delete temporary files of saves by processes that are gone, and ``.previous`` sets of
    labels whose manifest is whole again."""
    folder = Path(folder)
    for temporary in folder.glob(f".*{_PARTIAL}*"):
        pid = temporary.name.rpartition(_PARTIAL)[2]
        if not pid.isdigit() or int(pid) == os.getpid() or not _process_alive(int(pid)):
            if temporary.is_dir():
                shutil.rmtree(temporary, ignore_errors=True)
            else:
                temporary.unlink(missing_ok=True)
    for previous in folder.glob(".*.previous"):
        label = previous.name[1 : -len(".previous")]
        manifest = folder / manifest_file(label)
        if manifest.is_file():
            with contextlib.suppress(CheckpointError):
                if _mismatch(folder, _read_manifest(manifest)) is None:
                    shutil.rmtree(previous, ignore_errors=True)


def clear_run(folder: Path) -> list[str]:
    """Remove what a previous run left in ``folder`` (checkpoints, logs, pages, options); returns the names removed.

    Files this module does not know are left alone.
    """
    folder = Path(folder)
    removed = []
    patterns = ("*_net_*.pth", "*_train_state.pth", "*_train_state.json", "*_checkpoint.json", "loss_log.txt",
                "train_opt.txt", OPTIONS_JSON, f".*{_PARTIAL}*", ".*.previous", "web")
    for pattern in patterns:
        for path in folder.glob(pattern):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path.name)
    return removed


# -- the lock -----------------------------------------------------------------------------
class RunLock:
    """One live training run per folder: an exclusive ``flock`` on ``<folder>/.lock``.

    The operating system releases the lock when the process ends, however it ends, so a
    killed run never leaves a stale lock. The file says who holds it, for the message a
    second run prints.
    """

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise CheckpointError naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip()
            os.close(descriptor)
            raise CheckpointError(
                f"{self.path.parent}: in use by another training run ({_describe_holder(holder)}); "
                "wait for it to end, or choose another --name"
            ) from None
        os.ftruncate(descriptor, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)}
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        self._descriptor = descriptor

    def check_free(self) -> None:
        """Raise CheckpointError if another process holds the lock; take nothing."""
        if not self.path.is_file():
            return
        self.acquire()
        self.release()

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing the descriptor releases the flock
            self._descriptor = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"process {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that did not say which"


# -- helpers ------------------------------------------------------------------------------
def _role_file(label: str, role: str) -> str:
    if role.startswith("net_"):
        return network_file(label, role.removeprefix("net_"))
    if role == "train_state":
        return train_state_file(label)
    raise ValueError(f"unknown checkpoint file role {role!r}")


def _file_role(label: str, name: str) -> str:
    if name == train_state_file(label):
        return "train_state"
    return "net_" + name.removeprefix(f"{label}_net_").removesuffix(".pth")


def _set_files(folder: Path, label: str) -> set[str]:
    return {p.name for p in folder.glob(f"{label}_net_*.pth")} | (
        {train_state_file(label)} if (folder / train_state_file(label)).is_file() else set()
    )


def _files_of(folder: Path, manifest: dict) -> dict[str, Path]:
    label = manifest["label"]
    return {_file_role(label, name): folder / name for name in manifest["files"]}


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
        return manifest
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{path}: damaged checkpoint manifest ({err}); resume from another checkpoint with --epoch") from err


def _mismatch(folder: Path, manifest: dict) -> Path | None:
    """The first file of ``manifest`` that is missing or differs in ``folder``, or None."""
    for name, expected in manifest["files"].items():
        path = folder / name
        try:
            if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
                return path
        except OSError:
            return path
    return None


def _unverified_checkpoint(folder: Path, label: str) -> Checkpoint:
    generator = generator_file(folder, label)
    if not generator.is_file():
        raise CheckpointError(
            f"{generator}: checkpoint not found (this run has: {', '.join(list_labels(folder)) or 'none'}; "
            "check --name, --epoch and --checkpoints_dir)"
        )
    files = {_file_role(label, p.name): p for p in folder.glob(f"{label}_net_*.pth")}
    if (folder / train_state_file(label)).is_file():
        files["train_state"] = folder / train_state_file(label)
    counters = {}
    old_counters = folder / f"{label}_train_state.json"  # before manifests: {"epoch", "total_iters"}
    if old_counters.is_file():
        try:
            saved = json.loads(old_counters.read_text())
            counters = {"epoch": int(saved["epoch"]), "next_epoch": int(saved["epoch"]) + 1, "next_step": 0,
                        "total_iters": int(saved["total_iters"])}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{old_counters}: damaged ({_reason(err)}); resume from another checkpoint with --epoch") from err
    return Checkpoint(label, files, counters, verified=False)


def _keep_previous(folder: Path, label: str) -> Path | None:
    """Hard links to the current set of ``label`` (and its manifest) in ``.<label>.previous/``.

    A ``.previous`` folder that is already there survived :func:`remove_leftovers`: the set
    in place does not match its manifest (an earlier save was interrupted) and the folder
    holds the last whole set, so it is kept as it is.
    """
    manifest = folder / manifest_file(label)
    previous = folder / f".{label}.previous"
    if previous.is_dir():
        return previous
    if not manifest.is_file():
        return None
    partial = _temporary(previous)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        for name in [*sorted(_set_files(folder, label)), manifest.name]:
            try:
                os.link(folder / name, partial / name)
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                shutil.copy2(folder / name, partial / name)  # a file system without hard links
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(partial, previous)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return previous


def _check_free_space(folder: Path, label: str, contents: dict) -> None:
    needed = sum(_tensor_bytes(obj) for obj in contents.values())
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05 + (1 << 20):
        raise OSError(errno.ENOSPC, f"{needed / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free")


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}{_PARTIAL}{os.getpid()}")


def _write_text_atomically(path: Path, text: str) -> None:
    temporary = _temporary(path)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror if not err.filename else f"{err.strerror}: {err.filename}"
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__

