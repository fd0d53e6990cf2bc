"""examples/translation/compare.py: seeds, the table's mean and 95% interval over seeds (no training here)."""
import json
import math
from types import SimpleNamespace

import pytest

from tests import fairseq_helpers as H


@pytest.fixture(scope="module")
def compare():
    return H.load_script("examples/translation/compare.py", "translation_compare")


def test_mean_ci_is_the_student_t_interval(compare):
    mean, half = compare.mean_ci([20.0, 22.0, 24.0])
    assert mean == pytest.approx(22.0)
    assert half == pytest.approx(4.303 * 2.0 / math.sqrt(3))  # t(0.975, 2) * sd / sqrt(n)
    mean, half = compare.mean_ci([5.0])
    assert mean == 5.0 and math.isnan(half)


def test_table_aggregates_seeds_and_skips_other_budgets(compare, tmp_path):
    args = SimpleNamespace(max_update=1000, dim=128, warmup_updates=100, out=str(tmp_path / "t.md"))
    base = {"where": "enc self=x", "params": "1,000", "train_s": 100.0, "max_update": 1000, "dim": 128,
            "warmup_updates": 100}
    runs = [("softmax", 1, 20.0), ("softmax", 2, 22.0), ("softmax", 3, 24.0), ("entmax15", 1, 19.0)]
    for name, seed, bleu in runs:
        out = compare.run_dir(tmp_path, name, seed)
        out.mkdir(parents=True)
        (out / "result.json").write_text(json.dumps({**base, "name": name, "seed": seed, "bleu": bleu,
                                                     "chrf": bleu * 2, "valid_loss": "5.0"}))
    other = compare.run_dir(tmp_path, "softmax", 9)  # another budget: left out
    other.mkdir(parents=True)
    (other / "result.json").write_text(json.dumps({**base, "name": "softmax", "seed": 9, "bleu": 99.0, "chrf": 1.0,
                                                   "valid_loss": "1.0", "max_update": 50}))
    assert compare.run_dir(tmp_path, "softmax", 1).name == "softmax"  # seed 1 keeps the single-seed layout
    compare.write_table(args, tmp_path)
    text = (tmp_path / "t.md").read_text()
    soft = next(line for line in text.splitlines() if line.startswith("| softmax"))
    assert "| 1, 2, 3 |" in soft and "22.00 ± 4.97 (20.00 / 22.00 / 24.00)" in soft and "99" not in soft
    ent = next(line for line in text.splitlines() if line.startswith("| entmax15"))
    assert "| 1 |" in ent and "| 19.00 | 38.00 |" in ent


def test_bad_seeds_are_refused(compare):
    for bad in ("1,x", "1,1", ""):
        with pytest.raises(SystemExit):
            compare.main(["--seeds", bad, "--table-only"])


def test_a_tagged_variant_has_its_own_directory_and_row(compare, tmp_path):
    args = SimpleNamespace(max_update=10, dim=8, warmup_updates=1, out=str(tmp_path / "t.md"))
    base = {"name": "alpha_entmax", "where": "w", "params": "1", "train_s": 1.0, "max_update": 10, "dim": 8,
            "warmup_updates": 1, "chrf": 1.0, "valid_loss": "2.0"}
    plain, variant = compare.run_dir(tmp_path, "alpha_entmax", 1), compare.run_dir(tmp_path, "alpha_entmax", 2, "a1")
    assert plain.name == "alpha_entmax" and variant.name == "alpha_entmax+a1-seed2"
    for out, extra in ((plain, {"bleu": 3.0, "seed": 1}),
                       (variant, {"bleu": 5.0, "seed": 2, "tag": "a1", "train_args": "--alpha-init 1.05"})):
        out.mkdir(parents=True)
        (out / "result.json").write_text(json.dumps({**base, **extra}))
    compare.write_table(args, tmp_path)
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert any(line.startswith("| alpha_entmax | w | 1 |") and "| 3.00 |" in line for line in lines)
    assert any(line.startswith("| alpha_entmax+a1 (`--alpha-init 1.05`) | w | 2 |") and "| 5.00 |" in line
               for line in lines)
    for bad in (["--tag", "x"], ["--train-args", "--alpha-init 1.05"], ["--tag", "a b", "--train-args", "-x"]):
        with pytest.raises(SystemExit):
            compare.main([*bad, "--table-only"])
