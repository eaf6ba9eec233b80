"""Lets torch >= 2.6 load fairseq checkpoints with ``weights_only=True``.

torch 2.6 made ``torch.load(weights_only=True)`` the default; fairseq-fixed 0.12.3.1 does not pass
``weights_only=False``, so every legacy-architecture checkpoint (its ``cfg["model"]`` is an
``argparse.Namespace``) fails to load in fairseq-train resume, fairseq-generate, -interactive,
-validate and hub loading.  Rather than switching the safety off, we allowlist exactly the
non-tensor globals that fairseq writes (measured on the checkpoints fairseq-train writes):

* ``argparse.Namespace``: legacy ``cfg["model"]``;
* numpy arrays and dtypes: ``--eval-bleu`` meter state in ``extra_state``;
* omegaconf containers, ``typing.Any`` and builtins: distributed resume, where rank 0 broadcasts
  the loaded state to the other ranks through ``torch.load``.
"""
import argparse
import collections
import typing

import numpy as np
import torch

_installed = False


def _numpy_globals():
    """numpy's reconstruct/scalar helpers under both the numpy 1 and numpy 2 module names."""
    from numpy.core import multiarray

    found = []
    for name in ("_reconstruct", "scalar"):
        fn = getattr(multiarray, name, None)
        if fn is None:
            continue
        # a checkpoint written under numpy 2 names numpy._core; under numpy 1, numpy.core
        found += [(fn, f"numpy.core.multiarray.{name}"), (fn, f"numpy._core.multiarray.{name}")]
    found += [np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


def _omegaconf_globals():
    from omegaconf import DictConfig, ListConfig, nodes
    from omegaconf.base import ContainerMetadata, Metadata

    node_types = [getattr(nodes, n) for n in dir(nodes) if n.endswith("Node") and isinstance(getattr(nodes, n), type)]
    return [DictConfig, ListConfig, ContainerMetadata, Metadata] + node_types


def safe_globals():
    """The allowlist: every global a fairseq (or fairseq_ext) checkpoint may reference."""
    from fairseq.distributed.utils import _TensorPlaceholder

    builtins_ = [dict, list, tuple, set, int, float, bool, str, bytes]
    return (
        [argparse.Namespace, typing.Any, collections.defaultdict, collections.OrderedDict, _TensorPlaceholder]
        + builtins_
        + _numpy_globals()
        + _omegaconf_globals()
    )


def install_checkpoint_allowlist():
    """Adds the allowlist to torch's safe globals once; a no-op on torch without weights_only."""
    global _installed
    if _installed or not hasattr(torch.serialization, "add_safe_globals"):
        return
    torch.serialization.add_safe_globals(safe_globals())
    _installed = True


# -- checkpoint guards: atomic copies, damaged checkpoints named, a missing --restore-file refused ------
#
# fairseq writes the first checkpoint of a save atomically (a .tmp file, then a rename) but copies it to
# the others (checkpoint_best.pt, checkpoint_last.pt) with a plain PathManager.copy: a run killed during
# that copy leaves a truncated checkpoint_last.pt, and the automatic resume then fails with a bare
# "OSError: Invalid argument" or a zip error.  The guards below are installed at import, like the
# allowlist, by replacing module attributes fairseq looks up at call time; fairseq's files are untouched.
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import zipfile  # noqa: E402

logger = logging.getLogger(__name__)

_guards_installed = False
COPY_CHUNK_BYTES = 16 * 1024 * 1024


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file cannot be read because it is cut short or corrupt; the message says what to use."""


def _copy_chunks(src, dst) -> None:
    """Copies an open binary file into another (a seam for the tests' interrupted copies)."""
    shutil.copyfileobj(src, dst, COPY_CHUNK_BYTES)


def atomic_copy(src_path: str, dst_path: str) -> None:
    """Copies src_path to dst_path so that dst_path is at every moment either its old file or a full copy.

    The bytes go to a temporary file in dst_path's directory (same file system), are flushed to disk,
    and replace dst_path with one ``os.replace`` (atomic on POSIX and Windows).  An interrupted copy
    leaves dst_path untouched and at worst a ``.copy-tmp`` file beside it.
    """
    tmp_path = f"{dst_path}.copy-tmp"
    try:
        with open(src_path, "rb") as src, open(tmp_path, "wb") as dst:
            _copy_chunks(src, dst)
            dst.flush()
            os.fsync(dst.fileno())
        shutil.copymode(src_path, tmp_path)
        os.replace(tmp_path, dst_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def checkpoint_damage(path: str):
    """Why the checkpoint file at ``path`` is unreadable (a string), or None when it looks whole.

    torch saves checkpoints as zip archives whose directory sits at the very end, so a file cut short
    has no readable directory; a whole archive with a corrupt member fails its CRC check.
    """
    if not os.path.isfile(path):
        return None
    if os.path.getsize(path) == 0:
        return "the file is empty"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"it is not a complete torch archive ({err}; cut short while being written?)"
    if bad is not None:
        return f"its member {bad} fails its checksum"
    return None


def intact_checkpoints(directory: str, exclude: str = None):
    """The checkpoint*.pt files of ``directory`` whose zip directory is readable, newest first.

    Only the archive directory is read (cheap even for large files); a truncated file has none.
    """
    found = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        path = os.path.join(directory, name)
        if not (name.startswith("checkpoint") and name.endswith(".pt")) or not os.path.isfile(path):
            continue
        if exclude is not None and os.path.abspath(path) == os.path.abspath(exclude):
            continue
        try:
            with zipfile.ZipFile(path):
                pass
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            continue
        found.append(path)
    return sorted(found, key=lambda p: (os.path.getmtime(p), p), reverse=True)


def damaged_checkpoint_message(path: str, why: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    intact = intact_checkpoints(directory, exclude=path)
    if intact:
        advice = (
            f"intact checkpoints in {directory}, newest first: {', '.join(os.path.basename(p) for p in intact)}. "
            f"To resume training, move the damaged file away and copy one of them in its place "
            f"(e.g. cp {intact[0]} {os.path.abspath(path)}); to decode or evaluate, pass one of them to --path"
        )
    else:
        advice = f"no intact checkpoint*.pt is left in {directory}: restart training from scratch or another copy"
    return f"checkpoint {path} is damaged: {why}. {advice}"


def _guard_load_checkpoint_to_cpu(load):
    def load_checkpoint_to_cpu(path, *args, **kwargs):
        try:
            return load(path, *args, **kwargs)
        except Exception as err:
            why = checkpoint_damage(path)
            if why is None:
                raise
            raise DamagedCheckpointError(damaged_checkpoint_message(path, why)) from err

    load_checkpoint_to_cpu.__wrapped__ = load
    return load_checkpoint_to_cpu


def missing_restore_file(cfg, suffix):
    """The checkpoint path fairseq-train would try and silently skip (training from scratch), or None.

    Mirrors ``fairseq.checkpoint_utils.load_checkpoint``: an explicit ``--restore-file`` (with the
    trainer's checkpoint suffix), or ``--continue-once`` on a first launch.
    """
    from fairseq.file_io import PathManager

    restore = cfg.restore_file
    if restore == "checkpoint_last.pt":
        last = os.path.join(cfg.save_dir, f"checkpoint_last{suffix or ''}.pt")
        once = getattr(cfg, "continue_once", None)
        if once is not None and not PathManager.exists(last) and not PathManager.exists(once):
            return once, "--continue-once"
        return None
    path = restore.replace(".pt", suffix + ".pt") if suffix is not None else restore
    return (path, "--restore-file") if not PathManager.exists(path) else None


def _guard_load_checkpoint(load):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        missing = missing_restore_file(cfg, getattr(trainer, "checkpoint_suffix", None))
        if missing is not None:
            path, flag = missing
            raise FileNotFoundError(
                f"{flag} {path}: no such file (resolved: {os.path.abspath(path)}); fairseq would train from "
                "scratch instead. Give the path of an existing checkpoint (relative paths are from the "
                "current directory, not --save-dir), or drop the flag to resume from --save-dir."
            )
        return load(cfg, trainer, **passthrough_args)

    load_checkpoint.__wrapped__ = load
    return load_checkpoint


def _guard_copy(copy):
    def copy_file(src_path: str, dst_path: str, overwrite: bool = False):
        from fairseq.file_io import PathManager

        remote = PathManager.path_requires_pathmanager(src_path) or PathManager.path_requires_pathmanager(dst_path)
        if remote or (not overwrite and os.path.exists(dst_path)) or not os.path.isfile(src_path):
            return copy(src_path, dst_path, overwrite=overwrite)
        atomic_copy(src_path, dst_path)
        return True

    copy_file.__wrapped__ = copy
    return copy_file


def install_checkpoint_guards():
    """Atomic PathManager.copy, DamagedCheckpointError on a damaged checkpoint, a missing --restore-file
    refused; installed once."""
    global _guards_installed
    if _guards_installed:
        return
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager

    checkpoint_utils.load_checkpoint_to_cpu = _guard_load_checkpoint_to_cpu(checkpoint_utils.load_checkpoint_to_cpu)
    checkpoint_utils.load_checkpoint = _guard_load_checkpoint(checkpoint_utils.load_checkpoint)
    PathManager.copy = staticmethod(_guard_copy(PathManager.copy))
    _guards_installed = True
