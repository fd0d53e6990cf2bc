"""benchmarks.entmax_search on a tiny block: one table row per scale and normaliser, steps and times for both sides."""
import subprocess

import pytest

from benchmarks import ab, entmax_search


def test_reports_steps_and_times_for_every_normaliser_and_softmax(capsys):
    entmax_search.main(["--length", "256", "--heads", "2", "--scales", "1", "3", "--repeats", "1"])
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| 1") or
            line.startswith("| 3")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        (scale, alpha) for scale in ("1", "3") for alpha in ("2.0", "1.5", "per-head", "random", "softmax")]
    for row in rows:
        share, steps, fwd, bwd = row[2:6]
        assert 0 < float(share) <= 1 and float(fwd) >= 0 and float(bwd) >= 0
        # full-row steps per row: a general α's may be below 1 (steps on gathered entries do not count)
        alpha = row[1].strip()
        assert steps.strip() == "-" if alpha == "softmax" else (alpha not in ("per-head", "random")) <= float(steps) <= 50


@pytest.mark.skipif(subprocess.run(["git", "rev-parse", "HEAD"], cwd=ab.REPO, capture_output=True).returncode != 0,
                    reason="needs a git checkout (the old side is read with git show)")
def test_against_a_revision_adds_its_columns(capsys):
    entmax_search.main(["--length", "256", "--heads", "2", "--scales", "1", "--repeats", "1", "--against", "HEAD"])
    out = capsys.readouterr().out
    assert "steps at HEAD | fwd ms at HEAD | bwd ms at HEAD" in out
    assert all(len(line.split("|")) == 11 for line in out.splitlines() if line.startswith("| 1"))


def test_listed_support_and_halves_setting(capsys, monkeypatch):
    """--listed asks for the support as the attention does (the report says so, every normaliser still runs);
    --halves-below sets the share of the listed search only, and restoring it is the caller's (monkeypatch here)."""
    import fluence_fairseq.ops.entmax as ops

    calls = []
    real = ops.entmax_with_stats
    monkeypatch.setattr(ops, "entmax_with_stats", lambda *a, **kw: calls.append(sorted(kw)) or real(*a, **kw))
    monkeypatch.setattr(ops, "HALVES_BELOW", ops.HALVES_BELOW)
    monkeypatch.setattr(ops, "UNLISTED_HALVES_BELOW", ops.UNLISTED_HALVES_BELOW)
    unlisted = ops.UNLISTED_HALVES_BELOW
    entmax_search.main(["--length", "256", "--heads", "2", "--scales", "1", "--repeats", "1", "--listed",
                        "--halves-below", "0"])
    out = capsys.readouterr().out
    assert "support listed" in out and ops.HALVES_BELOW == 0 and ops.UNLISTED_HALVES_BELOW == unlisted
    assert ["support_rows", "with_support"] in calls
    assert len([line for line in out.splitlines() if line.startswith("| 1")]) == 5


def test_set_changes_a_numeric_constant_and_refuses_others(capsys, monkeypatch):
    import fluence_fairseq.ops.entmax as ops

    monkeypatch.setattr(ops, "GATHER_BELOW", ops.GATHER_BELOW)
    monkeypatch.setattr(ops, "ROW_CHUNK_ELEMENTS", ops.ROW_CHUNK_ELEMENTS)
    entmax_search.main(["--length", "256", "--heads", "2", "--scales", "1", "--repeats", "1",
                        "--set", "GATHER_BELOW=0.25", "--set", "ROW_CHUNK_ELEMENTS=4096"])
    assert ops.GATHER_BELOW == 0.25 and ops.ROW_CHUNK_ELEMENTS == 4096 and isinstance(ops.ROW_CHUNK_ELEMENTS, int)
    for bad, why in (("NO_SUCH=1", "no numeric constant"), ("SETTLE=0", "no numeric constant"),
                     ("GATHER_BELOW=half", "not a number"), ("entmax=1", "no numeric constant")):
        with pytest.raises(SystemExit, match=why):
            entmax_search.main(["--length", "256", "--heads", "2", "--scales", "1", "--repeats", "1", "--set", bad])
