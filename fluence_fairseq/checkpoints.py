"""Loading checkpoints (and binarised data) with errors that say which file is wrong, how, and what to do.

torch reports a truncated checkpoint as a bare ``OSError: [Errno 22] Invalid argument`` and random bytes with advice
to set ``weights_only=False``, neither naming the file. :func:`load` (the plugin's commands) and the wrapper that
:mod:`.compat` puts around fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` (``fairseq-generate``, resuming
``fairseq-train``, ``from_pretrained``, ``fluence-attn-score``) look at the file itself when loading fails and
raise :class:`CheckpointError`: empty, truncated, not a PyTorch checkpoint at all, or holding objects outside the
weights-only allow-list.
"""
import os
import pickle
import struct
import zipfile
from typing import Optional

import numpy as np
import torch

#: what to do with a checkpoint that cannot be read
RECOVERY = ("use another checkpoint (checkpoint_best.pt, checkpoint_last.pt or an epoch checkpoint), copy the file "
            "again, or train again; to resume fairseq-train, move the file out of --save-dir or pass "
            "--restore-file with another one")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded; the message names the file, what is wrong and what to do."""


def _kind(path: str) -> str:
    """"empty", "truncated" (a zip archive without its end), "zip" (a complete archive), "pickle" (torch's legacy
    format) or "other"."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(path):
            return "truncated"
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    return "truncated"
        except (zipfile.BadZipFile, OSError, EOFError):
            return "truncated"
        return "zip"
    if head[:1] == b"\x80":  # a pickle protocol marker: torch's legacy (pre-1.6) format
        return "pickle"
    return "other"


def diagnose(path: str, error: BaseException, *, trust_flag: Optional[str] = None) -> Optional[str]:
    """The message for ``error`` raised while loading ``path``; None when the file looks sound and the error is
    not about loading (the caller re-raises it)."""
    if not os.path.exists(path):
        return f"checkpoint {path} does not exist"
    size = os.path.getsize(path)
    kind = _kind(path)
    if kind == "empty":
        return f"checkpoint {path} is empty (0 bytes): its save did not complete; {RECOVERY}"
    if kind == "truncated":
        return (f"checkpoint {path} is truncated or corrupt ({size} bytes; the end of its zip archive is missing "
                f"or damaged, as when a save is interrupted or a copy is incomplete); {RECOVERY}")
    if kind == "other":
        with open(path, "rb") as f:
            head = f.read(8)
        return (f"{path} is not a PyTorch checkpoint (it starts with bytes {head!r}, neither a zip archive nor a "
                f"pickle); check the path, or {RECOVERY}")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower() and trust_flag:
        return (f"checkpoint {path} holds Python objects outside the weights-only allow-list ({first}). Load it "
                f"only if you trust its source: pass {trust_flag}")
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return (f"checkpoint {path} holds Python objects outside the weights-only allow-list ({first}); it was "
                "not written by fairseq with this plugin, or needs a global the plugin does not allow")
    if isinstance(error, (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError)):
        return f"checkpoint {path} is corrupt ({type(error).__name__}: {first}); {RECOVERY}"
    return None


def load(path: str, *, trust: bool = False, trust_flag: Optional[str] = None, prog: str = "fluence") -> dict:
    """A fairseq checkpoint (a dict) on CPU, weights-only unless ``trust``; :class:`CheckpointError` otherwise."""
    from . import compat

    compat.install()  # the globals a weights-only load of an argparse-model checkpoint needs
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as error:
        message = diagnose(path, error, trust_flag=None if trust else trust_flag)
        if message is None:
            raise
        raise CheckpointError(f"{prog}: {message}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{prog}: {path} is not a fairseq checkpoint (a dict), got {type(state).__name__}")
    return state


def guard_fairseq_loading() -> None:
    """Wrap fairseq's ``checkpoint_utils.load_checkpoint_to_cpu`` so that a file it cannot read is named and
    described (every fairseq tool, resume and the hub load checkpoints through it)."""
    from fairseq import checkpoint_utils

    from .compat import replace_once

    replace_once(checkpoint_utils, "load_checkpoint_to_cpu", _naming_unreadable_checkpoints)


def _naming_unreadable_checkpoints(original):
    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        try:
            return original(path, arg_overrides, load_on_all_ranks)
        except Exception as error:
            name = str(path)
            if not os.path.isfile(name) or (_kind(name) == "zip" and not isinstance(error, pickle.UnpicklingError)):
                raise  # no such file (fairseq says so), or a sound file and an error about something else
            raise CheckpointError(diagnose(name, error)) from error

    return load_checkpoint_to_cpu


class CorruptDataError(RuntimeError):
    """A binarised split (``.idx``/``.bin`` from fairseq-preprocess) that cannot be read or is cut short."""


FIX_DATA = "binarise it again with fairseq-preprocess (or restore the file)"
#: what fairseq raises for an index it cannot parse
_INDEX_ERRORS = (struct.error, AssertionError, ValueError, KeyError, EOFError)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def guard_binarised_data() -> None:
    """Check fairseq's splits as they open: a truncated or foreign ``.idx`` (fairseq: a bare ``struct.error``) or a
    ``.bin`` shorter than its index says (fairseq: garbage or a crash at some later step) is named, with the fix."""
    from fairseq.data import indexed_dataset

    from .compat import replace_once

    mmap = indexed_dataset.MMapIndexedDataset
    replace_once(mmap, "_do_init", _checking_mmap_splits)
    # an .idx that is not of the mmap kind falls through to the legacy reader
    replace_once(indexed_dataset.IndexedDataset, "read_index", _checking_legacy_index)
    # fairseq's destructors assume a complete object; after a failed open they would print AttributeErrors
    for owner in (mmap, mmap.Index):
        replace_once(owner, "__del__", _tolerant_del)


def _checking_mmap_splits(original):
    from fairseq.data.indexed_dataset import data_file_path, index_file_path

    def _do_init(self, path):
        try:
            original(self, path)
        except _INDEX_ERRORS as error:
            raise CorruptDataError(f"binarised split {index_file_path(path)} (or its .bin) is truncated or not a "
                                   f"fairseq index ({_first_line(error)}); {FIX_DATA}") from None
        index = self._index
        if len(index):
            needed = int(index._pointers[-1]) + int(index._sizes[-1]) * np.dtype(index.dtype).itemsize
            actual = os.path.getsize(data_file_path(path))
            if actual < needed:
                raise CorruptDataError(f"binarised split {data_file_path(path)} is truncated: {actual} bytes, its "
                                       f"index {index_file_path(path)} needs {needed}; {FIX_DATA}")

    return _do_init


def _checking_legacy_index(original):
    from fairseq.data.indexed_dataset import index_file_path

    def read_index(self, path):
        try:
            return original(self, path)
        except _INDEX_ERRORS as error:
            raise CorruptDataError(f"binarised split {index_file_path(path)} is empty, truncated or not a fairseq "
                                   f"index ({_first_line(error)}); {FIX_DATA}") from None

    return read_index


def _tolerant_del(original):
    def __del__(self):
        if hasattr(self, "_bin_buffer_mmap"):
            original(self)

    return __del__
