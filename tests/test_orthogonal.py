"""HEX orthogonal projection (fluence_fairseq.orthogonal): the op against the paper's formula, orthogonality for any
batch size, gradients, batch-size-1 behaviour, the hex_classifier model's logit modes, the synthetic spurious data
set, and a fairseq-train/fairseq-validate run on it."""
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import fairseq_helpers as H
from fluence_fairseq.orthogonal import BagOfWordsEncoder, HexClassificationHead, hex_project

sys.path.insert(0, str(H.REPO / "examples" / "classification"))
import spurious_data as D  # noqa: E402

HEAD = "sentence_classification_head"


def paper_formula(f_a: np.ndarray, f_g: np.ndarray) -> np.ndarray:
    """(I - F_G (F_G^T F_G)^-1 F_G^T) F_A, written out with an explicit n x n identity (independent of the op)."""
    n = f_a.shape[0]
    return (np.eye(n) - f_g @ np.linalg.inv(f_g.T @ f_g) @ f_g.T) @ f_a


def rand(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ the op
@pytest.mark.parametrize("n", [3, 7, 31, 32, 33, 100])
@pytest.mark.parametrize("k", [2, 3])
def test_projection_is_orthogonal_to_naive_logits_for_any_batch_size(n, k):
    f_a, f_g = rand(n, k, n), rand(n, k, n + 1000)
    f_p = hex_project(f_a, f_g)
    assert f_p.shape == (n, k)
    # relative to the sizes involved (the ridge's worst case is sqrt(1e-6)/2 = 5e-4; random F_G is far better)
    assert (f_g.T @ f_p).abs().max() <= 1e-5 * f_g.norm() * f_a.norm()
    if n > k:
        assert f_p.abs().max() > 1e-3  # not trivially zero: n > k leaves directions to keep
    else:
        assert f_p.abs().max() < 1e-3 * f_a.abs().max()  # n <= k: F_G spans the batch, nothing is left


@pytest.mark.parametrize("n", [5, 16, 33])
def test_projection_equals_the_paper_formula(n):
    f_a, f_g = rand(n, 2, 7 * n), rand(n, 2, 7 * n + 1)
    expected = paper_formula(f_a.numpy(), f_g.numpy())
    np.testing.assert_allclose(hex_project(f_a, f_g, ridge=0.0).numpy(), expected, atol=1e-10)
    np.testing.assert_allclose(hex_project(f_a, f_g).numpy(), expected, atol=1e-5)
    # and not Fluence's I - P F_A (notes §3.5), which is not even (n, K)-shaped for n != K
    assert hex_project(f_a, f_g).shape == f_a.shape


def test_projection_keeps_dtype_and_removes_naive_part_exactly():
    main, f_g = rand(20, 2, 1).float(), rand(20, 2, 2).float()
    f_p = hex_project(main + f_g, f_g)  # F_A = F_L + F_G (no bias): (I - P) F_A = (I - P) F_L
    assert f_p.dtype == torch.float32
    torch.testing.assert_close(f_p, hex_project(main, f_g), atol=1e-5, rtol=1e-5)


def test_collinear_naive_columns_are_stable_and_still_orthogonal():
    # two classes with opposite naive logits: F_G^T F_G is singular; the ridge keeps the result finite
    col = rand(40, 1, 3)
    f_g = torch.cat([col, -col], dim=1)
    f_a = rand(40, 2, 4).requires_grad_(True)
    f_p = hex_project(f_a, f_g)
    assert torch.isfinite(f_p).all()
    assert (f_g.T @ f_p).abs().max() <= 1e-3 * f_g.norm() * f_a.norm()
    f_p.square().sum().backward()
    assert torch.isfinite(f_a.grad).all()


def test_gradients_are_finite_and_match_finite_differences():
    f_a = rand(9, 3, 11).requires_grad_(True)
    f_g = rand(9, 3, 12).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, g: hex_project(a, g, ridge=1e-6), (f_a, f_g))
    loss = torch.nn.functional.cross_entropy(hex_project(f_a.float(), f_g.float()), torch.tensor([0, 1, 2] * 3))
    loss.backward()
    assert torch.isfinite(f_a.grad).all() and torch.isfinite(f_g.grad).all()
    assert f_g.grad.abs().sum() > 0  # the naive logits receive gradient through the projector


def test_batch_of_one_gives_zero_logits():
    f_a, f_g = rand(1, 2, 5), rand(1, 2, 6)
    f_p = hex_project(f_a, f_g)
    assert f_p.abs().max() < 1e-5 * f_a.abs().max()  # one example: the naive logits span the whole batch
    assert hex_project(f_a, f_g, ridge=0.0).abs().max() < 1e-12
    # n <= K in general: nothing is left
    assert hex_project(rand(3, 3, 1), rand(3, 3, 2)).abs().max() < 1e-4


def test_zero_naive_logits_leave_f_a_unchanged():
    f_a = rand(6, 2, 9)
    torch.testing.assert_close(hex_project(f_a, torch.zeros(6, 2, dtype=torch.float64)), f_a)


def test_intercept_option_also_removes_the_constant():
    f_a, f_g = rand(12, 2, 1), rand(12, 2, 2)
    f_p = hex_project(f_a, f_g, intercept=True)
    scale = f_a.norm() * f_g.norm()
    assert f_p.sum(0).abs().max() < 1e-5 * scale and (f_g.T @ f_p).abs().max() < 1e-5 * scale
    assert hex_project(f_a, f_g).sum(0).abs().max() > 1e-3  # the paper's projection keeps the constant


@pytest.mark.parametrize("bad, match", [
    ((torch.zeros(3, 2), torch.zeros(4, 2)), "same batch size"),
    ((torch.zeros(3), torch.zeros(3, 2)), "2-D"),
    ((torch.zeros(0, 2), torch.zeros(0, 2)), "empty"),
])
def test_bad_shapes_raise_clear_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        hex_project(*bad)


def test_negative_ridge_is_rejected():
    with pytest.raises(ValueError, match="ridge"):
        hex_project(torch.zeros(3, 2), torch.zeros(3, 2), ridge=-1.0)


# ------------------------------------------------------------------------------------------------ modules
def test_bag_of_words_ignores_order_and_padding():
    bow = BagOfWordsEncoder(10, 4, padding_idx=1, hidden_dim=3)
    x = torch.tensor([[4, 5, 6, 1, 1], [6, 4, 5, 1, 1], [4, 5, 6, 7, 1]])
    h = bow(x)
    torch.testing.assert_close(h[0], h[1])  # permuted tokens: same features
    assert not torch.allclose(h[0], h[2])
    torch.testing.assert_close(bow(x[:1, :3]), h[:1])  # padding does not count


def test_head_logits_follow_the_paper_definitions():
    head = HexClassificationHead(8, 6, 4, 3).eval()
    pooled, h_g = torch.randn(5, 8), torch.randn(5, 4)
    hx = head.hex_logits(pooled, h_g)
    h_a = head.main_features(pooled)
    w, b = head.out_proj.weight, head.out_proj.bias
    torch.testing.assert_close(hx.full, h_a @ w[:, :6].T + h_g @ w[:, 6:].T + b)
    torch.testing.assert_close(hx.naive, h_g @ w[:, 6:].T + b)
    torch.testing.assert_close(hx.main, h_a @ w[:, :6].T + b)


# ------------------------------------------------------------------------------------------------ the model
def build(extra=()):
    model, task, args = H.build("hex_classifier_tiny", ["--dropout", "0", *extra])
    model.register_classification_head(HEAD, num_classes=2)
    return model, task, args


def test_model_logit_modes():
    model, task, args = build()
    x = H.random_tokens(task, 12, 9, torch.Generator().manual_seed(0))
    model.train()
    train_logits, extra = model(x, classification_head_name=HEAD)
    hx = extra["hex"]
    projected = train_logits - args.hex_naive_weight * hx.naive
    # the trained logits minus the naive term are orthogonal to the naive logits
    assert (hx.naive.T @ projected).abs().max() < 1e-4 * hx.naive.norm() * projected.norm() + 1e-7
    model.eval()
    eval_logits, extra = model(x, classification_head_name=HEAD)
    torch.testing.assert_close(eval_logits, extra["hex"].main)  # prediction uses F_L = f([h_A, 0])
    features, _ = model(x)  # no head: pooled features
    assert features.shape == (12, args.encoder_embed_dim)


def test_no_hex_baseline_trains_and_evaluates_full_logits():
    model, task, _ = build(["--no-hex"])
    x = H.random_tokens(task, 6, 7)
    for mode in (model.train, model.eval):
        mode()
        logits, extra = model(x, classification_head_name=HEAD)
        torch.testing.assert_close(logits, extra["hex"].full)


def test_no_naive_needs_no_hex():
    with pytest.raises(ValueError, match="--no-hex"):
        build(["--no-naive"])
    model, task, _ = build(["--no-hex", "--no-naive"])
    assert model.naive is None
    logits, _ = model(H.random_tokens(task, 4, 5), classification_head_name=HEAD)
    assert logits.shape == (4, 2)


def test_small_batch_warns_once_and_trains_nothing_through_the_projection():
    model, task, _ = build(["--hex-naive-weight", "0"])
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits, _ = model(H.random_tokens(task, 1, 6), classification_head_name=HEAD)
        model(H.random_tokens(task, 2, 6), classification_head_name=HEAD)
    assert sum("no HEX training signal" in str(w.message) for w in caught) == 1
    assert logits.abs().max() < 1e-4


def test_unknown_head_and_logit_kind_are_reported():
    model, task, _ = build()
    x = H.random_tokens(task, 3, 5)
    with pytest.raises(KeyError, match="no classification head"):
        model(x, classification_head_name="nope")
    with pytest.raises(ValueError, match="logits must be one of"):
        model(x, classification_head_name=HEAD, logits="bogus")


# ------------------------------------------------------------------------------------------------ the data
def test_spurious_data_rule_and_cue_rates():
    train, labels = D.make_split(2000, 0.95, seed=3)
    assert [D.subject_first(s) for s in train] == labels  # the label is the order rule
    agree = np.mean([D.cue_of(s) == y for s, y in zip(train, labels)])
    assert 0.93 < agree < 0.97
    test, test_labels = D.make_split(2000, 0.5, seed=4)
    assert 0.45 < np.mean([D.cue_of(s) == y for s, y in zip(test, test_labels)]) < 0.55
    assert abs(np.mean(labels) - 0.5) < 0.01
    # deterministic with a seed
    assert D.make_split(50, 0.95, seed=3) == D.make_split(50, 0.95, seed=3)
    assert D.make_split(50, 0.95, seed=3) != D.make_split(50, 0.95, seed=5)


def test_bag_of_words_statistics_do_not_reveal_the_order_rule():
    sentences, labels = D.make_split(4000, 0.5, seed=8)
    # every word type's frequency is the same in both classes (up to sampling noise)
    for word in D.SUBJECTS + D.OBJECTS:
        rates = [np.mean([word in s for s, y in zip(sentences, labels) if y == c]) for c in (0, 1)]
        assert abs(rates[0] - rates[1]) < 0.04, word


@pytest.mark.slow
def test_fairseq_train_and_validate_on_the_spurious_data(tmp_path):
    raw = D.generate(tmp_path, {"train": 200, "valid": 40, "test": 40}, seed=2)
    data = D.binarize(raw, tmp_path / "bin")
    assert (data / "input0" / "dict.txt").exists() and (data / "label" / "train.bin").exists()
    save = tmp_path / "ckpt"
    common = ["--user-dir", "fluence_fairseq", "--task", "sentence_prediction", "--num-classes", "2",
              "--criterion", "sentence_prediction", "--cpu", "--num-workers", "0"]
    out = H.run_fairseq("train", [data, *common, "--arch", "hex_classifier_tiny", "--batch-size", "16",
                                  "--optimizer", "adam", "--lr", "0.002", "--max-update", "12", "--seed", "1",
                                  "--save-dir", save, "--no-epoch-checkpoints", "--log-format", "simple",
                                  "--log-interval", "4"])
    assert "hex_classifier" in out and (save / "checkpoint_last.pt").exists()
    val = H.run_fairseq("validate", [data, *common, "--path", save / "checkpoint_last.pt",
                                     "--valid-subset", "test", "--batch-size", "64"])
    acc = [float(a) for a in __import__("re").findall(r"accuracy ([0-9.]+)", val)]
    assert acc and 0.0 <= acc[-1] <= 100.0

