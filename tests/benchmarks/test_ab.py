"""benchmarks.ab on tiny sizes: the revision's ops module is loaded and swapped in for the old side."""
import math
import subprocess

import pytest
import torch

from benchmarks import ab

pytestmark = pytest.mark.skipif(
    subprocess.run(["git", "rev-parse", "HEAD"], cwd=ab.REPO, capture_output=True).returncode != 0,
    reason="needs a git checkout (the old side is read with git show)")


def test_every_function_an_attention_imports_from_the_ops_module_is_swapped():
    import fluence_fairseq.modules.cosformer as cosformer
    import fluence_fairseq.modules.performer as performer
    import fluence_fairseq.ops.linear_attention as new

    found = {(importer.__name__, name) for importer, name in ab.bindings(new)}
    assert ("fluence_fairseq.modules.cosformer", "causal_linear_attention") in found
    assert ("fluence_fairseq.modules.performer", "linear_attention") in found
    old = ab.load_revision("linear_attention", "HEAD")
    assert old is not new and old.causal_linear_attention is not new.causal_linear_attention
    assert cosformer.causal_linear_attention is new.causal_linear_attention  # nothing changed by looking
    assert performer.linear_attention is new.linear_attention


def test_ops_modules_swapped_together_call_each_others_revisions():
    """The revision of entmax_attention imports entmax_with_stats from the working tree's entmax (relative imports
    resolve there); swapped together, it calls the revision of entmax instead."""
    import fluence_fairseq.ops.entmax as new_entmax
    import fluence_fairseq.ops.entmax_attention as new_blocked

    old_entmax, old_blocked = ab.load_revision("entmax", "HEAD"), ab.load_revision("entmax_attention", "HEAD")
    assert old_blocked.entmax_with_stats is new_entmax.entmax_with_stats
    ab.link_revisions([(new_entmax, old_entmax), (new_blocked, old_blocked)])
    assert old_blocked.entmax_with_stats is old_entmax.entmax_with_stats
    assert old_blocked.entmax_backward is old_entmax.entmax_backward
    assert new_blocked.entmax_with_stats is new_entmax.entmax_with_stats  # the working tree's are untouched


def test_paired_run_reports_ratios_and_restores_the_working_tree(capsys):
    import fluence_fairseq.modules.cosformer as cosformer
    import fluence_fairseq.ops.linear_attention as new

    result = ab.main(["cosformer", "--ops", "linear_attention", "--length", "64", "--dim", "32", "--heads", "2",
                      "--pairs", "2", "--threads", "1"])
    assert result["ratio_min"] <= result["ratio_median"] <= result["ratio_max"]
    assert all(math.isfinite(v) and v > 0 for v in result.values())
    assert "working tree / HEAD over 2 pairs" in capsys.readouterr().out
    assert cosformer.causal_linear_attention is new.causal_linear_attention


def test_unknown_revision_and_module_are_refused_with_the_flag():
    with pytest.raises(SystemExit, match="--against no-such-rev"):
        ab.load_revision("linear_attention", "no-such-rev")
    with pytest.raises(SystemExit, match=r"--ops linear: fluence_fairseq/ops has no such module; choose from .*'linear_attention'"):
        ab.main(["cosformer", "--ops", "linear", "--length", "16", "--dim", "16", "--heads", "2", "--pairs", "1"])


def test_with_attend_runs_the_revisions_attend_on_the_old_side(monkeypatch):
    """--with-attend: the old steps call the revision's attend (from its module file, its op names pointed at
    the revision's ops), the new steps the working tree's; afterwards the class's attend is back."""
    from fluence_fairseq.modules.lara import LaraAttention

    calls = []
    real_load = ab.load_revision

    def load(name, revision, package="ops"):
        module = real_load(name, revision, package)
        if package == "modules":
            cls = module.LaraAttention
            old_attend = cls.attend
            cls.attend = lambda self, *a, **k: calls.append("old") or old_attend(self, *a, **k)
        return module

    monkeypatch.setattr(ab, "load_revision", load)
    new_attend = LaraAttention.attend
    monkeypatch.setattr(LaraAttention, "attend", lambda self, *a, **k: calls.append("new") or new_attend(self, *a, **k))
    ab.main(["lara", "--ops", "landmarks", "--pattern", "noncausal", "--with-attend", "--length", "64", "--dim", "32",
             "--heads", "2", "--pairs", "2", "--threads", "1"])
    # warm-up rounds (one, or until a round takes no page fault: benchmarks.common.settle) and two pairs: the
    # revision first, then the working tree
    assert len(calls) >= 6 and calls == ["old", "new"] * (len(calls) // 2)


def test_with_attend_keeps_subclass_overrides_and_names_the_revision_lacked(monkeypatch):
    """alpha_entmax's attend lives in EntmaxAttentionBase, whose alpha() the learned-alpha class overrides: the
    old side keeps the override. An ops function the revision did not have (here ``prefixes``, hidden from the
    loaded revision) stays on both sides with --with-attend and is refused without it."""
    real_load = ab.load_revision

    def load(name, revision, package="ops"):
        module = real_load(name, revision, package)
        if package == "ops" and name == "common":
            del module.prefixes
        return module

    monkeypatch.setattr(ab, "load_revision", load)
    args = ["alpha_entmax", "--ops", "common", "--pattern", "causal", "--length", "160", "--dim", "32", "--heads", "2",
            "--pairs", "1", "--threads", "1"]
    with pytest.raises(SystemExit, match=r"has no \['prefixes'\].*or add --with-attend"):
        ab.main(args)
    result = ab.main(args + ["--with-attend"])
    assert all(math.isfinite(v) and v > 0 for v in result.values())


def test_need_weights_steps_call_the_attention_with_the_default(monkeypatch):
    """``--need-weights`` times fairseq's default call: every step of both sides asks for the weights."""
    from fluence_fairseq.modules.attention_base import FluenceAttention

    asked = []
    real = FluenceAttention.forward
    monkeypatch.setattr(FluenceAttention, "forward", lambda self, *a, **kw: asked.append(kw.get("need_weights"))
                        or real(self, *a, **kw))
    ab.main(["softmax", "--ops", "band", "--length", "32", "--dim", "16", "--heads", "2", "--pairs", "1",
             "--threads", "1", "--need-weights"])
    # warm-up rounds (one, or until a round takes no page fault) and one pair, both sides
    assert len(asked) >= 4 and len(asked) % 2 == 0 and asked == [True] * len(asked)
    asked.clear()
    ab.main(["softmax", "--ops", "band", "--length", "32", "--dim", "16", "--heads", "2", "--pairs", "1",
             "--threads", "1", "--allocator", "default"])
    assert asked == [False] * 4  # glibc's defaults: exactly one warm-up round


def test_decoding_pairs_time_steps_without_gradients_from_a_filled_cache(capsys, monkeypatch):
    """``--decoding N``: each side of a pair is the median of ``--steps`` decoding steps (no gradients, evaluation
    mode) against a cache or source of N tokens; the normaliser of both sides is called; a pattern without
    decoding is refused."""
    from fluence_fairseq.modules.attention_base import FluenceAttention

    calls = []
    real = FluenceAttention.forward
    monkeypatch.setattr(FluenceAttention, "forward", lambda self, query, *a, **kw: calls.append(
        (tuple(query.shape), torch.is_grad_enabled(), self.training)) or real(self, query, *a, **kw))
    result = ab.main(["sparsemax", "--ops", "entmax", "--pattern", "cross", "--decoding", "3", "--beam", "2",
                      "--steps", "2", "--dim", "16", "--heads", "2", "--pairs", "1", "--threads", "1",
                      "--allocator", "default"])
    assert all(math.isfinite(v) and v > 0 for v in result.values())
    assert "decoding at 3 tokens, beam 2" in capsys.readouterr().out
    # the call filling the source cache, then the warm-up and one pair, both sides, two steps each: one query per row
    assert len(calls) >= 9 and set(calls) == {((1, 2, 16), False, False)}
    with pytest.raises(SystemExit, match="--decoding needs"):
        ab.main(["sparsemax", "--ops", "entmax", "--pattern", "noncausal", "--decoding", "3"])


def test_attention_dropout_and_an_ops_module_reached_through_another(monkeypatch):
    """``--attention-dropout P`` builds the attention with that dropout (training mode); an ops module no attention
    imports from is accepted when another module of ``--ops`` does (``band,softmax_dropout``: the old band then
    calls the old softmax_dropout), refused alone; a dropout outside [0, 1) is refused with the flag."""
    import benchmarks.common as common
    import fluence_fairseq.ops.band as band
    import fluence_fairseq.ops.softmax_dropout as new

    rates = []
    real = common.SETUPS["attention_dropout"]
    monkeypatch.setitem(common.SETUPS, "attention_dropout", lambda module, rate: rates.append(rate)
                        or real(module, rate))
    linked = []
    link = ab.link_revisions
    monkeypatch.setattr(ab, "link_revisions", lambda loaded: linked.extend(loaded) or link(loaded))
    small = ["--length", "32", "--dim", "16", "--heads", "2", "--pairs", "1", "--threads", "1"]
    ab.main(["softmax", "--ops", "band,softmax_dropout", "--attention-dropout", "0.1", *small])
    assert rates == [0.1]
    (new_band, old_band), (new_dropout, old_dropout) = linked
    assert new_band is band and new_dropout is new
    assert old_band.blocked_softmax_dropout is old_dropout.blocked_softmax_dropout is not new.blocked_softmax_dropout
    assert band.blocked_softmax_dropout is new.blocked_softmax_dropout  # the working tree's untouched
    with pytest.raises(SystemExit, match="--ops softmax_dropout: no attention module imports"):
        ab.main(["softmax", "--ops", "softmax_dropout", *small])
    with pytest.raises(SystemExit, match=r"--attention-dropout must be in \[0, 1\), got 1.0"):
        ab.main(["softmax", "--ops", "band", "--attention-dropout", "1.0", *small])
