"""Importing the plugin keeps torch's weights-only loading on and lets fairseq checkpoints through."""
import argparse
import collections
import pickle

import numpy as np
import pytest
import torch

import fluence_fairseq  # noqa: F401  (installs the safe globals and the numpy shim)
import fluence_fairseq.compat


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


# --------------------------------------------------------------- the data paths of translation and LM, on numpy 2
def _task_and_args(argv):
    from fairseq import options, tasks

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(a) for a in argv])
    return tasks.setup_task(args), args


def _all_batches(task, split, args, epoch=1):
    task.load_dataset(split, epoch=epoch)
    dataset = task.dataset(split)
    iterator = task.get_batch_iterator(dataset, max_tokens=args.max_tokens, max_sentences=args.batch_size,
                                       max_positions=(1024, 1024), ignore_invalid_inputs=False,
                                       required_batch_size_multiple=1, epoch=epoch)
    return dataset, list(iterator.next_epoch_itr(shuffle=True))


def test_bucket_boundaries_match_the_lower_percentiles():
    from fairseq.data import data_utils

    sizes = np.array([5, 1, 9, 3, 3, 7, 2, 8])
    assert data_utils.get_buckets is fluence_fairseq.compat.bucket_boundaries
    # the lower 25/50/75/100 percentiles of the sorted sizes 1 2 3 3 5 7 8 9
    np.testing.assert_array_equal(data_utils.get_buckets(sizes, 4), [2, 3, 7, 9])


@pytest.mark.parametrize("buckets", [0, 4])
def test_translation_batches_cover_every_sentence_with_and_without_buckets(translation_bin, buckets):
    task, args = _task_and_args([translation_bin, "--task", "translation", "--arch", "transformer",
                                 "--num-batch-buckets", buckets, "--max-tokens", 200, "--cpu"])
    dataset, batches = _all_batches(task, "train", args)
    assert sum(b["nsentences"] for b in batches) == len(dataset) == 120
    if buckets:
        edges = {int(w) for w in dataset.src.buckets}
        assert 1 < len(edges) <= buckets and max(edges) == dataset.src.sizes.max()
        # every source batch is padded to one of the bucket widths
        assert {b["net_input"]["src_tokens"].size(1) for b in batches} <= edges


@pytest.mark.parametrize("mode", ["none", "complete", "complete_doc", "eos"])
def test_lm_batches_cover_every_token_in_each_sample_break_mode(lm_bin, mode):
    task, args = _task_and_args([lm_bin, "--task", "language_modeling", "--arch", "transformer_lm",
                                 "--sample-break-mode", mode, "--tokens-per-sample", 64, "--max-tokens", 256,
                                 "--cpu"])
    dataset, batches = _all_batches(task, "valid", args)
    corpus_tokens = int(task.dataset("valid").dataset.dataset.sizes.sum()) if hasattr(
        task.dataset("valid").dataset, "dataset") else None
    targets = sum(int(b["target"].ne(task.dictionary.pad()).sum()) for b in batches)
    assert targets == int(dataset.sizes.sum())
    if corpus_tokens is not None:
        assert targets == corpus_tokens


def test_lm_sharded_data_reads_one_shard_per_epoch(lm_bin, tmp_path):
    import shutil

    shard = tmp_path / "shard1"
    shutil.copytree(lm_bin, shard)
    (shard / "valid.bin").write_bytes((lm_bin / "valid.bin").read_bytes())
    task, args = _task_and_args([f"{lm_bin}:{shard}", "--task", "language_modeling", "--arch", "transformer_lm",
                                 "--tokens-per-sample", 64, "--max-tokens", 256, "--cpu"])
    for epoch in (1, 2):
        dataset, batches = _all_batches(task, "train", args, epoch=epoch)
        assert sum(int(b["ntokens"]) for b in batches) == int(dataset.sizes.sum()) > 0


@pytest.mark.parametrize("max_tokens,max_sentences,multiple", [(None, None, 8), (None, 3, 8), (100, None, 8),
                                                              (37, None, 4), (None, 5, 1)])
def test_batch_by_size_keeps_every_index(max_tokens, max_sentences, multiple):
    from fairseq.data import data_utils

    sizes = np.random.default_rng(0).integers(1, 12, size=203)
    indices = np.argsort(sizes, kind="stable").astype(np.int64)
    batches = data_utils.batch_by_size(indices, lambda i: int(sizes[i]), num_tokens_vec=sizes[indices],
                                       max_tokens=max_tokens, max_sentences=max_sentences,
                                       required_batch_size_multiple=multiple)
    assert np.array_equal(np.concatenate(batches), indices)  # all of them, once, in order
    for batch in batches:
        if max_sentences:
            assert len(batch) <= max_sentences
        if max_tokens:
            assert len(batch) * sizes[batch].max() <= max_tokens
