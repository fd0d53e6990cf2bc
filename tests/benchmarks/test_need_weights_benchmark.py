"""``benchmarks.need_weights`` runs end to end at a tiny size and reports the patterns it was asked for."""
from benchmarks import need_weights


def _rows(capsys, *extra):
    # glibc's default allocator: exactly one warm-up round (the steady one repeats it until no page fault)
    assert need_weights.main(["--length", "48", "--dim", "32", "--heads", "2", "--repeats", "1",
                              "--only", "softmax", "nystrom", "--allocator", "default", *extra]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| softmax")
             or line.startswith("| nystrom")]
    return {tuple(cell.strip() for cell in line.split("|")[1:3]): line.split("|")[-3].strip() for line in lines}


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
    # warm-up and one repeat: both defaults (Nystrom's returns None) and fairseq MHA beside each
    assert losses.count(True) == 4 * 2


def test_an_attentions_calls_are_timed_in_turn(monkeypatch, capsys):
    """need_weights=False, the default and fairseq MHA alternate repeat by repeat (after one warm-up each), so the
    machine's drift does not land on one side of a ratio."""
    calls = []
    real = need_weights._step
    monkeypatch.setattr(need_weights, "_step", lambda module, x, in_loss, **kw: calls.append(
        (type(module).__name__, "plain" if kw.get("need_weights") is False else "default"))
        or real(module, x, in_loss, **kw))
    assert need_weights.main(["--length", "48", "--dim", "32", "--heads", "2", "--repeats", "3",
                              "--only", "softmax", "--allocator", "default"]) == 0
    assert calls == [("FSSoftmaxAttention", "plain"), ("FSSoftmaxAttention", "default"),
                     ("MultiheadAttention", "default")] * 4


def test_the_steady_allocator_repeats_the_warm_up_round_until_no_page_fault(monkeypatch):
    """Under the steady allocator the warm-up is a whole round of the three calls, repeated by settle."""
    rounds = []
    monkeypatch.setattr(need_weights, "warm_up", lambda one_round, allocator: rounds.append(allocator) or one_round())
    assert need_weights.main(["--length", "48", "--dim", "32", "--heads", "2", "--repeats", "1",
                              "--only", "softmax"]) == 0
    assert len(rounds) == 1 and rounds[0].startswith("steady")


def test_fairseq_mha_runs_in_the_attentions_pattern(monkeypatch, capsys):
    """Each attention is compared with fairseq MHA in its own pattern: the causal one with the future mask."""
    masks = []
    real = need_weights._step
    monkeypatch.setattr(need_weights, "_step", lambda module, x, in_loss, **kw: (
        type(module).__name__ == "MultiheadAttention" and masks.append(kw.get("attn_mask")))
        or real(module, x, in_loss, **kw))
    _rows(capsys, "--patterns", "both")
    # Nystrom noncausal, softmax causal, softmax noncausal; a warm-up and one repeat each
    assert [mask is None for mask in masks] == [True] * 2 + [False] * 2 + [True] * 2
    future = masks[2].isinf()
    assert bool(future.triu(1)[future.new_ones(future.shape).triu(1)].all()) and not bool(future.tril().any())


def test_learned_alpha_reported_and_drawn_alike_in_both_patterns(capsys):
    """α-entmax's step depends on the α its heads drew: the report lists them, and both patterns draw the same."""
    assert need_weights.main(["--length", "24", "--dim", "16", "--heads", "2", "--repeats", "1", "--only",
                              "alpha_entmax", "entmax15", "--patterns", "both", "--allocator", "default"]) == 0
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line.split("|")[-2].strip()
            for line in capsys.readouterr().out.splitlines() if line.startswith("| alpha_entmax")
            or line.startswith("| entmax15")}
    causal, noncausal = rows[("alpha_entmax", "causal self")], rows[("alpha_entmax", "noncausal self")]
    assert causal == noncausal and len(causal.split()) == 2
    assert all(1.0 < float(a) <= 2.0 for a in causal.split())
    assert rows[("entmax15", "causal self")] == rows[("entmax15", "noncausal self")] == "-"
