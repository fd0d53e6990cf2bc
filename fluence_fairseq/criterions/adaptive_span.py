"""``adaptive_span_label_smoothed_cross_entropy`` and ``adaptive_span_cross_entropy``: the ``fluence_*``
criterions (:mod:`.fluence`) that also insist the model has adaptive span, so a forgotten span flag fails loudly
instead of training without the span loss."""
from dataclasses import dataclass

from fairseq.criterions import register_criterion
from fairseq.criterions.cross_entropy import CrossEntropyCriterionConfig
from fairseq.criterions.label_smoothed_cross_entropy import LabelSmoothedCrossEntropyCriterionConfig

from .fluence import FluenceCrossEntropyCriterion, FluenceLabelSmoothedCrossEntropyCriterion
from .fluence import adaptive_spans, span_loss  # noqa: F401  (public here since the first release)


@dataclass
class AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    pass


@register_criterion(
    "adaptive_span_label_smoothed_cross_entropy", dataclass=AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig
)
class AdaptiveSpanLabelSmoothedCrossEntropyCriterion(FluenceLabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` + the adaptive-span loss (training only); logs span_loss/avg/max."""

    required_aux_loss = "span_loss"


@dataclass
class AdaptiveSpanCrossEntropyCriterionConfig(CrossEntropyCriterionConfig):
    pass


@register_criterion("adaptive_span_cross_entropy", dataclass=AdaptiveSpanCrossEntropyCriterionConfig)
class AdaptiveSpanCrossEntropyCriterion(FluenceCrossEntropyCriterion):
    """``cross_entropy`` + the adaptive-span loss (training only); logs span_loss/avg/max."""

    required_aux_loss = "span_loss"
