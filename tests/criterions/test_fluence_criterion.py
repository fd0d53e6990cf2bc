"""The fluence criterions read what attentions declare (aux_losses, stats, track_statistics), never their class."""
import pytest
import torch
from fairseq.logging import metrics

import fairseq_helpers as H
from fluence_fairseq.criterions import FluenceLabelSmoothedCrossEntropyCriterion
from fluence_fairseq.modules import Statistic


class Declared:
    """What one attention declares, installed on an instance (no new class, so nothing could match by type)."""

    def __init__(self, attn, scale, density):
        self.attn, self.scale, self.density, self.tracking = attn, scale, density, []
        attn.aux_losses = lambda: {"toy_loss": self.scale * attn.q_proj.weight.pow(2).sum()}
        attn.stats = self.stats
        attn.track_statistics = self.tracking.append

    def stats(self):
        out = {"toy_max": Statistic(self.scale, reduce="max"), "toy_layer": Statistic(self.scale, per_layer=True,
                                                                                       model_wide=False)}
        if self.tracking and self.tracking[-1]:
            out["toy_density"] = Statistic(self.density, weight=10.0, per_layer=True)
        return out


@pytest.fixture
def setup():
    model, task, _ = H.build("fluence_transformer_tiny", ["--dropout", "0"])
    criterion = FluenceLabelSmoothedCrossEntropyCriterion(task, sentence_avg=False, label_smoothing=0.0)
    a = Declared(model.encoder.layers[0].self_attn, 0.5, 0.2)
    b = Declared(model.decoder.layers[1].encoder_attn, 2.0, 0.8)
    return model, criterion, H.translation_sample(task), a, b


def _reduce(criterion, logs):
    with metrics.aggregate() as agg:
        type(criterion).reduce_metrics(logs)
        return agg.get_smoothed_values()


def test_aux_losses_are_summed_and_added_in_training_only(setup):
    model, criterion, sample, a, b = setup
    expected = sum(d.scale * d.attn.q_proj.weight.pow(2).sum() for d in (a, b))
    model.train()
    loss_train, size, log_train = criterion(model, sample)
    model.eval()
    loss_eval, _, log_eval = criterion(model, sample)
    torch.testing.assert_close(loss_train - loss_eval, expected.detach() * size, rtol=1e-5, atol=1e-4)
    values = _reduce(criterion, [log_train])
    assert values["toy_loss"] == pytest.approx(float(expected), rel=1e-5)
    model.train()
    model.zero_grad()
    criterion(model, sample)[0].backward()
    assert a.attn.q_proj.weight.grad.abs().sum() > 0


def test_statistics_are_logged_per_layer_and_model_wide_and_tracked_in_validation_only(setup):
    model, criterion, sample, a, b = setup
    model.train()
    _, _, train_log = criterion(model, sample)
    assert a.tracking == [False] and b.tracking == [False]
    values = _reduce(criterion, [train_log])
    assert values["toy_max"] == 2.0 and values["toy_layer_enc_self_0"] == 0.5 and values["toy_layer_cross_1"] == 2.0
    assert "toy_layer" not in values and not any(k.startswith("toy_density") for k in values)
    model.eval()
    with torch.no_grad():
        _, _, valid_log = criterion(model, sample)
    assert a.tracking == [False, True, False]  # on for the validation step, off after it
    values = _reduce(criterion, [valid_log, valid_log])  # two workers: the same averages
    assert values["toy_density_enc_self_0"] == pytest.approx(0.2)
    assert values["toy_density"] == pytest.approx(0.5)  # (0.2 * 10 + 0.8 * 10) / 20
    summed = {k: torch.tensor(float(v), dtype=torch.double) * 2 for k, v in valid_log.items()}
    assert _reduce(criterion, [summed])["toy_density"] == pytest.approx(0.5)  # summed over workers first
