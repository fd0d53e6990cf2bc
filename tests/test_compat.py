"""Importing the plugin keeps torch's weights-only loading on and lets fairseq checkpoints through."""
import argparse
import collections
import pickle

import numpy as np
import pytest
import torch

import fluence_fairseq  # noqa: F401  (installs the safe globals and the numpy shim)


def test_fairseq_style_checkpoint_with_eval_bleu_metrics_loads_weights_only(tmp_path):
    checkpoint = {
        "cfg": {"model": argparse.Namespace(arch="transformer_adaptive_span_tiny", attn_span=32)},
        "model": collections.OrderedDict(w=torch.ones(2)),
        # what --eval-bleu leaves in extra_state["metrics"]
        "extra_state": {"counts": np.array([3, 2, 1], dtype=np.int64), "score": np.array([0.5, 1.5])},
    }
    path = tmp_path / "checkpoint.pt"
    torch.save(checkpoint, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["cfg"]["model"].attn_span == 32
    np.testing.assert_array_equal(loaded["extra_state"]["counts"], [3, 2, 1])


class NotAllowed:
    pass


def test_weights_only_protection_stays_on_for_everything_else(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": NotAllowed()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_numpy_compat_shim_for_fairseq_data_paths():
    assert np.compat.long is int
