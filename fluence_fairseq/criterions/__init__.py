"""fairseq criterions of fluence_fairseq: ``adaptive_span_label_smoothed_cross_entropy`` and
``adaptive_span_cross_entropy``."""
from .adaptive_span import (
    AdaptiveSpanCrossEntropyCriterion,
    AdaptiveSpanCrossEntropyCriterionConfig,
    AdaptiveSpanLabelSmoothedCrossEntropyCriterion,
    AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig,
    adaptive_spans,
    span_loss,
)

__all__ = [
    "AdaptiveSpanCrossEntropyCriterion", "AdaptiveSpanCrossEntropyCriterionConfig",
    "AdaptiveSpanLabelSmoothedCrossEntropyCriterion", "AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig",
    "adaptive_spans", "span_loss",
]
