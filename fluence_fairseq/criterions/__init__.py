"""fairseq criterions of fluence_fairseq: ``fluence_label_smoothed_cross_entropy`` and ``fluence_cross_entropy``
(span loss where the model has adaptive span; span, alpha and density statistics), their ``adaptive_span_*``
variants that require adaptive span, and ``hex_sentence_prediction`` (the HEX orthogonality penalty)."""
from .adaptive_span import (
    AdaptiveSpanCrossEntropyCriterion,
    AdaptiveSpanCrossEntropyCriterionConfig,
    AdaptiveSpanLabelSmoothedCrossEntropyCriterion,
    AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig,
)
from .hex import HexSentencePredictionCriterion
from ..roles import attention_label
from .fluence import (
    FluenceCrossEntropyCriterion,
    FluenceLabelSmoothedCrossEntropyCriterion,
    adaptive_spans,
    sparse_attentions,
    span_loss,
)

__all__ = [
    "AdaptiveSpanCrossEntropyCriterion", "AdaptiveSpanCrossEntropyCriterionConfig",
    "AdaptiveSpanLabelSmoothedCrossEntropyCriterion", "AdaptiveSpanLabelSmoothedCrossEntropyCriterionConfig",
    "FluenceCrossEntropyCriterion", "FluenceLabelSmoothedCrossEntropyCriterion",
    "HexSentencePredictionCriterion", "adaptive_spans", "attention_label", "sparse_attentions", "span_loss",
]
