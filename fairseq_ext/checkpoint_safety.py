"""Lets torch >= 2.6 load fairseq checkpoints with ``weights_only=True``.

torch 2.6 made ``torch.load(weights_only=True)`` the default; fairseq-fixed 0.12.3.1 does not pass
``weights_only=False``, so every legacy-architecture checkpoint (its ``cfg["model"]`` is an
``argparse.Namespace``) fails to load in fairseq-train resume, fairseq-generate, -interactive,
-validate and hub loading.  Rather than switching the safety off, we allowlist exactly the
non-tensor globals that fairseq writes (measured in ../shared/research/ecosystem.md section 3):

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
