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

Fixed here compared with Fluence's ``HEXProjection`` (notes §3.5):

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

The fairseq model (``--arch hex_classifier_tiny`` / ``hex_classifier_small`` / ``hex_classifier``, for
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
never did (measurements in the README); off by default, so the defaults stay the paper's method:

* ``--hex-center`` (``hex_project(..., center=True)``): project out the span of the *batch-centred* naive logits,
  and apply it to ``F_L``. With two classes the two naive logit columns are nearly collinear and their span misses
  the constant, so a cue indicator is only partly removed by the paper's projection; centring removes it exactly
  while keeping ``F_L``'s batch mean (the class prior) trainable.
* ``--hex-orth-penalty W`` with ``--criterion hex_sentence_prediction``: the projection hides the naive-explained
  part of ``F_L`` from the loss but does not remove it from ``F_L``: it gets no gradient and stays whatever the main
  features carry incidentally, and prediction uses ``F_L``, so the cue comes back at test time. The penalty
  ``W * ||P_c F_L||^2`` (:func:`hex_penalty`, per class by default: ``--hex-penalty-scope``) drives it to zero. It
  needs the labels, so the criterion computes it (``model.hex_pending_penalty(targets)``); the model warns if a
  training penalty is never consumed (e.g. with the stock ``sentence_prediction`` criterion).
"""
import logging
import warnings
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

__all__ = [
    "hex_project", "hex_penalty", "HexLogits", "BagOfWordsEncoder", "HexClassificationHead", "HexClassifierModel",
    "LOGIT_KINDS",
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


# ------------------------------------------------------------------------------------------ the fairseq model
def _register_fairseq_model():
    """Define and register ``hex_classifier`` and its archs (import-time side effect of this module)."""
    from fairseq.models import (
        ARCH_MODEL_NAME_REGISTRY,
        MODEL_REGISTRY,
        BaseFairseqModel,
        register_model,
        register_model_architecture,
    )
    from fairseq.models.transformer.transformer_legacy import base_architecture as transformer_base_architecture
    from fairseq.utils import safe_getattr

    from .models.attention_args import ENCODER_SELF, add_attention_args, fill_attention_defaults
    from .models.layers import FluenceTransformerEncoder

    class HexClassifierModel(BaseFairseqModel):
        """``hex_classifier``: main encoder (fluence transformer encoder, mean or first-token pooling) + naive
        bag-of-words + HEX classification heads, for ``--task sentence_prediction``.

        ``forward(src_tokens, src_lengths=None, features_only=True, classification_head_name=None, logits="auto")``
        returns ``(logits, extra)`` with a head name, else ``(pooled main features, extra)``. ``logits="auto"``:
        HEX -> ``F_P + lambda F_G`` in training, ``F_L`` in eval; ``--no-hex`` -> ``F_A`` always. The other kinds
        ("projected", "full", "main", "naive") force one matrix. ``extra`` holds all of them (``extra["hex"]``).
        """

        ATTENTION_ROLES = (ENCODER_SELF,)

        def __init__(self, args, encoder, naive):
            super().__init__()
            self.args = args
            self.encoder = encoder
            self.naive = naive  # None with --no-naive
            self.classification_heads = nn.ModuleDict()
            self._warned_small_batch = False
            # (F_L, F_G) of the last training forward, for the penalty (see hex_pending_penalty)
            self._hex_pending = None
            self._warned_unused_penalty = False

        # ---------------------------------------------------------------- args
        @staticmethod
        def add_args(parser):
            existing = getattr(parser, "_option_string_actions", {})

            def add(flag, **kw):
                if flag not in existing:  # fairseq may ask the same parser twice
                    parser.add_argument(flag, **kw)

            add("--encoder-layers", type=int, metavar="N", help="main encoder layers")
            add("--encoder-embed-dim", type=int, metavar="N", help="main encoder width")
            add("--encoder-ffn-embed-dim", type=int, metavar="N", help="main encoder FFN width")
            add("--encoder-attention-heads", type=int, metavar="N", help="main encoder attention heads")
            add("--encoder-normalize-before", action="store_true", default=None, help="pre-norm encoder layers")
            add("--encoder-learned-pos", action="store_true", default=None,
                help="learned positional embeddings (default sinusoidal)")
            add("--dropout", type=float, metavar="D", help="dropout")
            add("--attention-dropout", type=float, metavar="D", help="attention dropout")
            add("--activation-dropout", type=float, metavar="D", help="FFN activation dropout")
            add("--activation-fn", type=str, metavar="NAME", help="FFN activation (relu, gelu, ...)")
            add("--pooler", choices=["mean", "first"], help="main sentence vector: mean over tokens, or the first "
                "token (use with --init-token) [mean]")
            add("--pooler-dropout", type=float, metavar="D", help="dropout in the classification head")
            add("--classifier-inner-dim", type=int, metavar="N", help="size of h_A (head dense layer) [embed dim]")
            add("--naive-embed-dim", type=int, metavar="N", help="bag-of-words embedding size")
            add("--naive-hidden-dim", type=int, metavar="N", help="bag-of-words hidden tanh layer (0 = none)")
            add("--naive-pooling", choices=list(BOW_POOLINGS),
                help="bag of words: mean or sum of the token embeddings [mean]")
            add("--no-naive", action="store_true", default=None,
                help="no naive branch: the main encoder alone (a baseline; needs --no-hex)")
            add("--no-hex", action="store_true", default=None,
                help="baseline: train and evaluate F_A = f([h_A, h_G]) without the projection")
            add("--hex-ridge", type=float, metavar="R",
                help="relative ridge of (F_G^T F_G + R ||F_G||^2 I)^-1; 0 = exact pseudo-inverse [1e-6]")
            add("--hex-naive-weight", type=float, metavar="LAMBDA",
                help="train on F_P + LAMBDA F_G (the authors' variant) so the naive branch learns the superficial "
                     "cue [1.0]")
            add("--hex-intercept", action="store_true", default=None,
                help="project out span{1, F_G} instead of span{F_G}: with two classes the naive logit columns are "
                     "nearly collinear and their span misses the constant, so a cue indicator leaks through")
            add("--hex-center", action="store_true", default=None,
                help="project out the span of the batch-centred naive logits and apply the projection to F_L: "
                     "removes what the naive logits explain up to a constant, keeps the class prior trainable")
            add("--hex-orth-penalty", type=float, metavar="W",
                help="add W * ||P F_L||^2 (summed over the batch, / classes) to the loss: the part of the "
                     "prediction logits F_L that the (centred) naive logits explain, see --hex-penalty-scope "
                     "(needs --criterion hex_sentence_prediction) [0]")
            add("--hex-penalty-scope", choices=["class", "batch"],
                help="compute the penalty within each class of the batch (the cue dependence given the label) or "
                     "over the whole batch (also penalises the label where the cue predicts it) [class]")
            add("--hex-naive-through-projection", action="store_true", default=None,
                help="let the projection's gradient reach the naive branch (as in the paper's end-to-end training); "
                     "by default the naive branch learns only from the LAMBDA F_G term")
            add_attention_args(parser, HexClassifierModel.ATTENTION_ROLES, "hex_classifier")

        @classmethod
        def build_model(cls, args, task):
            hex_base_architecture(args)
            fill_attention_defaults(args, cls.ATTENTION_ROLES)
            if args.no_naive and not args.no_hex:
                raise ValueError("--no-naive needs --no-hex: HEX projects out the naive branch's logits, so it "
                                 "needs that branch; add --no-hex (main encoder alone) or drop --no-naive")
            if args.hex_ridge < 0:
                raise ValueError(f"--hex-ridge must be >= 0, got {args.hex_ridge}")
            if args.hex_naive_weight < 0:
                raise ValueError(f"--hex-naive-weight must be >= 0, got {args.hex_naive_weight}")
            if args.hex_center and args.hex_intercept:
                raise ValueError("--hex-center and --hex-intercept together: --hex-intercept also removes the batch "
                                 "mean, --hex-center keeps it; choose one")
            if args.hex_orth_penalty < 0:
                raise ValueError(f"--hex-orth-penalty must be >= 0, got {args.hex_orth_penalty}")
            # (no check of --criterion here: fairseq-validate rebuilds the model with the evaluation criterion,
            # where the stock one is right; an unused penalty is reported in training instead, see forward)
            dictionary = task.source_dictionary
            embed = nn.Embedding(len(dictionary), args.encoder_embed_dim, padding_idx=dictionary.pad())
            nn.init.normal_(embed.weight, mean=0, std=args.encoder_embed_dim ** -0.5)
            nn.init.constant_(embed.weight[dictionary.pad()], 0)
            encoder = FluenceTransformerEncoder(args, dictionary, embed)
            naive = None
            if not args.no_naive:
                naive = BagOfWordsEncoder(len(dictionary), args.naive_embed_dim, dictionary.pad(),
                                          args.naive_hidden_dim, args.naive_pooling)
            return cls(args, encoder, naive)

        def max_positions(self):
            return self.args.max_source_positions

        # ---------------------------------------------------------------- heads
        def register_classification_head(self, name, num_classes=None, inner_dim=None, **kwargs):
            if num_classes is None or num_classes < 1:
                raise ValueError(f"classification head {name!r}: num_classes must be >= 1 (set --num-classes), "
                                 f"got {num_classes}")
            if name in self.classification_heads:
                old = self.classification_heads[name]
                if old.num_classes == num_classes:
                    return
                logger.warning("re-registering head %r with %d classes (was %d)", name, num_classes,
                               old.num_classes)
            self.classification_heads[name] = HexClassificationHead(
                self.args.encoder_embed_dim, inner_dim or self.args.classifier_inner_dim,
                0 if self.naive is None else self.naive.out_dim, num_classes, self.args.pooler_dropout,
            )

        # ---------------------------------------------------------------- forward
        def pooled_features(self, src_tokens, src_lengths=None, return_all_hiddens=False):
            out = self.encoder(src_tokens, src_lengths=src_lengths, return_all_hiddens=return_all_hiddens)
            x = out["encoder_out"][0].transpose(0, 1)  # B x T x C
            if self.args.pooler == "first":
                return x[:, 0, :], out
            pad = out["encoder_padding_mask"][0] if out["encoder_padding_mask"] else src_tokens.eq(
                self.encoder.padding_idx)
            keep = (~pad).unsqueeze(-1).to(x.dtype)
            return (x * keep).sum(1) / keep.sum(1).clamp(min=1.0), out

        def hex_logits(self, src_tokens, src_lengths=None, classification_head_name="sentence_classification_head"):
            """The three :class:`HexLogits` of a batch for the named head."""
            head = self._head(classification_head_name)
            pooled, _ = self.pooled_features(src_tokens, src_lengths)
            h_naive = None if self.naive is None else self.naive(src_tokens)
            return head.hex_logits(pooled, h_naive)

        def hex_pending_penalty(self, targets=None):
            """``--hex-orth-penalty W`` times :func:`hex_penalty` of the last training forward (summed over the
            batch, like fairseq's losses), per class of ``targets`` unless ``--hex-penalty-scope batch``; None if
            that forward had no penalty. Consumes it (``--criterion hex_sentence_prediction`` calls this)."""
            pending, self._hex_pending = self._hex_pending, None
            if pending is None:
                return None
            f_l, f_g = pending
            per_class = self.args.hex_penalty_scope == "class"
            if per_class and targets is None:
                raise ValueError("hex_pending_penalty: --hex-penalty-scope class needs the targets")
            return self.args.hex_orth_penalty * hex_penalty(f_l, f_g, targets if per_class else None,
                                                            self.args.hex_ridge)

        def _head(self, name):
            if name not in self.classification_heads:
                raise KeyError(f"no classification head {name!r}; registered: {sorted(self.classification_heads)}")
            return self.classification_heads[name]

        def forward(self, src_tokens, src_lengths=None, features_only=True, return_all_hiddens=False,
                    classification_head_name=None, logits="auto", **kwargs):
            if logits not in LOGIT_KINDS:
                raise ValueError(f"logits must be one of {LOGIT_KINDS}, got {logits!r}")
            pooled, enc_out = self.pooled_features(src_tokens, src_lengths, return_all_hiddens)
            extra = {"inner_states": enc_out.get("encoder_states", [])}
            if classification_head_name is None:
                return pooled, extra
            head = self._head(classification_head_name)
            h_naive = None if self.naive is None else self.naive(src_tokens)
            hx = head.hex_logits(pooled, h_naive)
            extra["hex"] = hx
            kind = logits
            if kind == "auto":
                if self.args.no_hex:
                    kind = "full"
                else:
                    kind = "projected" if self.training else "main"
            if self.training and self._hex_pending is not None and not self._warned_unused_penalty:
                # hex_sentence_prediction resets it after adding it to the loss: still set = nobody used it
                self._warned_unused_penalty = True
                msg = ("HEX: --hex-orth-penalty is set but the last training penalty was not added to any loss; "
                       "train with --criterion hex_sentence_prediction (the stock sentence_prediction ignores it)")
                logger.warning(msg)
                warnings.warn(msg, RuntimeWarning, stacklevel=2)
            self._hex_pending = None
            if kind == "projected":
                if self.naive is None:
                    raise ValueError("projected logits need the naive branch (the model was built with --no-naive)")
                n = src_tokens.size(0)
                if n <= head.num_classes and not self._warned_small_batch:
                    self._warned_small_batch = True
                    warnings.warn(f"HEX: a batch of {n} examples <= {head.num_classes} classes: the naive logits "
                                  "span the whole batch, so the projected logits are ~0 and this batch gives no "
                                  "HEX training signal (use larger batches)", RuntimeWarning, stacklevel=2)
                full, naive = hx.full, hx.naive
                if not self.args.hex_naive_through_projection:
                    # the naive branch learns only from its own term (lambda F_G), not through the projector, which
                    # would reward it for avoiding the directions the main logits use (see module docstring).
                    # f is linear: f([h_A, sg(h_G)]) = F_L + sg(F_G) - b.
                    naive = hx.naive.detach()
                    full = hx.main + naive - head.out_proj.bias
                ridge, center = self.args.hex_ridge, self.args.hex_center
                if center:
                    # (I - P_c) F_A = (I - P_c) F_L + mean_batch(F_G - b): project F_L itself so that training and
                    # prediction (F_L) carry the same constant (the batch mean of the naive part is not in F_L)
                    full = hx.main
                out = hex_project(full, naive, ridge, intercept=self.args.hex_intercept, center=center)
                extra["hex_projected"] = out
                if self.args.hex_orth_penalty > 0:
                    # the penalty needs the labels (per class), so the criterion computes it: hex_pending_penalty
                    self._hex_pending = (hx.main, hx.naive.detach())
                if self.args.hex_naive_weight:
                    out = out + self.args.hex_naive_weight * hx.naive
                return out, extra
            return getattr(hx, kind), extra

    register_model("hex_classifier")(HexClassifierModel)

    def hex_base_architecture(args):
        """Defaults of ``hex_classifier`` for anything still missing, then fairseq's transformer defaults (which
        the encoder's config reads)."""
        defaults = dict(
            encoder_layers=6, encoder_embed_dim=512, encoder_ffn_embed_dim=2048, encoder_attention_heads=8,
            dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, activation_fn="relu", pooler="mean",
            pooler_dropout=0.0, naive_embed_dim=64, naive_hidden_dim=0, naive_pooling="mean", no_naive=False,
            no_hex=False,
            hex_ridge=1e-6, hex_naive_weight=1.0, hex_naive_through_projection=False, hex_intercept=False,
            hex_center=False, hex_orth_penalty=0.0,
            hex_penalty_scope="class", encoder_normalize_before=False, encoder_learned_pos=False,
        )
        for key, value in defaults.items():
            if safe_getattr(args, key, None) is None:
                setattr(args, key, value)
        if safe_getattr(args, "classifier_inner_dim", None) is None:
            args.classifier_inner_dim = args.encoder_embed_dim
        if safe_getattr(args, "max_source_positions", None) is None:
            # the sentence_prediction task sets args.max_positions (--max-positions, default 512)
            args.max_source_positions = safe_getattr(args, "max_positions", None) or 512
        transformer_base_architecture(args)

    def arch(name, **sizes):
        def fn(args):
            for key, value in sizes.items():
                if safe_getattr(args, key, None) is None:
                    setattr(args, key, value)
            hex_base_architecture(args)

        fn.__name__ = fn.__qualname__ = name
        if ARCH_MODEL_NAME_REGISTRY.get(name) != "hex_classifier":
            register_model_architecture("hex_classifier", name)(fn)
        return fn

    arch("hex_classifier")
    arch("hex_classifier_small", encoder_layers=3, encoder_embed_dim=128, encoder_ffn_embed_dim=256,
         encoder_attention_heads=4, naive_embed_dim=32)
    arch("hex_classifier_tiny", encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
         encoder_attention_heads=4, naive_embed_dim=16)
    assert MODEL_REGISTRY["hex_classifier"] is HexClassifierModel
    return HexClassifierModel, hex_base_architecture


def _register_fairseq_criterion():
    """Define and register ``--criterion hex_sentence_prediction``: fairseq's ``sentence_prediction`` plus the
    model's orthogonality penalty (``--hex-orth-penalty``)."""
    from dataclasses import dataclass

    from fairseq.criterions import CRITERION_REGISTRY, register_criterion
    from fairseq.criterions.sentence_prediction import SentencePredictionConfig, SentencePredictionCriterion
    from fairseq.logging import metrics

    @dataclass
    class HexSentencePredictionConfig(SentencePredictionConfig):
        pass

    class HexSentencePredictionCriterion(SentencePredictionCriterion):
        """The stock sentence-prediction loss (cross entropy of the model's logits, its metrics) + the penalty the
        model's ``hex_pending_penalty(targets)`` for that forward (None in evaluation or without the penalty)."""

        def forward(self, model, sample, reduce=True):
            if self.regression_target:
                raise ValueError("hex_sentence_prediction: HEX needs class logits; --regression-target is not "
                                 "supported (use --criterion sentence_prediction without the HEX penalty)")
            loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
            pending = getattr(model, "hex_pending_penalty", None)
            penalty = None if pending is None else pending(model.get_targets(sample, None).view(-1))
            if penalty is not None:
                loss = loss + penalty.to(loss.dtype)
                logging_output["loss"] = loss.data
                logging_output["hex_penalty"] = penalty.data
            return loss, sample_size, logging_output

        @staticmethod
        def reduce_metrics(logging_outputs) -> None:
            SentencePredictionCriterion.reduce_metrics(logging_outputs)
            penalty = sum(log.get("hex_penalty", 0) for log in logging_outputs)
            sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
            if penalty and sample_size:
                metrics.log_scalar("hex_penalty", penalty / sample_size, sample_size, round=4)

    if "hex_sentence_prediction" not in CRITERION_REGISTRY:
        register_criterion("hex_sentence_prediction", dataclass=HexSentencePredictionConfig)(
            HexSentencePredictionCriterion)
    return CRITERION_REGISTRY["hex_sentence_prediction"]


def _existing_model():
    from fairseq.models import MODEL_REGISTRY

    return MODEL_REGISTRY.get("hex_classifier")


if _existing_model() is None:
    HexClassifierModel, hex_base_architecture = _register_fairseq_model()
else:  # imported a second time (e.g. under another module name): reuse the registered class
    HexClassifierModel = _existing_model()
HexSentencePredictionCriterion = _register_fairseq_criterion()
