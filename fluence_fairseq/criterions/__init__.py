"""fairseq criterions of fluence_fairseq: ``fluence_label_smoothed_cross_entropy`` and ``fluence_cross_entropy``
(span loss where the model has adaptive span; span, alpha and density statistics), and their
``adaptive_span_*`` variants that require adaptive span."""
from .adaptive_span import (
    AdaptiveSpanCrossEntropyCriterion,
    AdaptiveSpanCrossEntropyCriterionConfig,
    AdaptiveSpanLabelSmoothedCrossEntropyCriterion,
    AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig,
)
from .fluence import (
    FluenceCrossEntropyCriterion,
    FluenceLabelSmoothedCrossEntropyCriterion,
    adaptive_spans,
    attention_label,
    sparse_attentions,
    span_loss,
)

__all__ = [
    "AdaptiveSpanCrossEntropyCriterion", "AdaptiveSpanCrossEntropyCriterionConfig",
    "AdaptiveSpanLabelSmoothedCrossEntropyCriterion", "AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig",
    "FluenceCrossEntropyCriterion", "FluenceLabelSmoothedCrossEntropyCriterion",
    "adaptive_spans", "attention_label", "sparse_attentions", "span_loss",
]
