"""Importance sampling: pick a diverse subset of a binarised fairseq split by k-means over sentence embeddings and
write it out as a new split that ``fairseq-train --train-subset NAME`` trains on.

    fluence-sample DATA --path CKPT --split train --out-split train30 --size 0.3 \\
        --clusters 100 --strategy per-cluster [--seed 1] [--source-lang en --target-lang es] [--max-tokens 4096]

Pipeline (each step is a function of the Python API):

1. **Embeddings** (:func:`embed_dataset`): one vector per sentence, the mean of a trained model's features over the
   real tokens (padding excluded), in eval mode without gradients, batched by length. From a checkpoint
   (:func:`load_checkpoint_embedder`): a translation model's *encoder* output over the source side, or a language
   model's *decoder* features. Or any function ``embed(list_of_1d_token_tensors) -> (B, D)``.
2. **k-means** (:func:`cluster`): scikit-learn ``KMeans`` (or ``MiniBatchKMeans`` above ``minibatch_above``
   examples), ``random_state=seed`` and an explicit ``n_init``; any ``1 <= k <= n``.
3. **Selection** (:func:`select`), an exact number of examples, returned as sorted indices:

   * ``centroid``: the examples nearest each centroid; past k examples, the 2nd nearest of every cluster, then the
     3rd, ... (round-robin; within a round nearer examples first), so every cluster gives about the same count.
   * ``per-cluster``: the same fraction of every cluster (stratified), nearest-to-centroid first, with the per-cluster
     counts rounded by largest remainder so they add up to the requested size exactly.
   * ``diverse``: Fluence's diverse stream, round-robin over all k clusters (not a hard-coded 512), one example per
     cluster per round, in a seeded random order inside each cluster; the stream is cut at the requested size.
   * ``random``: a seeded uniform sample, the baseline (no embeddings needed).

4. **Output** (:func:`write_split`): the selected sentences of every language of a translation pair (same indices,
   so the pair stays aligned) or of an LM split, written with fairseq's indexed-dataset builder next to the data, and
   ``OUT_SPLIT.sampling.json`` with the indices, settings, cluster sizes and seed.

Fluence's defects fixed here: its percentage sampler added whole clusters while the total stayed below
the budget, dropped the cluster that crossed it and returned ``None`` when every cluster fitted; its diverse stream
walked clusters 0..511 whatever k was; it left k-means and embeddings to the caller.
"""
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

logger = logging.getLogger(__name__)

STRATEGIES = ("centroid", "per-cluster", "diverse", "random")
Size = Union[int, float, str]
EmbedFn = Callable[[List[torch.Tensor]], torch.Tensor]


# ------------------------------------------------------------------------------------------------- size
def resolve_size(size: Size, n: int) -> int:
    """The number of examples to select from ``n``: a fraction in (0, 1] (a float, or a string with a '.') or a
    count (an int, or a string of digits). Raises ``ValueError`` saying what is wrong."""
    if n < 1:
        raise ValueError("the data set is empty: there is nothing to sample from")
    if isinstance(size, str):
        text = size.strip()
        try:
            size = float(text) if any(c in text for c in ".eE") else int(text)
        except ValueError:
            raise ValueError(f"size {text!r} is neither a fraction (e.g. 0.3) nor a count (e.g. 5000)") from None
    if isinstance(size, bool) or not isinstance(size, Real):
        raise ValueError(f"size must be a fraction in (0, 1] or a count, got {size!r}")
    if isinstance(size, Integral):
        count = int(size)
        if not 1 <= count <= n:
            raise ValueError(f"size {count} is not between 1 and the {n} examples of the data set; give a count "
                             f"in [1, {n}] or a fraction such as 0.3")
        return count
    if not 0.0 < size <= 1.0 or math.isnan(size):
        raise ValueError(f"fraction {size} is not in (0, 1]; give e.g. 0.3 for 30%, or an integer count")
    count = int(round(size * n))
    if count < 1:
        raise ValueError(f"fraction {size} of {n} examples rounds to 0 examples; ask for a larger fraction")
    return count


# ---------------------------------------------------------------------------------------------- k-means
@dataclass
class Clustering:
    labels: np.ndarray  # (n,) cluster of every example
    centers: np.ndarray  # (k, D)
    distances: np.ndarray  # (n,) Euclidean distance of every example to its own centroid
    algorithm: str  # "kmeans" or "minibatch"

    @property
    def k(self) -> int:
        return len(self.centers)

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


def check_clusters(k, n: int) -> int:
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(f"the number of clusters must be an integer, got {k!r}")
    if k < 1:
        raise ValueError(f"the number of clusters must be at least 1, got {k}")
    if k > n:
        raise ValueError(f"{k} clusters asked for but the data set has only {n} examples; use --clusters <= {n}")
    return int(k)


def cluster(embeddings, k: int, seed: int = 1, n_init: int = 3, algorithm: str = "auto",
            minibatch_above: int = 100_000, batch_size: int = 4096, max_iter: int = 300) -> Clustering:
    """k-means of ``embeddings`` (n, D) into ``k`` clusters with scikit-learn, reproducible with ``seed``.

    ``algorithm``: "kmeans" (exact Lloyd), "minibatch" (``MiniBatchKMeans``, for corpora too large for Lloyd on one
    machine) or "auto" (minibatch above ``minibatch_above`` examples)."""
    from sklearn.cluster import KMeans, MiniBatchKMeans

    x = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D array (examples, dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("embeddings contain NaN or inf; check the model/embedding function")
    n = len(x)
    k = check_clusters(k, n)
    if algorithm == "auto":
        algorithm = "minibatch" if n > minibatch_above else "kmeans"
    if algorithm == "kmeans":
        model = KMeans(n_clusters=k, n_init=n_init, random_state=seed, max_iter=max_iter)
    elif algorithm == "minibatch":
        model = MiniBatchKMeans(n_clusters=k, n_init=n_init, random_state=seed, batch_size=batch_size,
                                max_iter=max_iter)
    else:
        raise ValueError(f"unknown k-means algorithm {algorithm!r}; choose auto, kmeans or minibatch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x)
    for w in caught:  # e.g. fewer distinct points than k: some clusters stay empty, selection copes with that
        logger.warning("k-means: %s", w.message)
    centers = model.cluster_centers_.astype(np.float32)
    # labels of the final centers for every example (MiniBatchKMeans' labels_ are already that; predict is exact)
    labels = model.predict(x).astype(np.int64)
    distances = np.linalg.norm(x - centers[labels], axis=1)
    return Clustering(labels=labels, centers=centers, distances=distances, algorithm=algorithm)


# -------------------------------------------------------------------------------------------- selection
def _members_by_distance(labels: np.ndarray, distances: np.ndarray, k: int) -> List[np.ndarray]:
    """Members of each cluster, nearest to the centroid first (ties by index, so the order is deterministic)."""
    order = np.lexsort((np.arange(len(labels)), distances, labels))  # by label, then distance, then index
    bounds = np.cumsum(np.bincount(labels, minlength=k))[:-1]
    return np.split(order, bounds)


def select_centroid(labels, distances, k: int, size: int) -> np.ndarray:
    """Round r takes the r-th nearest example of every cluster that still has one; a round is ordered by distance,
    so when the size ends inside a round the examples closest to their centroids are kept."""
    members = _members_by_distance(np.asarray(labels), np.asarray(distances), k)
    n = len(labels)
    rank = np.empty(n, dtype=np.int64)
    for m in members:
        rank[m] = np.arange(len(m))
    order = np.lexsort((np.arange(n), distances, rank))
    return np.sort(order[:size])


def per_cluster_quota(cluster_sizes: Sequence[int], size: int) -> np.ndarray:
    """Counts per cluster proportional to the cluster sizes that add up to ``size`` exactly (largest remainder:
    every cluster gets floor(share), the leftover goes to the largest fractional parts, ties to larger clusters
    then lower labels). No count exceeds its cluster because a share is never more than the cluster size."""
    sizes = np.asarray(cluster_sizes, dtype=np.int64)
    n = int(sizes.sum())
    if not 0 <= size <= n:
        raise ValueError(f"cannot take {size} examples from {n}")
    exact = sizes * size / n  # float is exact enough: the remainders only order the leftover
    quota = np.floor(exact).astype(np.int64)
    # integer remainders (sizes*size mod n) avoid float ties being broken by rounding noise
    remainder = (sizes * size) % n
    leftover = size - int(quota.sum())
    if leftover:
        order = np.lexsort((np.arange(len(sizes)), -sizes, -remainder))
        quota[order[:leftover]] += 1
    assert quota.sum() == size and (quota <= sizes).all()
    return quota


def select_per_cluster(labels, distances, k: int, size: int) -> np.ndarray:
    members = _members_by_distance(np.asarray(labels), np.asarray(distances), k)
    quota = per_cluster_quota([len(m) for m in members], size)
    chosen = [m[:q] for m, q in zip(members, quota)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def diverse_stream(labels, k: int, seed: int = 1) -> np.ndarray:
    """Every index once, round-robin over the k clusters (one per non-exhausted cluster per round, clusters in
    label order). Inside a cluster the order is a seeded permutation: Fluence used dataset order, which in a corpus
    sorted by document (here: Bible books) would favour the first documents of every cluster."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    n = len(labels)
    rank = np.empty(n, dtype=np.int64)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        rank[rng.permutation(members)] = np.arange(len(members))
    return np.lexsort((labels, rank))  # by round, then cluster


def select_diverse(labels, k: int, size: int, seed: int = 1) -> np.ndarray:
    return np.sort(diverse_stream(labels, k, seed)[:size])


def select_random(n: int, size: int, seed: int = 1) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy


@dataclass
class Selection:
    indices: np.ndarray  # sorted, unique
    strategy: str
    size: int
    seed: int
    clustering: Optional[Clustering] = None
    settings: Dict = field(default_factory=dict)

    def cluster_sizes(self) -> Optional[List[int]]:
        return None if self.clustering is None else self.clustering.sizes().tolist()

    def selected_per_cluster(self) -> Optional[List[int]]:
        if self.clustering is None:
            return None
        return np.bincount(self.clustering.labels[self.indices], minlength=self.clustering.k).tolist()


def select(embeddings, size: Size, clusters: int, strategy: str = "per-cluster", seed: int = 1,
           n: Optional[int] = None, **kmeans_kw) -> Selection:
    """Select ``size`` (fraction or count) examples. ``embeddings`` (n, D) may be None for ``random`` (then give
    ``n``). ``kmeans_kw`` go to :func:`cluster` (n_init, algorithm, minibatch_above, batch_size)."""
    check_strategy(strategy)
    if embeddings is not None:
        n = len(embeddings)
    if n is None:
        raise ValueError("give the embeddings, or n for the random strategy")
    count = resolve_size(size, n)
    settings = {"strategy": strategy, "size": size, "count": count, "n": n, "seed": seed}
    if strategy == "random":
        return Selection(select_random(n, count, seed), strategy, count, seed, None, settings)
    check_clusters(clusters, n)
    clustering = cluster(embeddings, clusters, seed=seed, **kmeans_kw)
    settings.update(clusters=clusters, kmeans=clustering.algorithm, **kmeans_kw)
    if strategy == "centroid":
        idx = select_centroid(clustering.labels, clustering.distances, clustering.k, count)
    elif strategy == "per-cluster":
        idx = select_per_cluster(clustering.labels, clustering.distances, clustering.k, count)
    else:
        idx = select_diverse(clustering.labels, clustering.k, count, seed)
    assert len(idx) == count and len(np.unique(idx)) == count
    return Selection(idx.astype(np.int64), strategy, count, seed, clustering, settings)


# ------------------------------------------------------------------------------------------- embeddings
def length_batches(sizes: Sequence[int], max_tokens: int = 4096, max_sentences: int = 256) -> List[np.ndarray]:
    """Index batches of similar lengths (sorted by length, so padding is small) with at most ``max_tokens``
    padded tokens and ``max_sentences`` sentences each; a sentence longer than max_tokens gets a batch alone."""
    sizes = np.asarray(sizes)
    order = np.argsort(sizes, kind="stable")
    batches, current, longest = [], [], 0
    for i in order:
        longest_if = max(longest, int(sizes[i]))
        if current and (longest_if * (len(current) + 1) > max_tokens or len(current) >= max_sentences):
            batches.append(np.array(current))
            current, longest_if = [], int(sizes[i])
        current.append(i)
        longest = longest_if
    if current:
        batches.append(np.array(current))
    return batches


def embed_dataset(dataset, embed: EmbedFn, max_tokens: int = 4096, max_sentences: int = 256,
                  progress: bool = True, desc: str = "embedding") -> np.ndarray:
    """(len(dataset), D) float32: ``embed`` applied to length-sorted batches of the dataset's token tensors, in
    dataset order. ``dataset[i]`` must be a 1-D token tensor (a fairseq indexed dataset)."""
    from tqdm import tqdm

    n = len(dataset)
    if n == 0:
        raise ValueError("the data set is empty: nothing to embed")
    sizes = getattr(dataset, "sizes", None)
    if sizes is None:
        sizes = [len(dataset[i]) for i in range(n)]
    out = None
    with torch.no_grad(), tqdm(total=n, desc=desc, unit="sent", disable=not progress, file=sys.stderr) as bar:
        for batch in length_batches(sizes, max_tokens, max_sentences):
            vectors = embed([dataset[int(i)] for i in batch])
            vectors = torch.as_tensor(vectors).detach().float().cpu().numpy()
            if vectors.shape[0] != len(batch) or vectors.ndim != 2:
                raise ValueError(f"the embedding function returned shape {tuple(vectors.shape)} for {len(batch)} "
                                 f"sentences; it must return (batch, dim)")
            if out is None:
                out = np.zeros((n, vectors.shape[1]), dtype=np.float32)
            out[batch] = vectors
            bar.update(len(batch))
    return out


def pad_tokens(tokens: List[torch.Tensor], pad: int, left_pad: bool) -> torch.Tensor:
    """(B, T) with ``pad`` on the left (fairseq's default for translation sources) or the right."""
    longest = max(len(t) for t in tokens)
    out = torch.full((len(tokens), longest), pad, dtype=torch.long)
    for b, t in enumerate(tokens):
        if left_pad:
            out[b, longest - len(t):] = t
        else:
            out[b, : len(t)] = t
    return out


class CheckpointEmbedder:
    """Mean-pooled features of a fairseq model over the real tokens of each sentence.

    ``kind="encoder"``: the encoder output of an encoder-decoder model (``encoder_out[0]`` is T x B x C).
    ``kind="decoder"``: a language model's final decoder features (``features_only=True``, B x T x C). The model is
    put in eval mode (no dropout) so the same sentence always embeds the same; the mean leaves out padding by
    masking it, so a sentence's vector does not depend on what it was batched with."""

    def __init__(self, model, pad: int, kind: str = "encoder", left_pad: bool = True, device: str = "cpu",
                 max_positions: Optional[int] = None):
        if kind not in ("encoder", "decoder"):
            raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
        self.model = model.eval().to(device)
        self.pad, self.kind, self.left_pad, self.device = pad, kind, left_pad, device
        self.max_positions = max_positions

    def _truncate(self, t: torch.Tensor) -> torch.Tensor:
        # a sentence longer than the positions the model knows is cut (its start is embedded) instead of failing
        if self.max_positions is not None and len(t) > self.max_positions:
            return t[: self.max_positions]
        return t

    @torch.no_grad()
    def __call__(self, tokens: List[torch.Tensor]) -> torch.Tensor:
        tokens = [self._truncate(torch.as_tensor(t, dtype=torch.long)) for t in tokens]
        if any(len(t) == 0 for t in tokens):
            raise ValueError("an empty sentence cannot be embedded")
        src = pad_tokens(tokens, self.pad, self.left_pad).to(self.device)
        lengths = torch.tensor([len(t) for t in tokens], device=self.device)
        real = src.ne(self.pad)
        if self.kind == "encoder":
            out = self.model.encoder(src, src_lengths=lengths)
            features = out["encoder_out"][0].transpose(0, 1)  # B x T x C
        else:
            decoder = getattr(self.model, "decoder", self.model)
            features = decoder(src, features_only=True)[0]  # B x T x C
        if features.shape[:2] != src.shape:
            raise ValueError(f"the model's features have shape {tuple(features.shape)}, which does not line up "
                             f"with the tokens {tuple(src.shape)}; mean pooling needs one vector per token")
        weights = real.unsqueeze(-1).to(features.dtype)
        return (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def load_checkpoint_embedder(path, data, device: str = "cpu", kind: str = "auto"):
    """(embedder, task) for a fairseq checkpoint, with its task pointed at ``data``. ``kind="auto"``: the encoder
    for models with one, the decoder features for language models."""
    from fairseq import checkpoint_utils

    import fluence_fairseq  # noqa: F401  (registers the fluence architectures the checkpoint may use)

    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": str(data)})
    model = models[0]
    has_encoder = getattr(model, "encoder", None) is not None
    if kind == "auto":
        kind = "encoder" if has_encoder else "decoder"
    if kind == "encoder" and not has_encoder:
        raise ValueError(f"{path} has no encoder (a language model?): use kind='decoder'")
    dictionary = task.source_dictionary if kind == "encoder" else task.target_dictionary
    left_pad = bool(getattr(cfg.task, "left_pad_source", True)) if kind == "encoder" else False
    part = model.encoder if kind == "encoder" else model.decoder
    max_positions = part.max_positions() if hasattr(part, "max_positions") else None
    if isinstance(max_positions, tuple):
        max_positions = max_positions[0]
    return CheckpointEmbedder(model, dictionary.pad(), kind, left_pad, device, max_positions), task


# -------------------------------------------------------------------------------------------- data sets
def split_prefixes(data, split: str, source_lang: Optional[str] = None, target_lang: Optional[str] = None
                   ) -> Dict[str, str]:
    """``{lang: path prefix}`` of a binarised split: both sides of a translation pair (``SPLIT.SRC-TGT.LANG``, either
    direction as fairseq's translation task accepts) or ``{"": DATA/SPLIT}`` for a monolingual (LM) split. With no
    languages given, a pair is detected when exactly one ``SPLIT.X-Y.X`` file set exists."""
    from fairseq.data import indexed_dataset

    data = str(data)

    def exists(prefix):
        return indexed_dataset.dataset_exists(prefix, impl=None) or (
            os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx"))

    if (source_lang is None) != (target_lang is None):
        raise ValueError("give both --source-lang and --target-lang, or neither")
    if source_lang is None:
        pairs = sorted({name.split(".")[1] for name in os.listdir(data)
                        if name.startswith(split + ".") and name.count(".") == 3 and name.endswith(".idx")})
        pairs = [p for p in pairs if "-" in p]
        if len(pairs) > 1:
            raise ValueError(f"{data} has several language pairs for split {split!r} ({', '.join(pairs)}); give "
                             f"--source-lang and --target-lang")
        if len(pairs) == 1:
            source_lang, target_lang = pairs[0].split("-")
        elif exists(os.path.join(data, split)):
            return {"": os.path.join(data, split)}
        else:
            raise ValueError(f"no binarised split {split!r} in {data} (looked for {split}.bin/.idx and "
                             f"{split}.SRC-TGT.LANG.bin/.idx)")
    for a, b in ((source_lang, target_lang), (target_lang, source_lang)):
        prefixes = {lang: os.path.join(data, f"{split}.{a}-{b}.{lang}") for lang in (source_lang, target_lang)}
        if all(exists(p) for p in prefixes.values()):
            return prefixes
    raise ValueError(f"no binarised split {split!r} for {source_lang}-{target_lang} in {data} "
                     f"(looked for {split}.{source_lang}-{target_lang}.{{{source_lang},{target_lang}}}.bin)")


def load_dictionary(data, lang: str):
    from fairseq.data import Dictionary

    path = os.path.join(str(data), f"dict.{lang}.txt" if lang else "dict.txt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: the data directory must be fairseq-preprocess output")
    return Dictionary.load(path)


def load_split(data, split, source_lang=None, target_lang=None):
    """``{lang: (indexed dataset, prefix, dictionary)}`` for every side of the split."""
    from fairseq.data import data_utils

    out = {}
    for lang, prefix in split_prefixes(data, split, source_lang, target_lang).items():
        dictionary = load_dictionary(data, lang)
        dataset = data_utils.load_indexed_dataset(prefix, dictionary)
        if dataset is None:
            raise ValueError(f"fairseq could not load {prefix}.bin/.idx")
        out[lang] = (dataset, prefix, dictionary)
    lengths = {lang: len(v[0]) for lang, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the sides of split {split!r} have different lengths {lengths}: the pair is not aligned")
    return out


def write_split(data, split: str, out_split: str, indices, source_lang=None, target_lang=None,
                overwrite: bool = False) -> List[str]:
    """Write ``indices`` of ``split`` as the new split ``out_split`` (every side, same indices, same dataset format
    as the input). Returns the written path prefixes."""
    from fairseq.data import indexed_dataset

    if out_split == split:
        raise ValueError(f"--out-split must differ from --split ({split!r}): the input would be overwritten")
    sides = load_split(data, split, source_lang, target_lang)
    indices = np.asarray(indices, dtype=np.int64)
    n = len(next(iter(sides.values()))[0])
    if len(indices) and (indices.min() < 0 or indices.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}) for split {split!r}")
    targets = []
    for lang, (dataset, prefix, dictionary) in sides.items():
        out_prefix = os.path.join(os.path.dirname(prefix), out_split + os.path.basename(prefix)[len(split):])
        if not overwrite and (os.path.exists(out_prefix + ".bin") or os.path.exists(out_prefix + ".idx")):
            raise FileExistsError(f"{out_prefix}.bin already exists; choose another --out-split or pass --overwrite")
        targets.append((dataset, prefix, dictionary, out_prefix))
    written = []
    for dataset, prefix, dictionary, out_prefix in targets:
        for suffix in (".bin", ".idx"):
            # replace a linked file (a data dir of symlinks to shared data) instead of writing through the link
            if os.path.islink(out_prefix + suffix):
                os.unlink(out_prefix + suffix)
        impl = indexed_dataset.infer_dataset_impl(prefix) or "mmap"
        builder = indexed_dataset.make_builder(out_prefix + ".bin", impl=impl, vocab_size=len(dictionary))
        for i in indices:
            builder.add_item(dataset[int(i)])
        builder.finalize(out_prefix + ".idx")
        written.append(out_prefix)
    return written


# ------------------------------------------------------------------------------------------------ driver
def sample_split(data, out_split: str, size: Size, clusters: int = 100, strategy: str = "per-cluster",
                 path=None, embed: Optional[EmbedFn] = None, embeddings=None, split: str = "train", seed: int = 1,
                 source_lang=None, target_lang=None, max_tokens: int = 4096, max_sentences: int = 256,
                 device: str = "cpu", progress: bool = True, overwrite: bool = False, save_embeddings=None,
                 n_init: int = 3, algorithm: str = "auto", minibatch_above: int = 100_000, log=print) -> Dict:
    """The whole pipeline; returns the report written to ``DATA/OUT_SPLIT.sampling.json``.

    Embeddings come from ``embeddings`` (an (n, D) array or a .npy path), else ``embed`` (a function of a list of
    token tensors), else the checkpoint ``path``. The random strategy needs none of them."""
    check_strategy(strategy)
    if out_split == split:
        raise ValueError(f"--out-split must differ from --split ({split!r}): the input would be overwritten")
    sides = load_split(data, split, source_lang, target_lang)
    langs = list(sides)
    n = len(sides[langs[0]][0])
    count = resolve_size(size, n)
    if strategy != "random":
        check_clusters(clusters, n)
    # fail before the (slow) embedding pass if the output exists
    for lang, (_, prefix, _) in sides.items():
        out_prefix = os.path.join(os.path.dirname(prefix), out_split + os.path.basename(prefix)[len(split):])
        if not overwrite and os.path.exists(out_prefix + ".bin"):
            raise FileExistsError(f"{out_prefix}.bin already exists; choose another --out-split or pass --overwrite")
    source = "none"
    t0 = time.time()
    if strategy != "random":
        if embeddings is not None:
            if isinstance(embeddings, (str, os.PathLike)):
                source = f"file {embeddings}"
                embeddings = np.load(embeddings)
            else:
                source = "array"
            embeddings = np.asarray(embeddings)
            if len(embeddings) != n:
                raise ValueError(f"{len(embeddings)} embeddings for {n} examples of split {split!r}")
        else:
            if embed is None:
                if path is None:
                    raise ValueError(f"strategy {strategy!r} needs embeddings: give --path CHECKPOINT (or "
                                     f"--embeddings FILE.npy); only --strategy random needs none")
                embedder, _ = load_checkpoint_embedder(path, data, device=device)
                embed, source = embedder, f"{embedder.kind} of {path}"
                side = langs[0] if embedder.kind == "encoder" else langs[-1]
            else:
                source, side = "function", langs[0]
            log(f"embedding {n} sentences of {split}{('.' + side) if side else ''} ({source})")
            embeddings = embed_dataset(sides[side][0], embed, max_tokens, max_sentences, progress)
            if save_embeddings:
                np.save(save_embeddings, embeddings)
                log(f"saved the embeddings to {save_embeddings}")
    t_embed = time.time() - t0
    kw = {"n_init": n_init, "algorithm": algorithm, "minibatch_above": minibatch_above}
    selection = select(embeddings, count, clusters, strategy, seed, n=n, **kw)
    written = write_split(data, split, out_split, selection.indices, source_lang, target_lang, overwrite)
    report = {
        "split": split, "out_split": out_split, "strategy": strategy, "size": size, "count": selection.size,
        "n": n, "fraction": selection.size / n, "seed": seed, "clusters": None if strategy == "random" else clusters,
        "kmeans": selection.settings.get("kmeans"), "n_init": n_init, "embeddings": source,
        "embedding_seconds": round(t_embed, 1), "files": [p + ".bin" for p in written],
        "cluster_sizes": selection.cluster_sizes(), "selected_per_cluster": selection.selected_per_cluster(),
        "indices": selection.indices.tolist(),
    }
    json_path = os.path.join(str(data), f"{out_split}.sampling.json")
    with open(json_path, "w") as f:
        json.dump(report, f)
    log(f"wrote {selection.size} of {n} examples ({selection.size / n:.1%}, {strategy}) as split {out_split!r}: "
        + ", ".join(p + ".{bin,idx}" for p in written) + f"; details in {json_path}")
    return report
