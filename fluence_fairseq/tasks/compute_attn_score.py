"""The ``compute_attn_score`` fairseq task: average attention patterns of a trained checkpoint over a data split.

It loads the checkpoint with its own task (``translation``, ``language_modeling``, ...; ``task_overrides`` are
applied to the stored config the way fairseq's ``arg_overrides`` are), so that task loads the split with the
checkpoint's own settings (languages, ``tokens_per_sample``, ``left_pad_source``...). The model runs in eval mode
(dropout off) under ``torch.no_grad()`` with teacher forcing (one full forward per batch, like validation),
batches in data order; :class:`~fluence_fairseq.pruning.collect.AttentionPatternCollector` records the patterns.

Output, per attention type ``T`` (``self-enc``, ``self-dec``, ``enc-dec``; the directory is created):

* ``DIR/T.npy``: float32 array ``(layers, heads, N, N)``, ``N`` = ``max_len``; ``[l, h, i, j]`` is the mean
  probability that query position ``i`` gave key position ``j`` in layer ``l`` (0-based among the layers of that
  type, in model order), head ``h``; 0 where no (i, j) pair was seen. ``np.load(path, allow_pickle=False)`` reads
  it; :func:`fluence_fairseq.pruning.patterns.load_patterns` checks its shape against a model.
* ``DIR/T.json``: ``format_version``, ``layout``, ``shape``, ``sentences`` (sentences seen), ``counts`` (``N x N``
  list: how many sentences had both a real query ``i`` and a real key ``j``, i.e. the denominator of every
  average of that (i, j)), plus ``type``, ``layers`` (the module layer numbers), ``heads``, ``attention`` (the
  attention the model's config names for that role) and ``attention_class``, ``checkpoint``, ``data``,
  ``split``, ``max_len``, ``max_tokens``, ``batch_size``, ``arch``, ``task``, ``batches``.

The command is ``fluence-attn-score`` (:mod:`fluence_fairseq.cli.attn_score`). ``fairseq-validate --task
compute_attn_score`` does not work: fairseq-validate builds the task stored in the checkpoint (its ``--task`` only
adds flags), so this wrapper task never runs. From Python::

    task = fairseq.tasks.setup_task(argparse.Namespace(task="compute_attn_score", data=DATA, attn_checkpoint=CKPT))
    accumulators = task.collect("train", max_tokens=4096)
"""
import ast
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import TASK_REGISTRY, FairseqTask, register_task

from .. import compat
from ..pruning.collect import DEFAULT_MAX_LEN_CAP, AttentionPatternCollector, default_max_len, to_device
from ..pruning.patterns import PatternAccumulator, save_patterns
from ..roles import BY_PATTERN_NAME

@dataclass
class ComputeAttnScoreConfig(FairseqDataclass):
    data: Optional[str] = field(default=None, metadata={"help": "data directory the checkpoint's task reads"})
    attn_checkpoint: Optional[str] = field(default=None, metadata={"help": "checkpoint to measure"})
    attn_types: Optional[str] = field(default=None, metadata={
        "help": "comma-separated attention types: self-enc, self-dec, enc-dec (default: all the model has)"})
    attn_max_len: Optional[int] = field(default=None, metadata={
        "help": f"positions collected (default: the model's max positions, at most {DEFAULT_MAX_LEN_CAP})"})
    attn_out_dir: Optional[str] = field(default=None, metadata={"help": "where save() writes <type>.npy/.json"})
    task_overrides: str = field(default="{}", metadata={
        "help": "dict literal of overrides for the checkpoint's stored config, e.g. {'source_lang': 'de'}"})


class ComputeAttnScoreTask(FairseqTask):
    """``compute_attn_score``: wraps a checkpoint's own task (which loads and batches the data) and its model,
    and records average attention patterns in :meth:`valid_step` (see the module docstring)."""

    def __init__(self, cfg, inner_task: FairseqTask, model: torch.nn.Module, saved_cfg):
        super().__init__(cfg)
        self.inner = inner_task
        self.model = model
        self.saved_cfg = saved_cfg
        self.max_len = int(cfg.attn_max_len) if cfg.attn_max_len else default_max_len(model)
        self.collector: Optional[AttentionPatternCollector] = None
        self._last: Optional[AttentionPatternCollector] = None  # the finished collection save() writes
        self.meta: Dict[str, Any] = {}

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        from fairseq import checkpoint_utils

        compat.install()
        if not cfg.attn_checkpoint:
            raise ValueError("compute_attn_score needs a checkpoint (--attn-checkpoint / --path)")
        overrides = parse_overrides(cfg.task_overrides)
        if cfg.data:
            overrides["data"] = cfg.data
        models, saved_cfg, inner = checkpoint_utils.load_model_ensemble_and_task(
            [cfg.attn_checkpoint], arg_overrides=overrides)
        return cls(cfg, inner, models[0], saved_cfg)

    # the checkpoint's task does the data work
    @property
    def source_dictionary(self):
        return self.inner.source_dictionary

    @property
    def target_dictionary(self):
        return self.inner.target_dictionary

    def max_positions(self):
        return self.inner.max_positions()

    def load_dataset(self, split, combine=False, epoch=1, **kwargs):
        self.inner.load_dataset(split, combine=combine, epoch=epoch, task_cfg=self.saved_cfg.task)

    def dataset(self, split):
        return self.inner.dataset(split)

    def build_model(self, cfg, from_checkpoint=False):
        return self.model

    def batch_iterator(self, split: str, max_tokens=None, batch_size=None, num_workers=0, seed=1):
        from fairseq import utils

        if max_tokens is None and batch_size is None:
            max_tokens = 4096
        self.load_dataset(split)
        return self.inner.get_batch_iterator(
            dataset=self.dataset(split), max_tokens=max_tokens, max_sentences=batch_size,
            max_positions=utils.resolve_max_positions(self.inner.max_positions(), self.model.max_positions()),
            ignore_invalid_inputs=True, seed=seed, num_workers=num_workers,
        ).next_epoch_itr(shuffle=False)

    # recording
    def begin(self, padding_idx: Optional[int] = None) -> AttentionPatternCollector:
        """Install the recorders (model in eval mode); :meth:`valid_step` then records, :meth:`end` stops."""
        if self.collector is not None:
            raise RuntimeError("compute_attn_score: a collection is already running")
        collector = AttentionPatternCollector(self.model, self.max_len, self.cfg.attn_types, padding_idx)
        collector.__enter__()
        self.collector = collector
        return collector

    def end(self) -> Dict[str, PatternAccumulator]:
        collector, self.collector = self.collector, None
        if collector is None:
            raise RuntimeError("compute_attn_score: no collection is running")
        collector.__exit__(None, None, None)
        self._last = collector
        return collector.accumulators

    def valid_step(self, sample, model, criterion=None):
        if self.collector is None:
            raise RuntimeError("compute_attn_score: call begin() before valid_step()")
        if model is not self.model:
            raise ValueError("compute_attn_score records the model it loaded; pass task.model")
        self.collector.record(sample)
        n = int(sample.get("nsentences", 0)) if sample else 0
        return torch.tensor(0.0), n, {"nsentences": n, "sample_size": n}

    def collect(self, split: str, max_tokens=None, batch_size=None, device=None, progress=None,
                num_workers=0) -> Dict[str, PatternAccumulator]:
        """Run the model over ``split`` and return type -> :class:`PatternAccumulator`."""
        if device is not None:
            self.model.to(device)
        itr = self.batch_iterator(split, max_tokens=max_tokens, batch_size=batch_size, num_workers=num_workers)
        model_device = next(self.model.parameters()).device
        collector = self.begin()
        bar = progress(itr) if progress is not None else itr
        sentences = 0
        try:
            for i, sample in enumerate(bar):
                sentences += self.valid_step(to_device(sample, model_device), self.model)[1]
                if hasattr(bar, "log"):  # fairseq progress bars print what is logged (simple/json formats)
                    bar.log({"sentences": sentences, "batches": collector.batches}, step=i + 1)
        finally:
            accumulators = self.end()
        self.meta = {"checkpoint": os.path.abspath(self.cfg.attn_checkpoint),
                     "data": os.path.abspath(self.cfg.data) if self.cfg.data else _cfg_get(self.saved_cfg.task, "data"),
                     "split": split, "max_len": self.max_len, "max_tokens": max_tokens, "batch_size": batch_size,
                     "batches": self._last.batches}
        return accumulators

    def save(self, out_dir: str, accumulators: Optional[Dict[str, PatternAccumulator]] = None,
             extra_meta: Optional[Dict[str, Any]] = None) -> Dict[str, Dict[str, str]]:
        """Write ``out_dir/<type>.npy`` + ``.json`` for every collected type; returns type -> paths."""
        collector = self._last
        if collector is None:
            raise RuntimeError("compute_attn_score: nothing collected yet; run collect() (or begin/valid_step/end)")
        accumulators = accumulators if accumulators is not None else collector.accumulators
        model_cfg = getattr(self.saved_cfg, "model", None)
        written = {}
        for t, acc in accumulators.items():
            meta = {**self.meta, "type": t, "layers": collector.layer_numbers(t), "heads": acc.heads,
                    "attention": _cfg_get(model_cfg, BY_PATTERN_NAME[t].attr),
                    "attention_class": sorted({type(m).__name__ for _, _, m in collector.attentions[t]}),
                    "arch": _cfg_get(model_cfg, "arch") or _cfg_get(model_cfg, "_name"),
                    "task": _cfg_get(getattr(self.saved_cfg, "task", None), "_name")
                    or _cfg_get(getattr(self.saved_cfg, "task", None), "task"),
                    **(extra_meta or {})}
            written[t] = save_patterns(os.path.join(out_dir, t), acc, meta)
        return written


def _cfg_get(cfg, name: str):
    if cfg is None:
        return None
    try:
        from fairseq.utils import safe_getattr

        value = cfg.get(name) if isinstance(cfg, dict) else safe_getattr(cfg, name, None)
    except Exception:  # omegaconf struct mode on a missing key
        return None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def parse_overrides(text: Optional[str]) -> Dict[str, Any]:
    if not text:
        return {}
    try:
        value = ast.literal_eval(text) if not isinstance(text, dict) else text
    except (ValueError, SyntaxError) as e:
        raise ValueError(f"--overrides must be a dict literal such as \"{{'source_lang': 'de'}}\" ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--overrides must be a dict literal, got {type(value).__name__}")
    return dict(value)


TASK_NAME = "compute_attn_score"
if TASK_NAME not in TASK_REGISTRY:
    register_task(TASK_NAME, dataclass=ComputeAttnScoreConfig)(ComputeAttnScoreTask)
