"""Criterions that add the adaptive-span regulariser to fairseq's cross entropies.

The span loss ``sum over AdaptiveSpan modules of get_loss()`` is a per-token quantity (the original code adds it
to the *mean* NLL). fairseq criterions return a *summed* loss that the trainer divides by ``sample_size`` (over all
workers and accumulated batches), so we add ``span_loss * sample_size``: after fairseq's division the gradient of
the spans is exactly that of ``span_loss``, whatever the batch size, ``--update-freq`` or number of workers.

It is added in training only (``model.training``) and only to the returned loss: the logged ``loss``,
``nll_loss`` and ``ppl`` are those of the plain criterion. Logged in addition, averaged over logging outputs:

* ``span_loss``: the regulariser's value (also shown in validation, where it is not added);
* ``span_avg``: mean over layers of ``get_current_avg_span()`` (tokens, ramp included);
* ``span_max``: max over layers of ``get_current_max_span()`` (tokens, ramp included).
"""
from dataclasses import dataclass
from typing import List

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


def adaptive_spans(model: torch.nn.Module) -> List[AdaptiveSpan]:
    """All AdaptiveSpan modules of ``model`` (wrapped models included), in module order."""
    return [m for m in model.modules() if isinstance(m, AdaptiveSpan)]


def span_loss(model: torch.nn.Module) -> torch.Tensor:
    """The adaptive-span regulariser of ``model``: the sum of every AdaptiveSpan's ``get_loss()``."""
    spans = adaptive_spans(model)
    if not spans:
        raise ValueError("the model has no AdaptiveSpan modules")
    return torch.stack([s.get_loss() for s in spans]).sum()


class _SpanLossMixin:
    """Adds the span loss to a fairseq criterion's ``forward`` and the span statistics to its metrics."""

    plain_criterion = ""  # the criterion to use for models without adaptive span

    def _spans(self, model) -> List[AdaptiveSpan]:
        spans = adaptive_spans(model)
        if not spans:
            raise ValueError(
                f"{type(self).__name__}: the model has no adaptive span attention (no AdaptiveSpan module), so "
                f"there is no span loss to add; train it with --criterion {self.plain_criterion}, or use an "
                "--arch with adaptive span (e.g. --encoder-self-attention/--decoder-self-attention adaptive_span)"
            )
        return spans

    def forward(self, model, sample, reduce=True):
        spans = self._spans(model)
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        regulariser = torch.stack([s.get_loss() for s in spans]).sum()
        if model.training and reduce:
            loss = loss + regulariser.to(loss.dtype) * sample_size
        logging_output["span_loss"] = regulariser.detach().float()
        logging_output["span_avg"] = sum(s.get_current_avg_span() for s in spans) / len(spans)
        logging_output["span_max"] = max(s.get_current_max_span() for s in spans)
        logging_output["span_n"] = 1
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        # the logging outputs may be summed over workers first (logging_outputs_can_be_summed), so average with
        # the summed count rather than the number of outputs
        # (then the values may be tensors: take plain floats, or the progress bar prints tensors unrounded)
        n = float(utils.item(sum(log.get("span_n", 0) for log in logging_outputs)))
        if n > 0:
            for key, digits in (("span_loss", None), ("span_avg", 1), ("span_max", 1)):
                total = float(utils.item(sum(log.get(key, 0) for log in logging_outputs)))
                metrics.log_scalar(key, total / n, n, round=digits)


@dataclass
class AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    pass


@register_criterion(
    "adaptive_span_label_smoothed_cross_entropy", dataclass=AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig
)
class AdaptiveSpanLabelSmoothedCrossEntropyCriterion(_SpanLossMixin, LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` + the adaptive-span loss (training only); logs span_loss/avg/max."""

    plain_criterion = "label_smoothed_cross_entropy"


@dataclass
class AdaptiveSpanCrossEntropyCriterionConfig(CrossEntropyCriterionConfig):
    pass


@register_criterion("adaptive_span_cross_entropy", dataclass=AdaptiveSpanCrossEntropyCriterionConfig)
class AdaptiveSpanCrossEntropyCriterion(_SpanLossMixin, CrossEntropyCriterion):
    """``cross_entropy`` + the adaptive-span loss (training only); logs span_loss/avg/max."""

    plain_criterion = "cross_entropy"
