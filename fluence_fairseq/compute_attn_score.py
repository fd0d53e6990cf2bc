"""Average attention patterns of a trained fluence checkpoint over a data split (the ``compute_attn_score`` task).

Data-informed attention pruning (Rugina et al. 2020) prunes, per layer, the (query position, key position) pairs
that get the least attention *on average over the training data*. This module measures those averages::

    python -m fluence_fairseq.compute_attn_score DATA-BIN --path CKPT.pt --subset train --out DIR \\
        [--max-len N] [--max-tokens N | --batch-size N] [--types self-enc,enc-dec] [--cpu] \\
        [--overrides '{"source_lang": "de", "target_lang": "en"}'] [--log-format tqdm|simple|none]

(also installed as ``fluence-attn-score``). It loads the checkpoint with its own task (``translation``,
``language_modeling``, ...; ``--overrides`` are applied to the stored config the way fairseq's ``arg_overrides``
are), so that task loads ``--subset`` from ``DATA-BIN`` with the checkpoint's own settings (languages,
``tokens_per_sample``, ``left_pad_source``...). The model runs in eval mode (dropout off) under ``torch.no_grad()``
with teacher forcing (one full forward per batch, like validation), batches in data order.

Attention types: ``self-enc`` (encoder self attention), ``self-dec`` (decoder self attention; the only type of a
language model) and ``enc-dec`` (the decoder's cross attention). Every type the model has is written unless
``--types`` chooses some. Every :class:`~fluence_fairseq.modules.attention_base.FluenceAttention` of the model is
recorded through its ``weight_recorder``, so any fluence architecture whose attention forms probabilities works
(softmax, adaptive span, local, the entmax family, ...); attentions that never form them (performer, cosformer,
S4D, ...) raise a clear error.

Output, per attention type ``T`` (``DIR`` is created):

* ``DIR/T.npy``: float32 array ``(layers, heads, N, N)``, ``N`` = ``--max-len``; ``[l, h, i, j]`` is the mean
  probability that query position ``i`` gave key position ``j`` in layer ``l`` (0-based among the layers of that
  type, in model order), head ``h``; 0 where no (i, j) pair was seen. ``np.load(path, allow_pickle=False)`` reads
  it; :func:`fluence_fairseq.ops.attention_patterns.load_patterns` checks its shape against a model.
* ``DIR/T.json``: ``format_version``, ``layout``, ``shape``, ``sentences`` (sentences seen), ``counts`` (``N x N``
  list: how many sentences had both a real query ``i`` and a real key ``j``, i.e. the denominator of every
  average of that (i, j)), plus ``type``, ``layers`` (the module layer numbers), ``heads``, ``attention`` (the
  attention the model's config names for that role) and ``attention_class``, ``checkpoint``, ``data``,
  ``split``, ``max_len``, ``max_tokens``, ``batch_size``, ``arch``, ``task``, ``batches``.

Positions are those the model sees: the index of a token within its own sentence, counted from the sentence's
first real token. fairseq left-pads sources (``left_pad_source=True``) and right-pads decoder inputs, and its
position embeddings start at the first real token either way, so a left-padded source token at batch column
``c`` of a row with ``p`` pad tokens is position ``c - p``. Padding never counts: padded queries and padded keys
are skipped, and each average is over the sentences long enough for that (i, j) only. Paddings come from the
sample (``src_tokens``/``prev_output_tokens`` equal to the padding index), never from the attention. Positions at
or beyond ``--max-len`` are not collected.

Memory: the running sums are float64 ``(layers, heads, N, N)`` per type, i.e. ``8 * L * H * N * N`` bytes: a
6-layer, 8-head model with ``N = 1024`` needs 400 MiB per type (1.2 GiB for an encoder-decoder's three types).
``--max-len`` defaults to the model's largest max positions capped at 1024 (``DEFAULT_MAX_LEN_CAP``); lower it for
long-context models or when only short positions matter.

``fairseq-validate --task compute_attn_score`` does not work: fairseq-validate builds the task stored in the
checkpoint (its ``--task`` only adds flags), so the wrapper task never runs. Use the command above; from Python
use :func:`collect_attention_patterns` (any model, any iterable of fairseq samples) or the registered task::

    task = fairseq.tasks.setup_task(argparse.Namespace(task="compute_attn_score", data=DATA, attn_checkpoint=CKPT))
    accumulators = task.collect("train", max_tokens=4096)
"""
import argparse
import ast
import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.tasks import TASK_REGISTRY, FairseqTask, register_task

from .criterions.fluence import attention_label
from .modules.attention_base import FluenceAttention
from .ops.attention_patterns import PatternAccumulator, save_patterns

logger = logging.getLogger("fluence_fairseq.compute_attn_score")

#: attention type -> the prefix :func:`~fluence_fairseq.criterions.fluence.attention_label` gives it
TYPES = {"self-enc": "enc_self", "self-dec": "dec_self", "enc-dec": "cross"}
_LABEL_TO_TYPE = {v: k for k, v in TYPES.items()}
#: attention type -> the model config option that names its attention
_ROLE_OPTION = {"self-enc": "encoder_self_attention", "self-dec": "decoder_self_attention",
                "enc-dec": "cross_attention"}
DEFAULT_MAX_LEN_CAP = 1024


def parse_types(types) -> Optional[List[str]]:
    """``"self-enc,enc-dec"`` or a list -> validated list (None = every type the model has)."""
    if types is None:
        return None
    if isinstance(types, str):
        types = [t.strip() for t in types.split(",") if t.strip()]
    types = list(dict.fromkeys(types))
    unknown = [t for t in types if t not in TYPES]
    if unknown or not types:
        raise ValueError(f"unknown attention type(s) {unknown or types}; choose from {', '.join(TYPES)}")
    return types


def find_attentions(model: torch.nn.Module) -> Dict[str, List[Tuple[int, str, FluenceAttention]]]:
    """type -> [(layer number, module path, attention)] sorted by layer, for every FluenceAttention of ``model``.
    ``named_modules`` walks registered children, so a LayerDrop list is not iterated and no layer is skipped."""
    found: Dict[str, List[Tuple[int, str, FluenceAttention]]] = {}
    for path, module in model.named_modules():
        if not isinstance(module, FluenceAttention):
            continue
        label = attention_label(path)
        if label is None:
            raise ValueError(f"cannot tell the attention type of {path} ({type(module).__name__}): expected a path "
                             "like encoder.layers.<n>.self_attn or decoder.layers.<n>.encoder_attn")
        kind, layer = label.rsplit("_", 1)
        found.setdefault(_LABEL_TO_TYPE[kind], []).append((int(layer), path, module))
    for entries in found.values():
        entries.sort(key=lambda e: e[0])
    return {t: found[t] for t in TYPES if t in found}


def _padding_idx(model, side: str) -> Optional[int]:
    module = getattr(model, side, None)
    idx = getattr(module, "padding_idx", None)
    return int(idx) if idx is not None else None


class AttentionPatternCollector:
    """Records average attention patterns of ``model`` sample by sample (a context manager).

    Inside ``with collector:`` the model is in eval mode with a recorder on every FluenceAttention of the chosen
    types; :meth:`record` runs one fairseq sample (teacher forcing, no grad) and adds its attention probabilities
    to :attr:`accumulators` (type -> :class:`PatternAccumulator`). Leaving restores every module's train/eval
    state and removes the recorders.

    Args:
        model: a fairseq encoder-decoder (samples with ``prev_output_tokens``) or language model.
        max_len: positions collected (the accumulators are (layers, heads, max_len, max_len) float64).
        types: attention types to collect (``self-enc``, ``self-dec``, ``enc-dec``); None = all the model has.
        padding_idx: padding index of the tokens; default: the model's ``encoder``/``decoder.padding_idx``.
    """

    def __init__(self, model: torch.nn.Module, max_len: int, types=None, padding_idx: Optional[int] = None):
        self.model = model
        found = find_attentions(model)
        if not found:
            raise ValueError(f"{type(model).__name__} has no fluence attention (FluenceAttention modules), so no "
                             "attention patterns can be recorded; use a fluence architecture (--user-dir "
                             "fluence_fairseq, e.g. --arch transformer_softmax or transformer_lm_local)")
        wanted = parse_types(types)
        if wanted is None:
            wanted = list(found)
        missing = [t for t in wanted if t not in found]
        if missing:
            raise ValueError(f"the model has no {', '.join(missing)} attention; it has {', '.join(found)}")
        self.types = wanted
        self.attentions = {t: found[t] for t in wanted}
        self.heads: Dict[str, int] = {}
        for t, entries in self.attentions.items():
            heads = {m.num_heads for _, _, m in entries}
            if len(heads) != 1:
                raise ValueError(f"the {t} attentions have different numbers of heads ({sorted(heads)}); the "
                                 "pattern file needs one (layers, heads, N, N) array")
            self.heads[t] = heads.pop()
        self.max_len = int(max_len)
        self.accumulators = {t: PatternAccumulator(len(e), self.heads[t], self.max_len)
                             for t, e in self.attentions.items()}
        self.padding_idx = padding_idx
        self.batches = 0
        self._saved_modes: Optional[List[Tuple[torch.nn.Module, bool]]] = None
        self._current: Optional[Dict[str, Any]] = None

    def layer_numbers(self, attn_type: str) -> List[int]:
        return [layer for layer, _, _ in self.attentions[attn_type]]

    # ------------------------------------------------------------------------------------------ context
    def __enter__(self) -> "AttentionPatternCollector":
        self._saved_modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            for t, entries in self.attentions.items():
                for index, (_, path, module) in enumerate(entries):
                    if module.weight_recorder is not None:
                        raise RuntimeError(f"{path} already has a weight_recorder (another collection running?)")
                    module.weight_recorder = self._recorder(t, index, path)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for entries in self.attentions.values():
            for _, _, module in entries:
                module.weight_recorder = None
        if self._saved_modes is not None:
            for module, mode in self._saved_modes:
                module.training = mode
            self._saved_modes = None
        self._current = None

    def _recorder(self, attn_type: str, index: int, path: str) -> Callable:
        def record(module, weights):
            current = self._current
            if current is None:
                raise RuntimeError(f"{path}: attention recorded outside AttentionPatternCollector.record()")
            query_padding, key_padding = current["padding"][attn_type]
            seen = current["seen"][attn_type]
            seen[index] += 1
            try:
                self.accumulators[attn_type].add(index, weights, query_padding, key_padding,
                                                 count=not current["counted"][attn_type])
            except ValueError as e:
                raise ValueError(f"{path} ({attn_type}, layer {index}): {e}") from None
            current["counted"][attn_type] = True
        return record

    # ------------------------------------------------------------------------------------------ samples
    def _paddings(self, net_input) -> Dict[str, Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        src = net_input["src_tokens"]
        prev = net_input.get("prev_output_tokens")
        if prev is None:  # a language model: the decoder reads src_tokens
            pad = self.padding_idx if self.padding_idx is not None else _padding_idx(self.model, "decoder")
            dec = src.eq(pad) if pad is not None else None
            return {"self-dec": (dec, dec)}
        src_pad_idx = self.padding_idx if self.padding_idx is not None else _padding_idx(self.model, "encoder")
        tgt_pad_idx = self.padding_idx if self.padding_idx is not None else _padding_idx(self.model, "decoder")
        enc = src.eq(src_pad_idx) if src_pad_idx is not None else None
        dec = prev.eq(tgt_pad_idx) if tgt_pad_idx is not None else None
        return {"self-enc": (enc, enc), "self-dec": (dec, dec), "enc-dec": (dec, enc)}

    def record(self, sample: Dict[str, Any]) -> None:
        """Run one fairseq sample (``sample['net_input']`` is passed to the model) and add its patterns."""
        if self._saved_modes is None:
            raise RuntimeError("use AttentionPatternCollector.record() inside 'with collector:'")
        if not sample or "net_input" not in sample:
            return
        net_input = sample["net_input"]
        paddings = self._paddings(net_input)
        for t in self.types:
            if t not in paddings:
                raise ValueError(f"the samples have no input for {t} attention (a language-model sample has "
                                 "only src_tokens)")
        self._current = {"padding": paddings, "counted": {t: False for t in self.types},
                         "seen": {t: [0] * len(self.attentions[t]) for t in self.types}}
        try:
            with torch.no_grad():
                self.model(**net_input)
            for t in self.types:
                seen = self._current["seen"][t]
                wrong = [(self.attentions[t][i][1], n) for i, n in enumerate(seen) if n != 1]
                if wrong:
                    raise RuntimeError(f"every {t} attention must run exactly once per forward; got "
                                       + ", ".join(f"{p}: {n} times" for p, n in wrong))
        finally:
            self._current = None
        self.batches += 1


def _to_device(sample, device: torch.device):
    from fairseq import utils

    if device.type == "cpu":
        return sample
    return utils.apply_to_sample(lambda t: t.to(device=device, non_blocking=True), sample)


def collect_attention_patterns(model: torch.nn.Module, batches: Iterable[Dict[str, Any]], max_len: int,
                               types=None, progress: Optional[Callable[[Iterable], Iterable]] = None, *,
                               padding_idx: Optional[int] = None) -> Dict[str, PatternAccumulator]:
    """Average attention patterns of ``model`` over fairseq ``batches``: type -> :class:`PatternAccumulator`.

    Runs every batch once (eval mode, no grad, teacher forcing; the model's train/eval state is restored after).
    ``types``: ``"self-enc,enc-dec"`` or a list (None = every type the model has); ``progress``: wraps the batch
    iterable (e.g. a fairseq progress bar factory); batches are moved to the model's device.
    """
    collector = AttentionPatternCollector(model, max_len, types, padding_idx=padding_idx)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    iterable = progress(batches) if progress is not None else batches
    with collector:
        for sample in iterable:
            collector.record(_to_device(sample, device))
    return collector.accumulators


def default_max_len(model, cap: int = DEFAULT_MAX_LEN_CAP) -> int:
    """The model's largest max positions, capped at ``cap``."""
    positions = model.max_positions() if hasattr(model, "max_positions") else None
    if isinstance(positions, (tuple, list)):
        values = [int(p) for p in positions if p is not None]
    elif positions is not None:
        values = [int(positions)]
    else:
        values = []
    return min(max(values), cap) if values else cap


# ---------------------------------------------------------------------------------------------- task
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

        from . import compat

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
                sentences += self.valid_step(_to_device(sample, model_device), self.model)[1]
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
                    "attention": _cfg_get(model_cfg, _ROLE_OPTION[t]),
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
if __name__ != "__main__" and TASK_NAME not in TASK_REGISTRY:
    register_task(TASK_NAME, dataclass=ComputeAttnScoreConfig)(ComputeAttnScoreTask)


# ------------------------------------------------------------------------------------------- command
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fluence_fairseq.compute_attn_score",
                                description="Average attention patterns (per layer, head, query and key position) "
                                            "of a fluence checkpoint over a data split.")
    p.add_argument("data", help="binarised data directory (read by the checkpoint's own task)")
    p.add_argument("--path", required=True, help="checkpoint (.pt)")
    p.add_argument("--subset", default="train", help="split to run over (default: train)")
    p.add_argument("--out", required=True, help="output directory: <type>.npy and <type>.json per attention type")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"positions collected (default: the model's max positions, at most {DEFAULT_MAX_LEN_CAP}); "
                        "memory is 8*layers*heads*N*N bytes per type")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--max-tokens", type=int, default=None, help="tokens per batch (default 4096)")
    batch.add_argument("--batch-size", type=int, default=None, help="sentences per batch")
    p.add_argument("--types", default=None, help="comma-separated: self-enc, self-dec, enc-dec (default: all)")
    p.add_argument("--overrides", default="{}",
                   help="dict literal of overrides for the checkpoint's config, e.g. \"{'source_lang': 'de'}\"")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is available")
    p.add_argument("--log-format", default=None, choices=["tqdm", "simple", "json", "none"],
                   help="progress bar (default: tqdm on a terminal, simple otherwise)")
    p.add_argument("--log-interval", type=int, default=100)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fairseq import tasks
    from fairseq.logging import progress_bar

    if argv is None:  # the command line (not a call from Python): fairseq's log format on stdout
        logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                            stream=sys.stdout, force=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_len is not None and args.max_len < 1:
        parser.error("--max-len must be positive")
    try:
        parse_types(args.types)
        cfg = argparse.Namespace(task=TASK_NAME, data=args.data, attn_checkpoint=args.path, attn_types=args.types,
                                 attn_max_len=args.max_len, attn_out_dir=args.out, task_overrides=args.overrides)
        task = tasks.setup_task(cfg)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    found = find_attentions(task.model)
    logger.info(f"model {type(task.model).__name__}; attention types {', '.join(f'{t} ({len(e)} layers)' for t, e in found.items())}; "
                f"max_len {task.max_len}; device {device}")
    collected = find_attentions(task.model) if args.types is None else {
        t: e for t, e in find_attentions(task.model).items() if t in parse_types(args.types)}
    need = sum(8 * len(e) * e[0][2].num_heads * task.max_len ** 2 for e in collected.values())
    (logger.warning if need > 2 ** 31 else logger.info)(
        f"the running sums need {need / 2 ** 20:.0f} MiB (float64 layers x heads x {task.max_len}^2 per type); "
        "--max-len lowers it")
    log_format = args.log_format or ("tqdm" if sys.stderr.isatty() else "simple")

    def progress(itr):
        return progress_bar.progress_bar(itr, log_format=log_format, log_interval=args.log_interval,
                                         prefix=f"attention patterns on '{args.subset}'", default_log_format=log_format)
    try:
        accumulators = task.collect(args.subset, max_tokens=args.max_tokens, batch_size=args.batch_size,
                                    device=device, progress=progress)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    written = task.save(args.out, accumulators)
    for t, paths in written.items():
        logger.info(f"{t}: {accumulators[t].sentences} sentences -> {paths['npy']} ({paths['json']})")
    return 0


if __name__ == "__main__":
    from fluence_fairseq.compute_attn_score import main as _registered_main  # the copy whose task is registered

    sys.exit(_registered_main())
