"""Orthogonal projection of superficial features (HEX; Wang, He, Lipton & Xing, ICLR 2019, "Learning Robust
Representations by Projecting Superficial Statistics Out") for fairseq sentence classification.

The method. A *main* network computes a representation ``h_A`` of the input; a *naive* network that by construction
can only see superficial statistics (the paper's NGLCM sees texture; ours, :class:`BagOfWordsEncoder`, sees which
tokens occur but not their order) computes ``h_G``. One shared linear classifier ``f`` gives, for a batch of n
examples and K classes (each an n x K matrix, rows = examples)::

    F_A = f([h_A, h_G])      F_G = f([0, h_G])      F_L = f([h_A, 0])
    F_P = (I - F_G (F_G^T F_G)^-1 F_G^T) F_A                 (paper, eq. 4)

Training minimises the cross entropy of ``F_P``; prediction uses ``F_L``. ``F_G (F_G^T F_G)^-1 F_G^T`` is the n x n
orthogonal projector onto the column space of ``F_G`` *in batch space*: ``F_P`` keeps only what the logits vary by
across the batch that the naive logits cannot linearly explain, so ``F_G^T F_P = 0``. Because
``F_A - F_G = F_L - b`` (b the classifier's bias), ``F_P = (I - P)(F_L - b)``: training sees the main logits with
the naive part projected out. The formula was checked against the authors' code (github.com/HaohanWang/HEX,
``scripts/model.py``: ``y_conv_loss - F_G inv(F_G^T F_G) F_G^T y_conv_loss``, loss on that, prediction from the
``[h_A, 0]`` logits).

Fixed here compared with Fluence's ``HEXProjection``:

* Fluence returns ``I - F_G (F_G^T F_G + lambda I)^-1 F_G^T F_A``, subtracting from the identity instead of from
  ``F_A``; we return ``F_A - F_G (...)^-1 F_G^T F_A``, the paper's ``(I - P) F_A``.
* Fluence needs the batch size fixed in its config (its identity buffer and a ``Linear(hidden, bs//2)``); our
  projection is computed from the batch it gets, any n, without forming an n x n matrix (O(n K^2)).

Stability: ``(F_G^T F_G)^-1`` is a K x K inverse that is singular when naive logit columns are collinear (with two
classes the two columns are often nearly opposite), and its gradient then explodes. :func:`hex_project` uses a ridge
``eps = ridge * ||F_G||_F^2`` (scale-free; ``ridge=0`` gives the exact pseudo-inverse) and computes in float64.
The residual ``F_G^T F_P = eps (F_G^T F_G + eps I)^-1 F_G^T F_A`` is at most ``sqrt(ridge)/2 * ||F_G|| ||F_A||``
(1e-6 by default: 5e-4 relative in the worst case, ~1e-10 when ``F_G`` is well conditioned).

Batch size: any n >= 1. When the naive logits span every direction of the batch (n <= rank(F_G) <= K, e.g. a batch
of one), ``I - P`` is (almost) zero, so ``F_P`` is ~0 and the batch carries no HEX training signal (a batch of
one cannot tell superficial from semantic variation). That is the formula's behaviour, kept on purpose (no silent
fallback to ``F_A``, which would train on the superficial cue); :class:`HexClassifierModel` warns once. Use
batches much larger than K (fairseq's last, smaller batch is fine as long as it has more than K examples).

The fairseq model (:mod:`fluence_fairseq.models.hex_classifier`; ``--arch hex_classifier_tiny`` / ``hex_classifier_small`` / ``hex_classifier``, for
``--task sentence_prediction --criterion sentence_prediction``): a fluence transformer encoder (any registry
attention: ``--encoder-self-attention``) + :class:`BagOfWordsEncoder` + a classification head whose last linear
layer is the shared ``f``. In training its logits are ``F_P + lambda F_G`` (``--hex-naive-weight lambda``), in
evaluation ``F_L``; ``--no-hex`` trains and evaluates ``F_A`` (the same network without the projection: the fair
baseline), ``--no-naive`` drops the naive branch (the main encoder alone).

``--hex-naive-weight`` (lambda) is the "another form" in the authors' code (the commented variant
``F_P + lambda F_G``): without it the naive branch only receives gradient *through the projector*, which rewards it
for spanning directions the main logits do **not** need, i.e. it is pushed away from the very cue it should absorb.
With ``lambda > 0`` the naive logits are trained to predict the label from superficial statistics, so they capture
the spurious cue and the projection removes it from the main logits. See ``examples/classification/README.md``.

Two additions (not in the paper) without which HEX still followed the spurious cue on our data, and with which it
never did (measurements in ``docs/fluence_utilities.md``); off by default, so the defaults stay the paper's method:

* ``--hex-center`` (``hex_project(..., center=True)``): project out the span of the *batch-centred* naive logits,
  and apply it to ``F_L``. With two classes the two naive logit columns are nearly collinear and their span misses
  the constant, so a cue indicator is only partly removed by the paper's projection; centring removes it exactly
  while keeping ``F_L``'s batch mean (the class prior) trainable.
* ``--hex-orth-penalty W`` with ``--criterion hex_sentence_prediction``: the projection hides the naive-explained
  part of ``F_L`` from the loss but does not remove it from ``F_L``: it gets no gradient and stays whatever the main
  features carry incidentally, and prediction uses ``F_L``, so the cue comes back at test time. The penalty
  ``W * ||P_c F_L||^2`` (:func:`hex_penalty`, per class by default: ``--hex-penalty-scope``) drives it to zero. It
  needs the labels, so the criterion (:mod:`fluence_fairseq.criterions.hex`) computes it (``model.hex_pending_penalty(targets)``); the model warns if a
  training penalty is never consumed (e.g. with the stock ``sentence_prediction`` criterion).
"""
import logging
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "hex_project", "hex_penalty", "HexLogits", "BagOfWordsEncoder", "HexClassificationHead", "LOGIT_KINDS",
]


# ---------------------------------------------------------------------------------------------- the op
def hex_project(f_a: Tensor, f_g: Tensor, ridge: float = 1e-6, intercept: bool = False,
                center: bool = False) -> Tensor:
    """``F_P = (I - F_G (F_G^T F_G + eps I)^-1 F_G^T) F_A`` with ``eps = ridge * ||F_G||_F^2`` (paper eq. 4).

    Args:
        f_a: (n, K) logits of the whole network on ``[h_A, h_G]``.
        f_g: (n, K') logits of the naive branch alone (``[0, h_G]``); usually K' == K.
        ridge: relative ridge (>= 0). 0 uses the exact Moore-Penrose pseudo-inverse (exact orthogonality, but
            unstable gradients when ``F_G``'s columns are nearly collinear).
        intercept: project out ``span{1, F_G}`` (prepend a column of ones to ``F_G``); not in the paper.
        center: project out the span of the *centred* naive logits ``F_G - mean_batch(F_G)``; not in the paper.
            Removes what the naive logits explain up to a constant, but keeps ``F_A``'s own batch mean (so the
            class prior stays trainable, unlike ``intercept``). Not combinable with ``intercept``.

    Returns ``F_P``, (n, K), dtype of ``f_a``; ``F_G^T F_P ~ 0``. Computed in float64 (the matrices are tiny).
    """
    if not torch.is_tensor(f_a) or not torch.is_tensor(f_g):
        raise TypeError("hex_project takes two tensors: f_a (n, K) and f_g (n, K)")
    if f_a.dim() != 2 or f_g.dim() != 2:
        raise ValueError(f"hex_project: f_a and f_g must be 2-D (batch, classes), got shapes {tuple(f_a.shape)} "
                         f"and {tuple(f_g.shape)}; flatten extra dimensions into the batch first")
    if f_a.size(0) != f_g.size(0):
        raise ValueError(f"hex_project: f_a and f_g must have the same batch size (rows), got {f_a.size(0)} and "
                         f"{f_g.size(0)}")
    if f_a.size(0) == 0:
        raise ValueError("hex_project: empty batch (0 rows)")
    ridge = float(ridge)
    if not ridge >= 0.0:  # also rejects NaN
        raise ValueError(f"hex_project: ridge must be >= 0, got {ridge}")
    if intercept and center:
        raise ValueError("hex_project: intercept=True and center=True together: intercept also removes the batch "
                         "mean, center keeps it; choose one")
    a = f_a.to(torch.float64)
    g = f_g.to(torch.float64)
    if intercept:
        # also project out the all-ones vector: span{1, F_G} (see the docstring)
        g = torch.cat([torch.ones_like(g[:, :1]), g], dim=1)
    elif center:
        # centred columns are orthogonal to the all-ones vector, so (I - P) leaves the batch mean of f_a alone
        g = g - g.mean(dim=0, keepdim=True)
    gram = g.transpose(0, 1) @ g  # K' x K'
    rhs = g.transpose(0, 1) @ a  # K' x K
    if ridge > 0.0:
        # scale-free ridge, plus a floor so an all-zero F_G (e.g. a zero-initialised naive branch) gives P = 0
        eps = ridge * gram.diagonal().sum() + torch.finfo(torch.float64).tiny ** 0.5
        eye = torch.eye(gram.size(0), dtype=gram.dtype, device=gram.device)
        coef = torch.linalg.solve(gram + eps * eye, rhs)
    else:
        coef = torch.linalg.pinv(gram, hermitian=True) @ rhs
    return (a - g @ coef).to(f_a.dtype)


def hex_penalty(f_l: Tensor, f_g: Tensor, targets: Optional[Tensor] = None, ridge: float = 1e-6) -> Tensor:
    """``sum_rows ||P_c F_L||^2 / K``: how much of the prediction logits ``F_L`` (n, K) the naive logits ``F_G``
    explain linearly (``P_c`` projects onto the batch-centred columns of ``F_G``; not in the paper).

    HEX's projection only hides that part from the training loss; it gets no gradient, so the main branch keeps
    whatever cue dependence its features carry incidentally, and ``F_L`` uses it at test time. The penalty removes it.

    With ``targets`` (n,) the penalty is computed within each class separately (the centring and the projection
    use that class's rows; classes with fewer than 2 rows add nothing). Use it: in training data the cue is
    correlated with the label, so over the whole batch "explained by the naive logits" includes the label itself and
    the batch version also penalises the correct prediction (it drives ``F_L`` to be *anti*-correlated with the
    cue). Within a class, the label is constant and only the cue dependence is penalised.
    """
    if f_l.shape[0] != f_g.shape[0]:
        raise ValueError(f"hex_penalty: f_l and f_g must have the same batch size, got {f_l.shape[0]} and "
                         f"{f_g.shape[0]}")
    if targets is None:
        groups = [torch.arange(f_l.shape[0], device=f_l.device)]
    else:
        targets = targets.reshape(-1)
        if targets.numel() != f_l.shape[0]:
            raise ValueError(f"hex_penalty: {targets.numel()} targets for a batch of {f_l.shape[0]}")
        groups = [(targets == c).nonzero().squeeze(1) for c in torch.unique(targets)]
    total = f_l.new_zeros((), dtype=torch.float32)
    for rows in groups:
        if rows.numel() < 2:
            continue  # one row: nothing to centre, no variation to explain
        a = f_l[rows]
        explained = a - hex_project(a, f_g[rows], ridge, center=True)
        total = total + explained.float().square().sum()
    return total / f_l.shape[1]


class HexLogits(NamedTuple):
    """The three logit matrices of HEX, each (n, K)."""

    full: Tensor  # F_A = f([h_A, h_G])
    naive: Tensor  # F_G = f([0, h_G])
    main: Tensor  # F_L = f([h_A, 0])


#: what :meth:`HexClassifierModel.forward` can return as logits (``logits=``)
LOGIT_KINDS = ("auto", "projected", "full", "main", "naive")
#: how :class:`BagOfWordsEncoder` pools token embeddings
BOW_POOLINGS = ("mean", "sum")


# ------------------------------------------------------------------------------------------ the naive model
class BagOfWordsEncoder(nn.Module):
    """The naive model: a continuous bag of words (mean, or with ``pooling="sum"`` sum, of the token embeddings over
    the non-padding tokens), optionally followed by one tanh layer (saturating, so its features can become clean
    indicators of a cue). It sees which tokens occur and how often, never their order, so it can pick up superficial
    cues (a telltale token) but not order-dependent meaning.

    ``forward(src_tokens)`` -> (B, out_dim).
    """

    def __init__(self, num_embeddings: int, embed_dim: int, padding_idx: int, hidden_dim: int = 0,
                 pooling: str = "mean"):
        super().__init__()
        if pooling not in BOW_POOLINGS:
            raise ValueError(f"BagOfWordsEncoder: pooling must be one of {BOW_POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        if embed_dim < 1:
            raise ValueError(f"BagOfWordsEncoder: embed_dim must be >= 1, got {embed_dim}")
        if hidden_dim < 0:
            raise ValueError(f"BagOfWordsEncoder: hidden_dim must be >= 0 (0 = no hidden layer), got {hidden_dim}")
        self.padding_idx = padding_idx
        self.embed = nn.Embedding(num_embeddings, embed_dim, padding_idx=padding_idx)
        nn.init.normal_(self.embed.weight, mean=0.0, std=embed_dim ** -0.5)
        with torch.no_grad():
            self.embed.weight[padding_idx].zero_()
        self.hidden = nn.Linear(embed_dim, hidden_dim) if hidden_dim > 0 else None
        self.out_dim = hidden_dim if hidden_dim > 0 else embed_dim

    def forward(self, src_tokens: Tensor) -> Tensor:
        keep = src_tokens.ne(self.padding_idx).unsqueeze(-1).to(self.embed.weight.dtype)
        summed = (self.embed(src_tokens) * keep).sum(dim=1)
        h = summed if self.pooling == "sum" else summed / keep.sum(dim=1).clamp(min=1.0)
        return torch.tanh(self.hidden(h)) if self.hidden is not None else h


# ------------------------------------------------------------------------------------------ the head
class HexClassificationHead(nn.Module):
    """``h_A = tanh(dense(dropout(pooled_main)))`` (the main branch's last layer, as RoBERTa's head), then the shared
    classifier ``f = out_proj`` over ``[h_A, h_G]``. With ``naive_dim=0`` it is a plain classifier on ``h_A``.
    """

    def __init__(self, input_dim: int, inner_dim: int, naive_dim: int, num_classes: int, pooler_dropout: float = 0.0):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"HexClassificationHead: num_classes must be >= 1, got {num_classes}")
        self.inner_dim, self.naive_dim, self.num_classes = inner_dim, naive_dim, num_classes
        self.dense = nn.Linear(input_dim, inner_dim)
        self.dropout = nn.Dropout(p=pooler_dropout)
        self.out_proj = nn.Linear(inner_dim + naive_dim, num_classes)

    def main_features(self, pooled: Tensor) -> Tensor:
        return torch.tanh(self.dense(self.dropout(pooled)))

    def hex_logits(self, pooled: Tensor, h_naive: Optional[Tensor]) -> HexLogits:
        h_a = self.dropout(self.main_features(pooled))
        if self.naive_dim == 0:
            logits = self.out_proj(h_a)
            return HexLogits(full=logits, naive=torch.zeros_like(logits), main=logits)
        if h_naive is None or h_naive.size(-1) != self.naive_dim:
            raise ValueError(f"HexClassificationHead: expected naive features of size {self.naive_dim}, got "
                             f"{None if h_naive is None else tuple(h_naive.shape)}")
        h_g = h_naive.to(h_a.dtype)
        # literally f([h_A, h_G]), f([0, h_G]), f([h_A, 0]) with the same f (paper eq. 3)
        full = self.out_proj(torch.cat([h_a, h_g], dim=-1))
        naive = self.out_proj(torch.cat([torch.zeros_like(h_a), h_g], dim=-1))
        main = self.out_proj(torch.cat([h_a, torch.zeros_like(h_g)], dim=-1))
        return HexLogits(full=full, naive=naive, main=main)
