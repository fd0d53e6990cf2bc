"""benchmarks.entmax_support on a tiny problem: one row per normaliser and scale, with the blocks on their support."""
from benchmarks import entmax_support


def test_reports_both_paths_for_every_normaliser_and_scale(capsys):
    import fluence_fairseq.ops.entmax_attention as ops

    below = ops.SPARSE_BACKWARD_BELOW
    entmax_support.main(["--length", "512", "--heads", "2", "--dim", "8", "--scales", "0.02", "4", "--repeats", "1"])
    assert ops.SPARSE_BACKWARD_BELOW == below  # restored
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 2.0") or line.startswith("| 1.5")]
    assert [(r[0], r[1]) for r in rows] == [(a, s) for a in ("2.0", "1.5") for s in ("0.02", "4")]
    for alpha, scale, share, blocks, support_ms, dense_ms, ratio in rows:
        assert 0 < float(share) <= 1 and float(support_ms) > 0 and float(dense_ms) > 0 and float(ratio) > 0
        kept, total = blocks.split(" of ")
        assert total == "2"
        # nearly uniform rows (scale 0.02) keep no support; very peaked ones (scale 4) keep it in every block
        assert kept == ("0" if scale == "0.02" else "2")


def test_below_sets_the_share_of_one_run(capsys):
    import fluence_fairseq.ops.entmax_attention as ops

    below = ops.SPARSE_BACKWARD_BELOW
    entmax_support.main(["--length", "512", "--heads", "2", "--dim", "8", "--scales", "4", "--repeats", "1",
                         "--below", "0"])
    out = capsys.readouterr().out
    assert ops.SPARSE_BACKWARD_BELOW == below and "keeping at most 0 of their entries" in out
    rows = [line for line in out.splitlines() if line.startswith("| 2.0") or line.startswith("| 1.5")]
    assert rows and all("| 0 of 2 |" in line for line in rows)  # nothing on its support at a share of 0
