"""``--criterion hex_sentence_prediction``: fairseq's ``sentence_prediction`` plus the HEX model's orthogonality
penalty (``--hex-orth-penalty``, see :mod:`fluence_fairseq.hex`)."""
from dataclasses import dataclass

from fairseq.criterions import CRITERION_REGISTRY, register_criterion
from fairseq.criterions.sentence_prediction import SentencePredictionConfig, SentencePredictionCriterion
from fairseq.logging import metrics

CRITERION_NAME = "hex_sentence_prediction"


@dataclass
class HexSentencePredictionConfig(SentencePredictionConfig):
    pass

class HexSentencePredictionCriterion(SentencePredictionCriterion):
    """The stock sentence-prediction loss (cross entropy of the model's logits, its metrics) + the penalty the
    model's ``hex_pending_penalty(targets)`` for that forward (None in evaluation or without the penalty)."""

    def forward(self, model, sample, reduce=True):
        if self.regression_target:
            raise ValueError("hex_sentence_prediction: HEX needs class logits; --regression-target is not "
                             "supported (use --criterion sentence_prediction without the HEX penalty)")
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        pending = getattr(model, "hex_pending_penalty", None)
        penalty = None if pending is None else pending(model.get_targets(sample, None).view(-1))
        if penalty is not None:
            loss = loss + penalty.to(loss.dtype)
            logging_output["loss"] = loss.data
            logging_output["hex_penalty"] = penalty.data
        return loss, sample_size, logging_output

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        SentencePredictionCriterion.reduce_metrics(logging_outputs)
        penalty = sum(log.get("hex_penalty", 0) for log in logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if penalty and sample_size:
            metrics.log_scalar("hex_penalty", penalty / sample_size, sample_size, round=4)


if CRITERION_NAME in CRITERION_REGISTRY:  # imported again under another module name
    HexSentencePredictionCriterion = CRITERION_REGISTRY[CRITERION_NAME]  # noqa: F811
else:
    register_criterion(CRITERION_NAME, dataclass=HexSentencePredictionConfig)(HexSentencePredictionCriterion)
