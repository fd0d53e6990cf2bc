"""``hex_classifier``: sentence classification with HEX (:mod:`fluence_fairseq.hex` explains the method).

A fluence transformer encoder (any registry attention: ``--encoder-self-attention``) + a bag-of-words naive
encoder + HEX classification heads whose last linear layer is the shared classifier, for ``--task
sentence_prediction`` (``--criterion hex_sentence_prediction`` adds the orthogonality penalty).
Architectures: ``hex_classifier``, ``hex_classifier_small``, ``hex_classifier_tiny`` (tests).
"""
import logging
import warnings

from fairseq.models import ARCH_MODEL_NAME_REGISTRY, MODEL_REGISTRY, BaseFairseqModel, register_model
from fairseq.models import register_model_architecture
from fairseq.models.transformer.transformer_legacy import base_architecture as transformer_base_architecture
from fairseq.utils import safe_getattr
from torch import nn

from ..flag_types import FloatRange, IntRange
from ..hex import BOW_POOLINGS, LOGIT_KINDS, BagOfWordsEncoder, HexClassificationHead, hex_penalty, hex_project
from ..roles import ENCODER_SELF
from .attention_args import add_attention_args, fill_attention_defaults
from .layers import FluenceTransformerEncoder

logger = logging.getLogger(__name__)

MODEL_NAME = "hex_classifier"


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
        add("--pooler-dropout", type=FloatRange(0.0, 1.0, hi_open=True), metavar="D", help="dropout in the classification head")
        add("--classifier-inner-dim", type=IntRange(1), metavar="N", help="size of h_A (head dense layer) [embed dim]")
        add("--naive-embed-dim", type=IntRange(1), metavar="N", help="bag-of-words embedding size")
        add("--naive-hidden-dim", type=IntRange(0), metavar="N", help="bag-of-words hidden tanh layer (0 = none)")
        add("--naive-pooling", choices=list(BOW_POOLINGS),
            help="bag of words: mean or sum of the token embeddings [mean]")
        add("--no-naive", action="store_true", default=None,
            help="no naive branch: the main encoder alone (a baseline; needs --no-hex)")
        add("--no-hex", action="store_true", default=None,
            help="baseline: train and evaluate F_A = f([h_A, h_G]) without the projection")
        add("--hex-ridge", type=FloatRange(0.0), metavar="R",
            help="relative ridge of (F_G^T F_G + R ||F_G||^2 I)^-1; 0 = exact pseudo-inverse [1e-6]")
        add("--hex-naive-weight", type=FloatRange(0.0), metavar="LAMBDA",
            help="train on F_P + LAMBDA F_G (the authors' variant) so the naive branch learns the superficial "
                 "cue [1.0]")
        add("--hex-intercept", action="store_true", default=None,
            help="project out span{1, F_G} instead of span{F_G}: with two classes the naive logit columns are "
                 "nearly collinear and their span misses the constant, so a cue indicator leaks through")
        add("--hex-center", action="store_true", default=None,
            help="project out the span of the batch-centred naive logits and apply the projection to F_L: "
                 "removes what the naive logits explain up to a constant, keeps the class prior trainable")
        add("--hex-orth-penalty", type=FloatRange(0.0), metavar="W",
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


if MODEL_NAME in MODEL_REGISTRY:  # imported again under another module name: keep the registered class
    HexClassifierModel = MODEL_REGISTRY[MODEL_NAME]  # noqa: F811
else:
    register_model(MODEL_NAME)(HexClassifierModel)


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
