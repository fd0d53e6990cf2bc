"""Average attention patterns of a model over fairseq samples: the collection step of data-informed pruning.

Data-informed attention pruning (Rugina et al. 2020) prunes, per layer, the (query position, key position) pairs
that get the least attention *on average over the training data*. :class:`AttentionPatternCollector` measures
those averages on any fluence model; the ``compute_attn_score`` task (:mod:`fluence_fairseq.tasks`) and the
``fluence-attn-score`` command (:mod:`fluence_fairseq.cli.attn_score`) drive it over a data split of a checkpoint.

Attention types are the roles' pattern names (:mod:`fluence_fairseq.roles`): ``self-enc`` (encoder self
attention), ``self-dec`` (decoder self attention; the only type of a language model) and ``enc-dec`` (the
decoder's cross attention). Every :class:`~fluence_fairseq.modules.attention_base.FluenceAttention` of the model
is recorded through its ``weight_recorder``, so any fluence architecture whose attention forms probabilities
(``forms_weights``) works; an attention that never forms them raises a clear error naming those that do.

Positions are those the model sees: the index of a token within its own sentence, counted from the sentence's
first real token. fairseq left-pads sources (``left_pad_source=True``) and right-pads decoder inputs, and its
position embeddings start at the first real token either way, so a left-padded source token at batch column
``c`` of a row with ``p`` pad tokens is position ``c - p``. Padding never counts: padded queries and padded keys
are skipped, and each average is over the sentences long enough for that (i, j) only. Paddings come from the
sample (``src_tokens``/``prev_output_tokens`` equal to the padding index), never from the attention. Positions at
or beyond ``max_len`` are not collected.

Memory: the running sums are float64 ``(layers, heads, N, N)`` per type, i.e. ``8 * L * H * N * N`` bytes: a
6-layer, 8-head model with ``N = 1024`` needs 400 MiB per type (1.2 GiB for an encoder-decoder's three types).
"""
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from ..modules.attention_base import FluenceAttention
from ..roles import DECODER_CROSS, DECODER_SELF, ENCODER_SELF, ROLES, role_at
from .patterns import PatternAccumulator


#: the attention types, in model order: the roles' pattern names
TYPES = tuple(role.pattern_name for role in ROLES)
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
        where = role_at(path)
        if where is None:
            raise ValueError(f"cannot tell the attention type of {path} ({type(module).__name__}): expected a path "
                             f"like {ENCODER_SELF.module_path(0)} or {DECODER_CROSS.module_path(0)}")
        role, layer = where
        found.setdefault(role.pattern_name, []).append((layer, path, module))
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
            return {DECODER_SELF.pattern_name: (dec, dec)}
        src_pad_idx = self.padding_idx if self.padding_idx is not None else _padding_idx(self.model, "encoder")
        tgt_pad_idx = self.padding_idx if self.padding_idx is not None else _padding_idx(self.model, "decoder")
        enc = src.eq(src_pad_idx) if src_pad_idx is not None else None
        dec = prev.eq(tgt_pad_idx) if tgt_pad_idx is not None else None
        return {ENCODER_SELF.pattern_name: (enc, enc), DECODER_SELF.pattern_name: (dec, dec),
                DECODER_CROSS.pattern_name: (dec, enc)}

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


def to_device(sample, device: torch.device):
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
            collector.record(to_device(sample, device))
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
