"""Make fairseq 0.12 usable on torch >= 2.6 and numpy 2, on import, without environment variables.

* torch >= 2.6 loads checkpoints with ``weights_only=True``. fairseq checkpoints of legacy (argparse) models
  pickle an ``argparse.Namespace``; checkpoints trained with ``--eval-bleu`` also pickle numpy arrays. We allow
  exactly those globals, so weights-only protection stays on for everything else.
* numpy 2 removed ``np.compat``; fairseq's ``TokenBlockDataset`` (LM ``--sample-break-mode eos``) and
  ``LanguagePairDataset`` (``--num-batch-buckets``) still read ``np.compat.long``.
"""
import argparse
import types

import numpy as np
import torch


def _numpy_safe_globals():
    globs = []
    core = getattr(np, "_core", None) or getattr(np, "core")
    reconstruct = core.multiarray._reconstruct
    globs += [reconstruct, np.ndarray, np.dtype]
    # Checkpoints written under numpy 1.x name the function numpy.core.multiarray._reconstruct.
    globs.append((reconstruct, "numpy.core.multiarray._reconstruct"))
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        # the metric arrays fairseq's translation task logs with --eval-bleu are int64 (counts) and float64
        for name in ("Int64DType", "Float64DType"):
            if hasattr(dtypes, name):
                globs.append(getattr(dtypes, name))
    return globs


SAFE_GLOBALS = [argparse.Namespace] + _numpy_safe_globals()


def install():
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=int, unicode=str, basestring=str)
    elif not hasattr(np.compat, "long"):
        np.compat.long = int
