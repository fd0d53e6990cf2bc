"""Criterions that add what fluence attentions need to fairseq's cross entropies, and log what they report.

``fluence_label_smoothed_cross_entropy`` and ``fluence_cross_entropy`` work with any fluence model. They read
what each attention declares (:class:`~fluence_fairseq.modules.attention_base.FluenceAttention`), never its class:

* :meth:`~FluenceAttention.aux_losses`: regularisers by name (adaptive span: ``span_loss``), summed over the
  model's attentions, added to the loss in training and logged;
* :meth:`~FluenceAttention.stats`: statistics by name (adaptive span: ``span_avg``, ``span_max``; learned-α
  entmax: ``alpha``; sparse attentions in validation: ``density``), logged per attention as
  ``<name>_<role label>_<layer>`` (labels from :mod:`fluence_fairseq.roles`: ``alpha_enc_self_2``) and/or over
  the model as ``<name>``, as each :class:`~fluence_fairseq.modules.attention_base.Statistic` asks;
* :meth:`~FluenceAttention.track_statistics`: switched on for validation steps only (counting densities costs a
  pass over every attention matrix).

The ``adaptive_span_*`` criterions are the same but refuse a model without a ``span_loss``.

An auxiliary loss is a per-token quantity (the adaptive-span code adds it to the *mean* NLL). fairseq criterions
return a *summed* loss that the trainer divides by ``sample_size`` (over all workers and accumulated batches), so
we add ``aux * sample_size``: after fairseq's division the gradient is exactly that of ``aux``, whatever the batch
size, ``--update-freq`` or number of workers. It is added to the returned loss only: the logged ``loss``,
``nll_loss`` and ``ppl`` are those of the plain criterion.

Every statistic is logged as a weighted sum plus its weight (``<key>__sum``, ``<key>__weight``), so fairseq may sum
the logging outputs of several workers before :meth:`reduce_metrics` (``logging_outputs_can_be_summed``) and the
averages stay right.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from fairseq import utils
from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterion, CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)
from fairseq.logging import metrics

from ..modules.adaptive_span import AdaptiveSpan
from ..modules.attention_base import FluenceAttention, Statistic
from ..roles import attention_label

_SUM, _WEIGHT = "__sum", "__weight"
#: log key -> rounding of its statistic, filled by forward (which runs in every process that reduces metrics)
_DIGITS: Dict[str, Optional[int]] = {}


def fluence_attentions(model: torch.nn.Module) -> List[Tuple[str, FluenceAttention]]:
    """(label, attention) of every fluence attention of ``model``, in module order (``named_modules`` walks the
    registered children, so a LayerDrop list is not iterated and no layer is skipped). The label is the role's
    (``enc_self_2``), or the module path with dots as underscores outside a transformer layer."""
    return [(attention_label(path) or path.replace(".", "_"), module) for path, module in model.named_modules()
            if isinstance(module, FluenceAttention)]


def sparse_attentions(model: torch.nn.Module) -> List[Tuple[str, FluenceAttention]]:
    """(label, attention) of every attention whose weights can be exactly zero (``sparse_weights``)."""
    return [(label, module) for label, module in fluence_attentions(model) if module.sparse_weights]


def adaptive_spans(model: torch.nn.Module) -> List[AdaptiveSpan]:
    """All AdaptiveSpan modules of ``model`` (wrapped models included), in module order."""
    return [m for m in model.modules() if isinstance(m, AdaptiveSpan)]


def span_loss(model: torch.nn.Module) -> torch.Tensor:
    """The adaptive-span regulariser of ``model``: the sum of every AdaptiveSpan's ``get_loss()``."""
    spans = adaptive_spans(model)
    if not spans:
        raise ValueError("the model has no AdaptiveSpan modules")
    return torch.stack([s.get_loss() for s in spans]).sum()


def aux_losses(attentions) -> Dict[str, torch.Tensor]:
    """Every auxiliary loss of the attentions, summed by name."""
    total: Dict[str, torch.Tensor] = {}
    for _, module in attentions:
        for name, value in module.aux_losses().items():
            total[name] = value if name not in total else total[name] + value
    return total


def combine_stats(attentions) -> Dict[str, Statistic]:
    """The attentions' statistics as log keys, grouped by name in the order the names first appear:
    ``<name>_<label>`` per attention (``per_layer``), then ``<name>`` combined over the model (``model_wide``) by
    each statistic's ``reduce``."""
    per_name: Dict[str, Dict[str, Statistic]] = {}
    for label, module in attentions:
        for name, stat in module.stats().items():
            group = per_name.setdefault(name, {})
            if stat.per_layer:
                group[f"{name}_{label}"] = stat
            if stat.model_wide:
                group[name] = stat if name not in group else _combine(group[name], stat)
    out: Dict[str, Statistic] = {}
    for name, group in per_name.items():
        out.update((key, stat) for key, stat in group.items() if key != name)
        if name in group:
            out[name] = group[name]
    return out


def _combine(a: Statistic, b: Statistic) -> Statistic:
    if a.reduce != b.reduce:
        raise ValueError(f"statistics of one name must reduce the same way, got {a.reduce!r} and {b.reduce!r}")
    if a.reduce == "max":
        return a if a.value >= b.value else b
    if a.reduce == "sum":
        return Statistic(a.value + b.value, 1.0, "sum", a.per_layer, a.model_wide, a.digits)
    weight = a.weight + b.weight
    value = (a.value * a.weight + b.value * b.weight) / weight if weight > 0 else 0.0
    return Statistic(value, weight, "mean", a.per_layer, a.model_wide, a.digits)


class FluenceCriterionMixin:
    """Adds the attentions' auxiliary losses and statistics to a fairseq criterion's ``forward`` and metrics."""

    plain_criterion = ""  # the stock criterion this one extends (named in errors)
    #: an auxiliary loss the model must have (the adaptive_span_* criterions: "span_loss")
    required_aux_loss = None

    def forward(self, model, sample, reduce=True):
        attentions = fluence_attentions(model)
        validating = not model.training
        for _, module in attentions:
            module.track_statistics(validating)
        try:
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
            stats = combine_stats(attentions)
        finally:
            if validating:
                for _, module in attentions:
                    module.track_statistics(False)
        aux = aux_losses(attentions)
        if self.required_aux_loss is not None and self.required_aux_loss not in aux:
            raise ValueError(
                f"{type(self).__name__}: no attention of the model reports a {self.required_aux_loss} (the "
                f"model has no adaptive span attention), so there is no span loss to add; train it with "
                f"--criterion {self.plain_criterion} (or fluence_{self.plain_criterion}), or use an --arch with "
                "adaptive span (e.g. --encoder-self-attention/--decoder-self-attention adaptive_span)"
            )
        if aux and model.training and reduce:
            loss = loss + sum(aux.values()).to(loss.dtype) * sample_size
        # logged in this order: the auxiliary losses, then each statistic per attention and over the model
        entries = {name: Statistic(float(value.detach()), reduce="sum", digits=None) for name, value in aux.items()}
        entries.update(stats)
        for key, stat in entries.items():
            logging_output[key + _SUM] = stat.value * stat.weight
            logging_output[key + _WEIGHT] = stat.weight
            _DIGITS[key] = stat.digits
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        # the logging outputs may be summed over workers first (logging_outputs_can_be_summed): divide sums by
        # summed weights, and log plain floats (tensors would be printed unrounded by the progress bar)
        def total(key):
            return float(utils.item(sum(log.get(key, 0) for log in logging_outputs)))

        keys = list(dict.fromkeys(key[: -len(_SUM)] for log in logging_outputs for key in log if key.endswith(_SUM)))
        for key in keys:
            weight = total(key + _WEIGHT)
            if weight > 0:
                metrics.log_scalar(key, total(key + _SUM) / weight, weight, round=_DIGITS.get(key, 3))


@dataclass
class FluenceLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    pass


@register_criterion("fluence_label_smoothed_cross_entropy", dataclass=FluenceLabelSmoothedCrossEntropyCriterionConfig)
class FluenceLabelSmoothedCrossEntropyCriterion(FluenceCriterionMixin, LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` + the attentions' auxiliary losses (adaptive span: the span loss) in
    training; logs their statistics (span, alpha, density)."""

    plain_criterion = "label_smoothed_cross_entropy"


@dataclass
class FluenceCrossEntropyCriterionConfig(CrossEntropyCriterionConfig):
    pass


@register_criterion("fluence_cross_entropy", dataclass=FluenceCrossEntropyCriterionConfig)
class FluenceCrossEntropyCriterion(FluenceCriterionMixin, CrossEntropyCriterion):
    """``cross_entropy`` + the attentions' auxiliary losses (adaptive span: the span loss) in training; logs their
    statistics (span, alpha, density)."""

    plain_criterion = "cross_entropy"
