"""Make fairseq 0.12 usable on torch >= 2.6 and numpy 2, on import, without environment variables.

* torch >= 2.6 loads checkpoints with ``weights_only=True``. fairseq checkpoints of legacy (argparse) models
  pickle an ``argparse.Namespace``; checkpoints trained with ``--eval-bleu`` also pickle numpy arrays. We allow
  exactly those globals, so weights-only protection stays on for everything else.
* numpy 2 removed ``np.compat``; fairseq's ``TokenBlockDataset`` (LM ``--sample-break-mode eos``) and
  ``LanguagePairDataset`` (``--num-batch-buckets``) still read ``np.compat.long``.
* numpy 2.4 removed ``np.percentile(interpolation=)``, which fairseq's ``get_buckets`` passes
  (``--num-batch-buckets`` for translation, ``BucketPadLengthDataset``): we give it ``method=`` instead, the same
  "lower" percentile. (``np.int`` in fairseq's wav2vec span masking is left alone: no text data path reaches it.)
* fairseq's ``import_user_module`` finds an installed plugin as ``site-packages/fairseq/../fluence_fairseq`` and,
  when the package is already imported, compares that unnormalised spelling (or a symlink's) with the package's
  ``__path__``: the natural ``import fluence_fairseq`` then ``from_pretrained(..., user_dir="fluence_fairseq")`` (or
  ``parse_args_and_arch`` with ``--user-dir``) failed with "not globally unique". Once the plugin is imported, a
  ``--user-dir`` that is the same directory under another spelling counts as imported; a different copy of the
  plugin is still refused by fairseq.
* fairseq main (and so ve-fairseq 0.12.3) drops the last batch whenever its size is not a multiple of
  ``--required-batch-size-multiple`` (8 by default): ``fairseq-generate --beam 5`` on 20 sentences translated 16,
  and training loses up to 7 samples per epoch, silently (fairseq#5036). We keep that batch, as fairseq 0.12.2 did.
* ``fairseq-eval-lm`` drops every block longer than the model's positions without a word (a model trained with
  ``--tokens-per-sample 64`` scored with the default 1024 printed "Evaluated 0 tokens ... Perplexity: 1.00" and
  exited 0). The language-modelling task's ``eval_lm_dataloader`` now refuses such blocks, naming the flag.
* fairseq's default ``--ddp-backend c10d`` (and ``pytorch_ddp``) hands torch's ``DistributedDataParallel``
  ``device_ids=[device_id]``, which torch refuses for a model on the CPU. torch's DDP runs on CPU with gloo when
  given no device ids, so on CPU we build it that way (same options otherwise); GPUs are untouched.
* ``--bf16`` implies ``--tpu`` in fairseq 0.12: without torch_xla fairseq fails with "'NoneType' object has no
  attribute 'xla_device'". We stop with a message naming the working choices instead.
* fairseq's ``load_checkpoint_to_cpu`` is wrapped so that a checkpoint it cannot read is named and described, and
  a truncated or foreign binarised split is named as it opens (:mod:`.checkpoints`).
"""
import argparse
import os
import types

import numpy as np
import torch


def replace_once(owner, name: str, make_wrapper) -> None:
    """Put ``make_wrapper(original)`` in place of ``owner.name``, once: installing again keeps the first wrapper
    (every fix here and in :mod:`.checkpoints` goes through this, so importing twice never wraps twice)."""
    original = getattr(owner, name)
    if getattr(original, "_fluence_wrapper", False):
        return
    wrapper = make_wrapper(original)
    wrapper._fluence_wrapper = True
    setattr(owner, name, wrapper)


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


def bucket_boundaries(sizes, num_buckets):
    """fairseq's ``data_utils.get_buckets``: the distinct lower percentiles splitting ``sizes`` into
    ``num_buckets`` groups, without the ``interpolation=`` keyword numpy 2.4 removed."""
    edges = np.percentile(sizes, np.linspace(0, 100, num_buckets + 1), method="lower")
    return np.unique(edges[1:])


def _patch_buckets():
    from fairseq.data import bucket_pad_length_dataset, data_utils

    for module in (data_utils, bucket_pad_length_dataset):
        module.get_buckets = bucket_boundaries


def _fairseq_user_dir(user_dir: str) -> str:
    """The directory fairseq's ``import_user_module`` resolves ``--user-dir`` to (relative to the working
    directory, else to fairseq's own directory or its parent)."""
    import fairseq

    path = os.path.abspath(user_dir)
    if not os.path.exists(path):
        fairseq_dir = os.path.dirname(fairseq.__file__)
        for candidate in (os.path.join(fairseq_dir, user_dir), os.path.join(fairseq_dir, "..", user_dir)):
            if os.path.exists(candidate):
                return candidate
    return path


def _same_directory_counts_as_imported(original):
    import sys


    def import_user_module(args):
        user_dir = getattr(args, "user_dir", None)
        if user_dir is not None:
            path = _fairseq_user_dir(user_dir)
            module = sys.modules.get(os.path.basename(os.path.normpath(path)))
            if module is not None and os.path.isdir(path) and any(
                    os.path.isdir(p) and os.path.samefile(path, p) for p in getattr(module, "__path__", [])):
                return  # this very directory is imported already, under another spelling
        return original(args)

    return import_user_module


def _keeping_the_last_batch(original):

    def batch_by_size(indices, num_tokens_fn, num_tokens_vec=None, max_tokens=None, max_sentences=None,
                      required_batch_size_multiple=1, fixed_shapes=None):
        batches = original(indices, num_tokens_fn, num_tokens_vec=num_tokens_vec, max_tokens=max_tokens,
                           max_sentences=max_sentences, required_batch_size_multiple=required_batch_size_multiple,
                           fixed_shapes=fixed_shapes)
        if fixed_shapes is not None:
            return batches  # fixed shapes leave out what fits none of them, by design
        indices = np.asarray(indices if isinstance(indices, np.ndarray) else list(indices), dtype=np.int64)
        if sum(len(b) for b in batches) == len(indices):
            return batches
        seen = np.concatenate(batches) if len(batches) else np.zeros(0, dtype=np.int64)
        dropped = indices[~np.isin(indices, seen)]  # the last batch, in order
        return list(batches) + [dropped]

    return batch_by_size


def _check_eval_blocks(dataset, max_positions, tokens_per_sample) -> None:
    limit = max_positions[0] if isinstance(max_positions, (tuple, list)) else max_positions
    sizes = getattr(dataset, "sizes", None)
    if limit is None or sizes is None or len(sizes) == 0:
        return
    too_long = int((np.asarray(sizes) > limit).sum())
    if too_long:
        raise ValueError(
            f"fairseq-eval-lm: {too_long} of {len(sizes)} blocks are longer than the model's {limit} positions, and "
            f"fairseq would skip them without scoring (blocks of --tokens-per-sample {tokens_per_sample}). Pass "
            f"--tokens-per-sample {limit} or less (add --context-window N to give every scored token N tokens of "
            "context)")


def _refusing_blocks_too_long(original):

    def eval_lm_dataloader(self, dataset, max_tokens=36000, batch_size=None, max_positions=None, *args, **kwargs):
        _check_eval_blocks(dataset, max_positions, getattr(self.args, "tokens_per_sample", None))
        return original(self, dataset, max_tokens, batch_size, max_positions, *args, **kwargs)

    return eval_lm_dataloader


def _cpu_ddp_without_device_ids(original):
    from fairseq.models import distributed_fairseq_model as dfm

    def DistributedFairseqModel(args, model, process_group, device):
        on_cpu = torch.device(device).type == "cpu"
        if on_cpu and not getattr(args, "tpu", False) and args.ddp_backend in {"c10d", "pytorch_ddp"}:
            if getattr(args, "ddp_comm_hook", "none") == "fp16":
                raise ValueError("--ddp-comm-hook fp16 compresses gradients for GPUs; on CPU leave it out")
            wrapped = torch.nn.parallel.DistributedDataParallel(
                module=model.to(device), device_ids=None, output_device=None,
                broadcast_buffers=args.broadcast_buffers, bucket_cap_mb=args.bucket_cap_mb,
                process_group=process_group, find_unused_parameters=args.find_unused_parameters,
                gradient_as_bucket_view=args.gradient_as_bucket_view,
            )
            return dfm.ModuleProxyWrapper(wrapped)
        return original(args, model, process_group, device)

    return DistributedFairseqModel


def _alignment_needs_cross_weights(original):
    """``--print-alignment`` reads the cross-attention weights of every decoding step; fairseq crashes with an
    IndexError deep in the generator when they are None. Refuse such a model up front, naming the fix."""

    def __init__(self, models, *args, **kwargs):
        from .modules.attention_base import FluenceAttention

        for model in models:
            if getattr(model, "full_context_alignment", False):
                continue  # aligned by a separate forward pass, not from the decoding steps
            for name, module in model.named_modules():
                if isinstance(module, FluenceAttention) and module.cross and not (
                        module.weights_by_default and module.forms_weights):
                    raise ValueError(
                        f"--print-alignment reads the cross-attention weights of every decoding step, but {name} "
                        f"({type(module).__name__}) returns none: its weights are not a byproduct of its math. "
                        "Generate without --print-alignment, or align with a model whose cross attention is "
                        "softmax or an entmax (--cross-attention softmax)")
        original(self, models, *args, **kwargs)

    return __init__


def _tpu_device_or_a_clear_error(original):

    def get_tpu_device():
        try:
            import torch_xla.core.xla_model  # noqa: F401
        except ImportError:
            raise RuntimeError(
                "--bf16 (and --memory-efficient-bf16) in fairseq 0.12 implies --tpu, which needs torch_xla and a "
                "TPU; it is not installed here. On CPU train in float32 (leave out --bf16); on a GPU use --fp16"
            ) from None
        return original()

    return get_tpu_device


def install():
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(SAFE_GLOBALS)
    if not hasattr(np, "compat"):
        np.compat = types.SimpleNamespace(long=int, unicode=str, basestring=str)
    elif not hasattr(np.compat, "long"):
        np.compat.long = int
    _patch_buckets()
    import fairseq.models
    from fairseq import utils
    from fairseq.data import data_utils
    from fairseq.models import distributed_fairseq_model
    from fairseq.tasks.language_modeling import LanguageModelingTask

    replace_once(data_utils, "batch_by_size", _keeping_the_last_batch)
    replace_once(LanguageModelingTask, "eval_lm_dataloader", _refusing_blocks_too_long)
    replace_once(utils, "import_user_module", _same_directory_counts_as_imported)
    replace_once(distributed_fairseq_model, "DistributedFairseqModel", _cpu_ddp_without_device_ids)
    fairseq.models.DistributedFairseqModel = distributed_fairseq_model.DistributedFairseqModel  # the name trainers use
    replace_once(utils, "get_tpu_device", _tpu_device_or_a_clear_error)
    from fairseq.sequence_generator import SequenceGeneratorWithAlignment

    replace_once(SequenceGeneratorWithAlignment, "__init__", _alignment_needs_cross_weights)
    from .checkpoints import guard_binarised_data, guard_fairseq_loading

    guard_fairseq_loading()
    guard_binarised_data()
