"""``benchmarks.need_weights`` runs end to end at a tiny size and reports the patterns it was asked for."""
from benchmarks import need_weights


def _rows(capsys, *extra):
    assert need_weights.main(["--length", "48", "--dim", "32", "--heads", "2", "--repeats", "1",
                              "--only", "softmax", "nystrom", *extra]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| softmax")
             or line.startswith("| nystrom")]
    return {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[-2].strip() for line in lines}


def test_causal_pattern_by_default_and_both_on_request(capsys):
    # softmax has both self patterns, Nystrom only the noncausal one (so it is reported in it either way)
    assert _rows(capsys) == {("softmax", "causal self"): "weights", ("nystrom", "noncausal self"): "None"}
    assert _rows(capsys, "--patterns", "both") == {
        ("softmax", "causal self"): "weights", ("softmax", "noncausal self"): "weights",
        ("nystrom", "noncausal self"): "None"}


def test_weights_enter_the_loss_only_on_request(monkeypatch, capsys):
    losses = []
    real = need_weights._step
    monkeypatch.setattr(need_weights, "_step", lambda module, x, in_loss, **kw: losses.append(in_loss)
                        or real(module, x, in_loss, **kw))
    _rows(capsys)
    assert losses and not any(losses)
    losses.clear()
    _rows(capsys, "--weights-in-loss")
    assert losses.count(True) == 3 * 2  # warm-up and one repeat: fairseq MHA, both defaults (Nystrom: None)


def test_an_attentions_calls_are_timed_in_turn(monkeypatch, capsys):
    """need_weights=False and the default alternate repeat by repeat (after one warm-up each), so the machine's
    drift does not land on one side of the ratio."""
    calls = []
    real = need_weights._step
    monkeypatch.setattr(need_weights, "_step", lambda module, x, in_loss, **kw: calls.append(
        (type(module).__name__, "plain" if kw.get("need_weights") is False else "default"))
        or real(module, x, in_loss, **kw))
    assert need_weights.main(["--length", "48", "--dim", "32", "--heads", "2", "--repeats", "3",
                              "--only", "softmax"]) == 0
    softmax = [side for name, side in calls if name != "MultiheadAttention"]
    assert softmax == ["plain", "default"] * 4
