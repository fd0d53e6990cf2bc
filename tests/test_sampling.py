"""Importance sampling (``fluence_fairseq.sampling``): sizes, seeds, the four strategies, k-means edge cases, the
embeddings (padding-free mean of encoder / LM decoder features), and the written split as fairseq loads and trains
on it (``--train-subset``)."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import fairseq_helpers as H
from fluence_fairseq import sampling as S
from fluence_fairseq.cli import sample as sample_cli

ENC_DEC_ARCH = "fluence_transformer_tiny"
LM_ARCH = "fluence_transformer_lm_tiny"


def blobs(n=103, d=6, centers=5, seed=0):
    """Gaussian blobs: k-means has a clear answer, but the points are all distinct."""
    rng = np.random.default_rng(seed)
    mu = rng.normal(scale=8.0, size=(centers, d))
    return (mu[rng.integers(0, centers, n)] + rng.normal(size=(n, d))).astype(np.float32)


# ------------------------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("size,expected", [(0.3, 30), ("0.3", 30), (1.0, 100), (1, 1), (100, 100), ("25", 25),
                                           (0.004, 0)])
def test_resolve_size(size, expected):
    if expected == 0:
        with pytest.raises(ValueError, match="rounds to 0"):
            S.resolve_size(size, 100)
    else:
        assert S.resolve_size(size, 100) == expected


@pytest.mark.parametrize("size,message", [(101, "between 1 and the 100"), (0, "between 1"), (1.5, r"not in \(0, 1\]"),
                                          (-0.2, r"not in \(0, 1\]"), ("abc", "neither a fraction"),
                                          (True, "fraction in")])
def test_resolve_size_errors(size, message):
    with pytest.raises(ValueError, match=message):
        S.resolve_size(size, 100)


# ------------------------------------------------------------------------------------------ strategies
@pytest.mark.parametrize("strategy", S.STRATEGIES)
def test_same_seed_same_indices_other_seed_other_indices(strategy):
    x = np.random.default_rng(5).normal(size=(300, 4)).astype(np.float32)  # no clear clusters: seeds matter
    a = S.select(x, 0.3, 20, strategy, seed=1, n_init=1).indices
    b = S.select(x, 0.3, 20, strategy, seed=1, n_init=1).indices
    c = S.select(x, 0.3, 20, strategy, seed=2, n_init=1).indices
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("strategy", S.STRATEGIES)
@pytest.mark.parametrize("k", [1, 7, 103])  # one cluster, k not dividing n, one example per cluster
@pytest.mark.parametrize("size", [1, 0.3, 50, 103])
def test_exact_size_sorted_unique(strategy, k, size):
    x = blobs()
    sel = S.select(x, size, k, strategy, seed=3, n_init=1)
    expected = S.resolve_size(size, 103)
    assert len(sel.indices) == expected
    assert np.array_equal(sel.indices, np.unique(sel.indices))  # sorted, no repeats
    assert sel.indices.min() >= 0 and sel.indices.max() < 103
    if strategy != "random":
        assert sum(sel.cluster_sizes()) == 103 and sum(sel.selected_per_cluster()) == expected


def test_per_cluster_takes_the_same_fraction_of_every_cluster_nearest_first():
    x = blobs(n=400, centers=6, seed=1)
    sel = S.select(x, 0.3, 9, "per-cluster", seed=1)
    cl = sel.clustering
    share = cl.sizes() * 120 / 400
    got = np.array(sel.selected_per_cluster())
    assert got.sum() == 120
    assert np.all((got == np.floor(share)) | (got == np.ceil(share))), (got, share)
    chosen = np.zeros(400, bool)
    chosen[sel.indices] = True
    for c in range(cl.k):  # within a cluster, every chosen example is nearer its centroid than every unchosen one
        members = cl.labels == c
        if chosen[members].any() and (~chosen[members]).any():
            assert cl.distances[members & chosen].max() <= cl.distances[members & ~chosen].min()


def test_per_cluster_quota_is_exact_where_fluence_dropped_the_crossing_cluster():
    # Fluence added whole clusters until the next one crossed int(n*pct), dropping it (here: 50 -> only [50]),
    # and returned None when all clusters fitted
    assert S.per_cluster_quota([50, 30, 20], 50).tolist() == [25, 15, 10]
    assert S.per_cluster_quota([50, 30, 20], 100).tolist() == [50, 30, 20]
    quota = S.per_cluster_quota([7, 7, 7, 1], 11)  # shares 3.5, 3.5, 3.5, 0.5: largest remainders, larger first
    assert quota.sum() == 11 and quota.tolist() == [4, 4, 3, 0]
    assert S.per_cluster_quota([3, 0, 2], 2).tolist() == [1, 0, 1]  # an empty cluster gets nothing


def test_centroid_takes_nearest_of_each_cluster_then_round_robin():
    x = blobs(n=200, centers=4, seed=2)
    k = 8
    sel = S.select(x, k, k, "centroid", seed=1)
    cl = sel.clustering
    assert sorted(cl.labels[sel.indices].tolist()) == list(range(k))  # one per cluster
    for i in sel.indices:  # and it is that cluster's nearest member
        members = cl.labels == cl.labels[i]
        assert cl.distances[i] == cl.distances[members].min()
    sel = S.select(x, 3 * k + 2, k, "centroid", seed=1)  # 3 full rounds and 2 more
    counts = np.array(sel.selected_per_cluster())
    sizes = cl.sizes()
    assert counts.sum() == 3 * k + 2
    assert np.all(counts >= np.minimum(sizes, 3)) and np.all(counts <= np.minimum(sizes, 4))  # 3 rounds + part
    fourth = cl.labels[sel.indices][counts[cl.labels[sel.indices]] == 4]
    # the partial 4th round keeps the 4th-nearest examples that are closest to their centroids
    ranks = {c: np.sort(cl.distances[cl.labels == c]) for c in range(k)}
    picked = sorted(ranks[c][3] for c in set(fourth.tolist()))
    others = [ranks[c][3] for c in range(k) if c not in set(fourth.tolist()) and len(ranks[c]) > 3]
    assert not others or max(picked) <= min(others)


def test_diverse_stream_works_past_512_clusters():
    # Fluence's stream walked clusters 0..511 whatever k was: with 600 clusters the last 88 were never drawn
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.arange(600), rng.integers(0, 600, 400)])
    stream = S.diverse_stream(labels, 600, seed=1)
    assert sorted(stream.tolist()) == list(range(1000))  # every example exactly once
    assert sorted(labels[stream[:600]].tolist()) == list(range(600))  # the first round: one from each cluster
    round_of = np.empty(1000, int)
    for c in range(600):
        members = stream[labels[stream] == c]
        round_of[members] = np.arange(len(members))
    assert np.all(np.diff(round_of[stream]) >= 0)  # rounds never interleave


def test_random_needs_no_embeddings_and_is_uniformish():
    sel = S.select(None, 0.5, 0, "random", seed=4, n=10_000)
    assert len(sel.indices) == 5000 and sel.clustering is None
    assert 0.45 < np.mean(sel.indices < 5000) < 0.55


def test_kmeans_minibatch_and_more_clusters_than_distinct_points():
    x = blobs(n=300)
    cl = S.cluster(x, 10, seed=1, algorithm="minibatch", n_init=1, batch_size=64)
    assert cl.algorithm == "minibatch" and cl.sizes().sum() == 300 and len(cl.centers) == 10
    dup = np.repeat(blobs(n=4), 5, axis=0)  # 20 examples, 4 distinct points, k=6: some clusters stay empty
    sel = S.select(dup, 8, 6, "per-cluster", seed=1, n_init=1)
    assert len(sel.indices) == 8


@pytest.mark.parametrize("k,size,strategy,message", [
    (11, 5, "per-cluster", "11 clusters asked for but the data set has only 10 examples"),
    (0, 5, "centroid", "at least 1"),
    (3, 11, "diverse", "between 1 and the 10"),
    (3, 5, "kmeans++", "unknown strategy 'kmeans\\+\\+'"),
])
def test_clear_errors(k, size, strategy, message):
    with pytest.raises(ValueError, match=message):
        S.select(blobs(n=10), size, k, strategy)


# ------------------------------------------------------------------------------------------- embeddings
def test_embed_dataset_restores_dataset_order():
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(4, 40, (int(n),), generator=g) for n in torch.randint(1, 30, (57,), generator=g)]
    calls = []

    def embed(tokens):
        calls.append(len(tokens))
        return torch.stack([torch.tensor([float(len(t)), float(t[0])]) for t in tokens])

    out = S.embed_dataset(data, embed, max_tokens=64, progress=False)
    assert out.shape == (57, 2) and len(calls) > 1  # really batched, several batches
    assert np.array_equal(out[:, 0], [len(t) for t in data]) and np.array_equal(out[:, 1], [t[0] for t in data])
    with pytest.raises(ValueError, match="must return \\(batch, dim\\)"):
        S.embed_dataset(data, lambda toks: torch.zeros(len(toks)), progress=False)


@pytest.mark.parametrize("arch,kind,left_pad", [(ENC_DEC_ARCH, "encoder", True), (ENC_DEC_ARCH, "encoder", False),
                                                 (LM_ARCH, "decoder", False)])
def test_embedding_ignores_padding(arch, kind, left_pad):
    model, task, _ = H.build(arch)
    d = task.source_dictionary
    embed = S.CheckpointEmbedder(model, d.pad(), kind=kind, left_pad=left_pad)
    g = torch.Generator().manual_seed(1)
    short = torch.cat([H.random_tokens(task, 1, 5, g)[0], torch.tensor([d.eos()])])
    long = torch.cat([H.random_tokens(task, 1, 17, g)[0], torch.tensor([d.eos()])])
    alone = embed([short])
    batched = embed([short, long])
    assert alone.shape == (1, 64) and batched.shape == (2, 64)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batched[1], embed([long])[0], atol=1e-5, rtol=1e-5)
    assert not model.training  # eval mode: no dropout noise
    torch.testing.assert_close(embed([short]), alone)  # deterministic


# ------------------------------------------------------------------------------------ written splits
def token_embed(tokens):
    """An embedding function as a user would give it: a bag of token ids hashed into 8 dimensions."""
    out = torch.zeros(len(tokens), 8)
    for b, t in enumerate(tokens):
        out[b].index_add_(0, t % 8, torch.ones(len(t)))
    return out / torch.tensor([[len(t)] for t in tokens], dtype=torch.float)


def copy_data(src, tmp_path):
    return shutil.copytree(src, tmp_path / "data-bin")


def test_translation_split_written_aligned_and_loaded_by_the_task(translation_bin, tmp_path):
    from fairseq.data import Dictionary, data_utils
    from fairseq.tasks.translation import TranslationConfig, TranslationTask

    data = copy_data(translation_bin, tmp_path)
    report = S.sample_split(data, "train30", 0.3, clusters=7, strategy="per-cluster", embed=token_embed,
                            progress=False, log=lambda *_: None)
    idx = np.array(report["indices"])
    assert len(idx) == 36 and report["count"] == 36 and sum(report["cluster_sizes"]) == 120
    assert report["selected_per_cluster"] is not None and sum(report["selected_per_cluster"]) == 36
    for lang in ("in", "out"):
        d = Dictionary.load(str(data / f"dict.{lang}.txt"))
        full = data_utils.load_indexed_dataset(str(data / f"train.in-out.{lang}"), d)
        sub = data_utils.load_indexed_dataset(str(data / f"train30.in-out.{lang}"), d)
        assert len(sub) == 36
        assert all(torch.equal(sub[j], full[int(i)]) for j, i in enumerate(idx))
    # the translation task reads it as --train-subset would: source and target stay paired
    cfg = TranslationConfig(data=str(data), source_lang="in", target_lang="out", dataset_impl="mmap")
    task = TranslationTask.setup_task(cfg)
    task.load_dataset("train30")
    task.load_dataset("train")
    pairs, full = task.datasets["train30"], task.datasets["train"]
    for j, i in enumerate(idx):
        assert torch.equal(pairs[j]["source"], full[int(i)]["source"])
        assert torch.equal(pairs[j]["target"], full[int(i)]["target"])
    with pytest.raises(FileExistsError, match="--overwrite"):
        S.sample_split(data, "train30", 0.3, strategy="random", progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="must differ"):
        S.sample_split(data, "train", 0.3, strategy="random", progress=False, log=lambda *_: None)


def test_lm_split_single_side(lm_bin, tmp_path):
    from fairseq.data import Dictionary, data_utils

    data = copy_data(lm_bin, tmp_path)
    report = S.sample_split(data, "small", 40, strategy="random", seed=3, progress=False, log=lambda *_: None)
    d = Dictionary.load(str(data / "dict.txt"))
    full = data_utils.load_indexed_dataset(str(data / "train"), d)
    sub = data_utils.load_indexed_dataset(str(data / "small"), d)
    assert len(sub) == 40 and report["clusters"] is None
    assert all(torch.equal(sub[j], full[i]) for j, i in enumerate(report["indices"]))


@pytest.mark.slow  # three fairseq processes, ~25 s alone (and much more on a busy machine)
def test_command_from_checkpoint_then_fairseq_train_on_the_subset(translation_bin, tmp_path):
    """End to end: a trained checkpoint embeds, the command writes train30, fairseq-train trains on it."""
    data = copy_data(translation_bin, tmp_path)
    H.run_fairseq("train", [data, "--user-dir", "fluence_fairseq", "--arch", ENC_DEC_ARCH, "--task", "translation",
                            "--source-lang", "in", "--target-lang", "out", *H.tiny_train_flags(tmp_path / "ck", 2),
                            "--disable-validation"])
    proc = subprocess.run([sys.executable, "-m", "fluence_fairseq.cli.sample", data, "--path",
                           tmp_path / "ck" / "checkpoint_last.pt", "--out-split", "train30", "--size", "0.3",
                           "--clusters", "5", "--strategy", "centroid", "--seed", "1", "--no-progress-bar"],
                          cwd=H.REPO, env=H.clean_env(), text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 36 of 120 examples" in proc.stdout
    report = json.loads((data / "train30.sampling.json").read_text())
    assert report["embeddings"].startswith("encoder of") and len(report["cluster_sizes"]) == 5
    out = H.run_fairseq("train", [data, "--user-dir", "fluence_fairseq", "--arch", ENC_DEC_ARCH, "--task",
                                  "translation", "--source-lang", "in", "--target-lang", "out", "--train-subset",
                                  "train30", *H.tiny_train_flags(tmp_path / "ck2", 2), "--disable-validation"])
    assert "loaded 36 examples" in out and "train30.in-out.in" in out and "done training" in out


def test_command_errors_are_clear(translation_bin, capsys):
    with pytest.raises(SystemExit) as e:
        sample_cli.main([str(translation_bin), "--out-split", "x", "--size", "0.3", "--clusters", "500"])
    assert e.value.code == 2
    assert "500 clusters asked for but the data set has only 120 examples" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli.main([str(translation_bin), "--out-split", "x", "--size", "121", "--strategy", "random"])
    assert "size 121 is not between 1 and the 120" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli.main([str(translation_bin), "--out-split", "x", "--size", "0.3"])  # per-cluster without a model
    assert "needs embeddings: give --path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_cli.main([str(translation_bin), "--split", "nope", "--out-split", "x", "--size", "0.3"])
    assert "no binarised split 'nope'" in capsys.readouterr().err
