"""benchmarks.group_sizes: every chunked attention at every scale, ratios to scale 1, constants restored."""
import pytest

import fluence_fairseq.ops.linear_attention as linear_ops
import fluence_fairseq.ops.longshort as longshort_ops
from benchmarks import group_sizes
from fluence_fairseq.modules.registry import ATTENTIONS


def test_every_module_at_every_scale_with_the_constants_restored(tmp_path, monkeypatch):
    seen = []
    step_fn = group_sizes.training_step_fn

    def spy(spec, *args):
        seen.append((spec["name"], longshort_ops._GROUP_ELEMENTS, linear_ops.GROUP, ATTENTIONS["abc"].cls.block_chunks))
        return step_fn(spec, *args)

    monkeypatch.setattr(group_sizes, "training_step_fn", spy)
    before = (longshort_ops._GROUP_ELEMENTS, linear_ops.GROUP, ATTENTIONS["abc"].cls.block_chunks)
    out = tmp_path / "groups.md"
    group_sizes.main(["--device", "cpu", "--length", "64", "--dim", "32", "--heads", "4", "--repeats", "1",
                      "--scales", "1", "3", "--out", str(out)])
    assert (longshort_ops._GROUP_ELEMENTS, linear_ops.GROUP, ATTENTIONS["abc"].cls.block_chunks) == before
    ls, lin, abc = before
    assert seen == [("longshort", ls, lin, abc), ("longshort", 3 * ls, lin, abc),
                    ("cosformer", ls, lin, abc), ("cosformer", ls, 3 * lin, abc),
                    ("performer", ls, lin, abc), ("performer", ls, 3 * lin, abc),
                    ("abc", ls, lin, abc), ("abc", ls, lin, 3 * abc)]
    lines = out.read_text().splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "---" not in line][1:]
    assert [(r[0].strip("| "), int(r[1])) for r in rows] == [(m, s) for m in group_sizes.GROUPS for s in (1, 3)]
    assert all(float(r[3]) == 1.0 for r in rows if r[1] == "1")


def test_a_scale_below_one_is_refused():
    with pytest.raises(SystemExit):
        group_sizes.main(["--device", "cpu", "--scales", "1", "0"])
