"""Average attention patterns: what data-informed attention pruning (Rugina et al. 2020) learns its masks from.

:class:`PatternAccumulator` sums attention probabilities per (layer, head, query position, key position) over many
batches and counts, per (query position, key position), how many real (query, key) pairs contributed, so the
average is a plain mean over the data with padding never counted.

Positions are those the model sees: token index within its own sentence, counted from its first real token.
fairseq left-pads sources and right-pads targets, and its learned and sinusoidal position embeddings start at the
first real token either way, so query ``i`` / key ``j`` of a left-padded row are stored at ``i - pad``/``j - pad``.
(The reference averaged padded coordinates, mixing token positions across sentences of different lengths.)

File layout (:func:`save_patterns` / :func:`load_patterns`): ``<name>.npy`` holds float32 averages of shape
``(layers, heads, max_len, max_len)`` — ``[l, h, i, j]`` = mean probability that query position ``i`` gave key
position ``j`` in layer ``l``, head ``h`` (0 where no pair was seen) — loadable with ``allow_pickle=False``;
``<name>.json`` holds the settings and ``counts``, the ``(max_len, max_len)`` number of pairs behind each average.
"""
import json
import os
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import Tensor

FORMAT_VERSION = 1


class PatternAccumulator:
    """Running sums of attention probabilities per (layer, head, query position, key position).

    Args:
        layers, heads: shape of the model's attention of one type (e.g. its encoder self attentions).
        max_len: positions at or beyond this are not collected (neither query nor key).
    """

    def __init__(self, layers: int, heads: int, max_len: int):
        for name, value in (("layers", layers), ("heads", heads), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.layers, self.heads, self.max_len = layers, heads, max_len
        self.sums = torch.zeros(layers, heads, max_len, max_len, dtype=torch.float64)
        self.counts = torch.zeros(max_len, max_len, dtype=torch.float64)
        self.sentences = 0

    def add(self, layer: int, weights: Tensor, query_padding: Optional[Tensor] = None,
            key_padding: Optional[Tensor] = None, count: bool = True) -> None:
        """Add one layer's attention probabilities ``weights`` (batch, heads, Lq, Lk).

        ``query_padding``/``key_padding``: bool (batch, L), True = padding (left or right; each row's real tokens
        must be contiguous). ``count``: whether this call's real pairs count toward the averages' denominators;
        pass True for exactly one layer per batch (every layer sees the same pairs).
        """
        if not 0 <= layer < self.layers:
            raise ValueError(f"layer {layer} is out of range for {self.layers} layers")
        if weights.dim() != 4 or weights.size(1) != self.heads:
            raise ValueError(f"weights must be (batch, {self.heads} heads, Lq, Lk), got {tuple(weights.shape)}")
        bsz, _, tgt_len, src_len = weights.shape
        q_start, q_len = _spans(query_padding, bsz, tgt_len, "query_padding")
        k_start, k_len = _spans(key_padding, bsz, src_len, "key_padding")
        weights = weights.detach().to(torch.float64, copy=False).cpu()
        for b in range(bsz):
            nq, nk = min(int(q_len[b]), self.max_len), min(int(k_len[b]), self.max_len)
            if nq == 0 or nk == 0:
                continue
            qs, ks = int(q_start[b]), int(k_start[b])
            self.sums[layer, :, :nq, :nk] += weights[b, :, qs:qs + nq, ks:ks + nk]
            if count:
                self.counts[:nq, :nk] += 1
        if count:
            self.sentences += bsz

    def averages(self) -> Tensor:
        """(layers, heads, max_len, max_len) float64 means (0 where nothing was seen)."""
        return self.sums / self.counts.clamp(min=1)


def _spans(padding: Optional[Tensor], bsz: int, length: int, name: str):
    """First real position and number of real positions of every row."""
    if padding is None:
        return torch.zeros(bsz, dtype=torch.long), torch.full((bsz,), length, dtype=torch.long)
    if padding.shape != (bsz, length):
        raise ValueError(f"{name} must be (batch, length) = ({bsz}, {length}), got {tuple(padding.shape)}")
    real = ~padding.to(torch.bool).cpu()
    n_real = real.sum(dim=1)
    start = torch.where(n_real > 0, real.to(torch.int8).argmax(dim=1), torch.zeros_like(n_real))
    positions = torch.arange(length).unsqueeze(0)
    contiguous = (real == ((positions >= start.unsqueeze(1)) & (positions < (start + n_real).unsqueeze(1))))
    if not bool(contiguous.all()):
        raise ValueError(f"{name}: every row's real tokens must be contiguous (left or right padding)")
    return start, n_real


# --------------------------------------------------------------------------------------------- files
def save_patterns(prefix: str, accumulator: PatternAccumulator, meta: Optional[Dict[str, Any]] = None) -> Dict[str, str]:
    """Write ``prefix.npy`` (float32 averages) and ``prefix.json`` (counts and ``meta``); returns the paths."""
    directory = os.path.dirname(prefix)
    if directory:
        os.makedirs(directory, exist_ok=True)
    array = accumulator.averages().to(torch.float32).numpy()
    np.save(prefix + ".npy", array, allow_pickle=False)
    info = {"format_version": FORMAT_VERSION, "layout": "[layer, head, query position, key position]",
            "shape": list(array.shape), "sentences": accumulator.sentences,
            "counts": accumulator.counts.to(torch.long).tolist(), **(meta or {})}
    with open(prefix + ".json", "w") as f:
        json.dump(info, f)
    return {"npy": prefix + ".npy", "json": prefix + ".json"}


def load_patterns(path: str, layers: Optional[int] = None, heads: Optional[int] = None,
                  min_len: Optional[int] = None) -> Tensor:
    """Averages from a ``.npy`` written by :func:`save_patterns` (or the reference's ``(L, 1, H, N, N)`` arrays),
    as a float32 tensor (layers, heads, N, N), checked against what the model expects; every problem raises a
    ``ValueError`` naming the file and the expected shape."""
    expected = f"(layers={layers if layers is not None else 'L'}, heads={heads if heads is not None else 'H'}, " \
               f"N, N) with N >= {min_len if min_len is not None else 1}"
    if not os.path.isfile(path):
        raise ValueError(f"attention pattern file {path} does not exist; collect it with the compute_attn_score "
                         f"task (expected an array of shape {expected})")
    with open(path, "rb") as f:
        head = f.read(6)
    if head != b"\x93NUMPY":
        raise ValueError(f"attention pattern file {path} is not a .npy array (it starts with {head!r}); give the "
                         f".npy that compute_attn_score wrote (expected {expected})")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as e:  # truncated, or an object array (never written by compute_attn_score)
        first = str(e).split(". ")[0]
        raise ValueError(f"attention pattern file {path} is truncated or corrupt ({first}); collect it again with "
                         f"compute_attn_score (expected {expected})") from None
    if array.ndim == 5 and array.shape[1] == 1:  # the reference's (L, 1, H, N, N)
        array = array[:, 0]
    if array.ndim != 4 or array.shape[2] != array.shape[3]:
        raise ValueError(f"attention pattern file {path} has shape {array.shape}; expected {expected}")
    problems = []
    if layers is not None and array.shape[0] != layers:
        problems.append(f"{array.shape[0]} layers")
    if heads is not None and array.shape[1] != heads:
        problems.append(f"{array.shape[1]} heads")
    if min_len is not None and array.shape[2] < min_len:
        problems.append(f"length {array.shape[2]}")
    if problems:
        raise ValueError(f"attention pattern file {path} has {', '.join(problems)} (shape {array.shape}) but the "
                         f"model needs {expected}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"attention pattern file {path} holds {array.dtype} values; patterns are average attention "
                         "probabilities (floats in [0, 1]) as compute_attn_score writes them")
    if not np.isfinite(array).all():
        raise ValueError(f"attention pattern file {path} contains NaN or infinite values; recollect it")
    if array.size and array.min() < 0:
        raise ValueError(f"attention pattern file {path} has negative values (down to {array.min():.3g}); patterns "
                         "are average attention probabilities: recollect it with compute_attn_score")
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))



def load_pattern_info(path: str, length: int) -> Optional[Dict[str, Any]]:
    """The JSON written next to a ``.npy`` pattern file (None if there is none, as for the reference's files),
    with ``counts`` turned into a (length, length) tensor; a JSON that does not fit the array raises."""
    json_path = os.path.splitext(path)[0] + ".json"
    if not os.path.isfile(json_path):
        return None
    try:
        with open(json_path) as f:
            info = json.load(f)
        counts = torch.tensor(info["counts"], dtype=torch.float64)
    except Exception as e:
        raise ValueError(f"attention pattern metadata {json_path} is not readable ({e}); recollect the patterns "
                         "or delete the .json to use the .npy alone") from None
    if tuple(counts.shape) != (length, length):
        raise ValueError(f"attention pattern metadata {json_path} has counts of shape {tuple(counts.shape)} but "
                         f"its .npy has length {length}; the two files do not belong together")
    info["counts"] = counts
    return info
