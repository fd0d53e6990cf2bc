"""Criterions that add what fluence attentions need to fairseq's cross entropies, and log what they learned.

``fluence_label_smoothed_cross_entropy`` and ``fluence_cross_entropy`` work with any fluence model:

* adaptive span: the span loss ``sum of AdaptiveSpan.get_loss()`` is added in training, and ``span_loss``,
  ``span_avg`` and ``span_max`` are logged (see below);
* sparse attention (sparsemax, entmax15, alpha_entmax): ``alpha_<type>_<layer>`` is the mean α over the heads of
  each learned-α attention (logged in training and validation), and ``density_<type>_<layer>`` the share of
  non-zero attention weights among the allowed (query, key) pairs of real queries (validation only: counting
  costs a pass over every attention matrix). ``<type>`` is ``enc_self``, ``dec_self`` or ``cross``; ``density``
  alone is the share over every sparse attention of the model.

The ``adaptive_span_*`` criterions are the same but refuse a model without adaptive span.

The span loss is a per-token quantity (the original code adds it to the *mean* NLL). fairseq criterions return a
*summed* loss that the trainer divides by ``sample_size`` (over all workers and accumulated batches), so we add
``span_loss * sample_size``: after fairseq's division the gradient of the spans is exactly that of ``span_loss``,
whatever the batch size, ``--update-freq`` or number of workers. It is added to the returned loss only: the logged
``loss``, ``nll_loss`` and ``ppl`` are those of the plain criterion.

Every statistic is logged as sums plus a count, so fairseq may sum the logging outputs of several workers before
:meth:`reduce_metrics` (``logging_outputs_can_be_summed``) and the averages stay right.
"""
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

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
from ..modules.entmax_attention import EntmaxAttentionBase

# encoder.layers.3.self_attn, decoder.layers.0.encoder_attn (wrappers such as FSDP may add path segments)
_ATTENTION_PATH = re.compile(r"(?:^|\.)(?P<stack>encoder|decoder)\.(?:.*\.)?layers\.(?P<layer>\d+)\.(?:.*\.)?"
                             r"(?P<sublayer>self_attn|encoder_attn)$")


def adaptive_spans(model: torch.nn.Module) -> List[AdaptiveSpan]:
    """All AdaptiveSpan modules of ``model`` (wrapped models included), in module order."""
    return [m for m in model.modules() if isinstance(m, AdaptiveSpan)]


def span_loss(model: torch.nn.Module) -> torch.Tensor:
    """The adaptive-span regulariser of ``model``: the sum of every AdaptiveSpan's ``get_loss()``."""
    spans = adaptive_spans(model)
    if not spans:
        raise ValueError("the model has no AdaptiveSpan modules")
    return torch.stack([s.get_loss() for s in spans]).sum()


def attention_label(path: str) -> Optional[str]:
    """``encoder.layers.2.self_attn`` -> ``enc_self_2``; ``decoder.layers.0.encoder_attn`` -> ``cross_0``."""
    match = _ATTENTION_PATH.search(path)
    if match is None:
        return None
    if match["sublayer"] == "encoder_attn":
        kind = "cross"
    else:
        kind = "enc_self" if match["stack"] == "encoder" else "dec_self"
    return f"{kind}_{int(match['layer'])}"


def sparse_attentions(model: torch.nn.Module) -> List[Tuple[str, EntmaxAttentionBase]]:
    """(label, module) of every entmax-family attention, in module order (``named_modules`` walks the registered
    children, so a LayerDrop list is not iterated and no layer is skipped)."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, EntmaxAttentionBase):
            found.append((attention_label(path) or path.replace(".", "_"), module))
    return found


class FluenceCriterionMixin:
    """Adds the span loss and the fluence statistics to a fairseq criterion's ``forward`` and metrics."""

    plain_criterion = ""  # the stock criterion this one extends (named in errors)
    require_spans = False

    def _spans(self, model) -> List[AdaptiveSpan]:
        spans = adaptive_spans(model)
        if not spans and self.require_spans:
            raise ValueError(
                f"{type(self).__name__}: the model has no adaptive span attention (no AdaptiveSpan module), so "
                f"there is no span loss to add; train it with --criterion {self.plain_criterion} (or "
                f"fluence_{self.plain_criterion}), or use an --arch with adaptive span (e.g. "
                "--encoder-self-attention/--decoder-self-attention adaptive_span)"
            )
        return spans

    def forward(self, model, sample, reduce=True):
        spans = self._spans(model)
        sparse = sparse_attentions(model)
        count_density = bool(sparse) and not model.training
        for _, module in sparse:
            module.track_density(count_density)
        try:
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
            density = [(label, module.density_counts()) for label, module in sparse] if count_density else []
        finally:
            for _, module in sparse:
                module.track_density(False)
        if spans:
            regulariser = torch.stack([s.get_loss() for s in spans]).sum()
            if model.training and reduce:
                loss = loss + regulariser.to(loss.dtype) * sample_size
            logging_output["span_loss"] = regulariser.detach().float()
            logging_output["span_avg"] = sum(s.get_current_avg_span() for s in spans) / len(spans)
            logging_output["span_max"] = max(s.get_current_max_span() for s in spans)
            logging_output["span_n"] = 1
        alphas = [(label, alpha) for label, alpha in ((label, module.alpha()) for label, module in sparse)
                  if isinstance(alpha, torch.Tensor)]  # learned alphas only; fixed ones are constants
        if alphas:
            for label, alpha in alphas:
                logging_output[f"alpha_{label}"] = float(alpha.detach().float().mean())
            logging_output["alpha_n"] = 1
        for label, counts in density:
            logging_output[f"density_nonzero_{label}"] = float(counts[0].sum())
            logging_output[f"density_allowed_{label}"] = float(counts[1].sum())
        return loss, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)

        # the logging outputs may be summed over workers first (logging_outputs_can_be_summed): average with the
        # summed count, and log plain floats (tensors would be printed unrounded by the progress bar)
        def total(key):
            return float(utils.item(sum(log.get(key, 0) for log in logging_outputs)))

        keys = sorted({key for log in logging_outputs for key in log})
        spans = total("span_n")
        if spans > 0:
            for key, digits in (("span_loss", None), ("span_avg", 1), ("span_max", 1)):
                metrics.log_scalar(key, total(key) / spans, spans, round=digits)
        alphas = total("alpha_n")
        if alphas > 0:
            for key in keys:
                if key.startswith("alpha_") and key != "alpha_n":
                    metrics.log_scalar(key, total(key) / alphas, alphas, round=3)
        nonzero_all = allowed_all = 0.0
        for key in keys:
            if key.startswith("density_nonzero_"):
                label = key[len("density_nonzero_"):]
                nonzero, allowed = total(key), total(f"density_allowed_{label}")
                if allowed > 0:
                    metrics.log_scalar(f"density_{label}", nonzero / allowed, allowed, round=3)
                nonzero_all, allowed_all = nonzero_all + nonzero, allowed_all + allowed
        if allowed_all > 0:
            metrics.log_scalar("density", nonzero_all / allowed_all, allowed_all, round=3)


@dataclass
class FluenceLabelSmoothedCrossEntropyCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    pass


@register_criterion("fluence_label_smoothed_cross_entropy", dataclass=FluenceLabelSmoothedCrossEntropyCriterionConfig)
class FluenceLabelSmoothedCrossEntropyCriterion(FluenceCriterionMixin, LabelSmoothedCrossEntropyCriterion):
    """``label_smoothed_cross_entropy`` + the span loss where there are spans; logs span, alpha and density."""

    plain_criterion = "label_smoothed_cross_entropy"


@dataclass
class FluenceCrossEntropyCriterionConfig(CrossEntropyCriterionConfig):
    pass


@register_criterion("fluence_cross_entropy", dataclass=FluenceCrossEntropyCriterionConfig)
class FluenceCrossEntropyCriterion(FluenceCriterionMixin, CrossEntropyCriterion):
    """``cross_entropy`` + the span loss where there are spans; logs span, alpha and density."""

    plain_criterion = "cross_entropy"
