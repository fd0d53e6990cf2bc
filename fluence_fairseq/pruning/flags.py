"""Data-informed attention pruning flags (Rugina et al. 2020), offered by every fluence architecture.

Workflow: train a model, collect its average attention patterns with ``compute_attn_score`` (one ``.npy`` per
attention type), then train or fine-tune with::

    --attn-patterns-self-enc DIR/self-enc.npy --attn-patterns-self-dec DIR/self-dec.npy \\
    --attn-patterns-enc-dec DIR/enc-dec.npy --attn-prune-tau 90 [--attn-prune-scope layer] [--attn-prune-random]

Every attention of a type with a pattern file gets a :class:`~fluence_fairseq.pruning.masks.
GlobalAttentionMask` that keeps all entries but the ``tau`` percent with the lowest average attention
(:func:`fluence_fairseq.pruning.policy.pruning_mask`). ``tau`` counts only *allowed* entries: the causal triangle
of the decoder self attention and the entries no sentence reached during collection (count 0 in the pattern's
JSON) are neither counted nor pruned — they are kept, since nothing says they are unimportant (the causal triangle
is masked by causality anyway). Types without a file are not pruned.

The masks are rebuilt from the files whenever the model is built (training, ``fairseq-generate``): the paths are
stored absolute in the checkpoint, so the files must still exist; a missing, corrupt or mismatched file is an
error naming the file and the shape the model needs, never a silently unpruned model.
"""
import logging
import os
from typing import Dict, List

import torch
from fairseq.utils import safe_getattr

from ..flag_types import ExistingFile, FloatRange, IntRange
from ..modules.attention_base import FluenceAttention
from ..roles import ROLES
from .collect import find_attentions
from .masks import GlobalAttentionMask
from .patterns import load_pattern_info, load_patterns
from .policy import SCOPES, pruning_mask, random_pruning_mask

logger = logging.getLogger(__name__)

#: attention type (a role's pattern name, as in the reference and the pattern files) -> whether it is causal
PATTERN_TYPES: Dict[str, bool] = {role.pattern_name: role.causal for role in ROLES}


def pattern_dest(kind: str) -> str:
    return "attn_patterns_" + kind.replace("-", "_")


def pattern_flag(kind: str) -> str:
    return "--" + pattern_dest(kind).replace("_", "-")


def add_pruning_args(parser) -> None:
    existing = getattr(parser, "_option_string_actions", {})
    if "--attn-prune-tau" in existing:
        return
    for kind in PATTERN_TYPES:
        parser.add_argument(
            pattern_flag(kind), dest=pattern_dest(kind), metavar="NPY", default=None,
            type=ExistingFile("pattern file (.npy from compute_attn_score)"),
            help=f"average attention patterns of the {kind} attentions (a .npy from compute_attn_score): prune them "
                 "with a global mask [default: not pruned]",
        )
    parser.add_argument("--attn-prune-tau", type=FloatRange(0.0, 100.0, hi_open=True, meaning="percent"), metavar="PERCENT", default=None,
                        help="percent of the allowed attention entries to prune, in [0, 100) (required with "
                             "--attn-patterns-*)")
    parser.add_argument("--attn-prune-scope", choices=SCOPES, default=None,
                        help="where tau applies: 'layer' (one threshold per layer, heads compete, as in the paper), "
                             "'head' (every head keeps the same share) or 'model' (one threshold over all layers of "
                             "a type) [default: layer]")
    parser.add_argument("--attn-prune-random", action="store_true", default=None,
                        help="random-pruning baseline: prune as many entries per scope group as the data-informed "
                             "mask would, chosen uniformly at random (--attn-prune-seed)")
    parser.add_argument("--attn-prune-seed", type=IntRange(0), metavar="N", default=None,
                        help="seed of the random-pruning baseline [default: 1]")
    parser.add_argument("--attn-prune-block", type=IntRange(1, meaning="tokens per block"), metavar="N", default=None,
                        help="key block size of the block-sparse kernel of pruned softmax attention; query "
                             "blocks of 1-8x this and the dense path are timed at the first call of each length and "
                             "the fastest kept [default: 32]")


def _settings(args) -> dict:
    files = {kind: safe_getattr(args, pattern_dest(kind), None) for kind in PATTERN_TYPES}
    files = {kind: path for kind, path in files.items() if path}
    tau = safe_getattr(args, "attn_prune_tau", None)
    if not files:
        if tau is not None or safe_getattr(args, "attn_prune_random", None):
            raise ValueError("--attn-prune-tau/--attn-prune-random need pattern files: give "
                             + " and/or ".join(pattern_flag(kind) for kind in PATTERN_TYPES)
                             + " (collected with compute_attn_score)")
        return {}
    if tau is None:
        raise ValueError("--attn-patterns-* needs --attn-prune-tau, the percent of attention entries to prune "
                         "(e.g. 50 or 90)")
    block = safe_getattr(args, "attn_prune_block", None)
    block = 32 if block is None else IntRange(1).check("--attn-prune-block", block)
    tau = FloatRange(0.0, 100.0, hi_open=True).check("--attn-prune-tau", tau)
    return {
        "files": files, "tau": float(tau), "scope": safe_getattr(args, "attn_prune_scope", None) or "layer",
        "random": bool(safe_getattr(args, "attn_prune_random", None)),
        "seed": safe_getattr(args, "attn_prune_seed", None), "block": block,
    }


def attentions_by_type(model: torch.nn.Module) -> Dict[str, List[FluenceAttention]]:
    """Fluence attentions of every pattern type, in layer order (the grouping compute_attn_score collects by)."""
    return {kind: [module for _, _, module in entries] for kind, entries in find_attentions(model).items()}


def _pair_counts(info, patterns: torch.Tensor) -> torch.Tensor:
    """(N, N) float: how many (query, key) pairs the collection saw at every pair of positions, from the pattern
    file's JSON ``info`` (for the reference's files, which have none: 1 inside the box of rows/columns with any
    attention, its own rule)."""
    n = patterns.size(-1)
    if info is not None:
        return info["counts"]
    # the reference's files carry no counts: its own rule, the box of rows/columns with any attention
    seen = patterns.sum(dim=(0, 1)) > 0
    rows = torch.nonzero(seen.any(dim=1)).max().item() + 1 if bool(seen.any()) else 0
    cols = torch.nonzero(seen.any(dim=0)).max().item() + 1 if bool(seen.any()) else 0
    box = torch.zeros(n, n, dtype=torch.float64)
    box[:rows, :cols] = 1.0
    return box


def build_keep_masks(path: str, kind: str, layers: int, heads: int, settings: dict):
    """(keep, pairs): bool (layers, heads, N, N) keep masks of one attention type from its pattern file, and the
    (N, N) number of (query, key) pairs the collection saw at each allowed entry (0 elsewhere)."""
    causal = PATTERN_TYPES[kind]
    if not os.path.isfile(path):  # e.g. a checkpoint whose pattern file has moved since training
        dest = pattern_dest(kind)
        raise ValueError(
            f"attention pattern file {path} ({pattern_flag(kind)}) does not exist; collect it with the "
            f"compute_attn_score task, or, if it has moved since the checkpoint was trained, give the new path: "
            f"--model-overrides \"{{'{dest}': 'NEW/{kind}.npy'}}\" (fairseq-generate, fairseq-interactive, "
            f"fairseq-eval-lm) or {pattern_flag(kind)} NEW/{kind}.npy (fairseq-train); expected an array of shape "
            f"(layers={layers}, heads={heads}, N, N)")
    patterns = load_patterns(path, layers=layers, heads=heads)
    info = load_pattern_info(path, patterns.size(-1))
    if info is not None and info.get("type") not in (None, kind):
        raise ValueError(f"attention pattern file {path} holds {info['type']} patterns but was given for {kind} "
                         f"({pattern_flag(kind)})")
    n = patterns.size(-1)
    structural = torch.ones(n, n, dtype=torch.bool)
    if causal:
        structural = structural.tril()
    counts = _pair_counts(info, patterns)  # the JSON is read once: its counts are N x N numbers
    allowed = structural & (counts > 0)
    if settings["random"]:
        seed = settings["seed"] if settings["seed"] is not None else 1
        keep = random_pruning_mask(patterns.shape, settings["tau"], settings["scope"], allowed, seed=seed)
    else:
        keep = pruning_mask(patterns, settings["tau"], settings["scope"], allowed)
    keep = keep | (structural & ~allowed)  # unobserved entries: kept (nothing says they do not matter)
    return keep, counts * structural


def apply_attention_pruning(model: torch.nn.Module, args) -> Dict[str, float]:
    """Attach the global masks the pruning flags in ``args`` ask for; returns, per type, the share of the
    (query, key) pairs of the collected data that stay computed (the pairs weighted by how often they occurred). Paths in ``args`` are made absolute (the checkpoint then finds them from any directory)."""
    settings = _settings(args)
    if not settings:
        return {}
    by_type = attentions_by_type(model)
    kept = {}
    for kind, path in settings["files"].items():
        modules = by_type.get(kind)
        flag = "--" + pattern_dest(kind).replace("_", "-")
        if not modules:
            raise ValueError(f"{flag} {path}: the model has no {kind} attention to prune")
        path = os.path.abspath(os.path.expanduser(path))
        setattr(args, pattern_dest(kind), path)
        keep, pairs = build_keep_masks(path, kind, len(modules), modules[0].num_heads, settings)
        for layer, module in enumerate(modules):
            module.set_global_mask(GlobalAttentionMask(keep[layer], block=settings["block"],
                                                       label=f"{kind} layer {layer} from {path}"))
        # the share of the attention entries of the collected data that stay computed
        kept[kind] = float((keep.to(pairs.dtype) * pairs).sum() / (pairs.sum() * keep.size(0) * keep.size(1)))
        logger.info(f"attention pruning: {kind} keeps {kept[kind]:.1%} of the attention entries of its data "
                    f"({'random' if settings['random'] else 'data-informed'}, tau={settings['tau']:g}%, "
                    f"scope={settings['scope']}, from {path})")
    return kept
