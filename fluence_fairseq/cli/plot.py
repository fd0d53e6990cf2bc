"""Plots of what attentions learned, read from fairseq checkpoints.

    python -m fluence_fairseq.cli.plot spans CHECKPOINT -o spans.png      (or: fluence-plot spans ...)
    python -m fluence_fairseq.cli.plot entmax CHECKPOINT --data DATA-BIN -o entmax.png
    python -m fluence_fairseq.cli.plot patterns DIR/self-enc.npy -o patterns.png [--max-pos 64] [--layers 0,1] [--log]

``spans`` draws the span of every head of every adaptive-span layer (z * attn_span, in tokens), one heatmap per
stack (encoder, decoder), and prints the same numbers as a text table. ``entmax`` draws the learned α of every
head per layer and attention type and, with ``--data``, the density (share of non-zero weights) of every head. ``patterns`` draws the average attention written by
``python -m fluence_fairseq.compute_attn_score``: one heatmap per layer (rows) and head (columns), query position
down and key position across, one linear colour scale shared by the heads of a layer (heads of a layer compare
directly, while layers, whose peaks differ a lot, stay readable; ``--log`` for a log scale), and pairs never seen
in the data left grey. Each plot is a subcommand registered with
:func:`register_plot`; later attentions add their own (e.g. entmax alphas) without touching the others.
"""
import argparse
import logging
import math
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

import fluence_fairseq  # noqa: F401  (registers the safe globals fairseq checkpoints need under weights_only)
from .. import checkpoints
from ..roles import ENCODER_SELF, ROLES, attention_label, split_label

SPAN_SUFFIX = "adaptive_span.current_val"
_LAYER_RE = re.compile(r"^(?P<stack>.*?)\.?layers\.(?P<layer>\d+)\.(?P<module>.+)\.adaptive_span\.current_val$")


# ------------------------------------------------------------------------------------------- loading
def load_checkpoint(path: str, trust: bool = False) -> dict:
    """``torch.load`` on CPU, weights-only unless ``trust`` (only for checkpoints you made yourself); a file that
    cannot be read stops the command with a message naming it and what is wrong."""
    try:
        return checkpoints.load(path, trust=trust, trust_flag="--trust-checkpoint", prog="fluence-plot")
    except checkpoints.CheckpointError as error:
        raise SystemExit(str(error)) from None


def model_state(state: dict) -> Dict[str, torch.Tensor]:
    """The model's parameters: ``state['model']`` for fairseq checkpoints, or the dict itself."""
    model = state.get("model", state)
    if not isinstance(model, dict):
        raise SystemExit("fluence-plot: the checkpoint has no 'model' state dict")
    return model


def _get(obj, name):
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    try:
        return getattr(obj, name, None)
    except Exception:  # omegaconf raises on missing keys in struct mode
        return None


def model_options(state: dict) -> List[object]:
    """Where model options may live: cfg['model'] (Namespace for legacy models, dict for dataclass ones), args."""
    found = [_get(state.get("cfg"), "model"), state.get("args")]
    return [o for o in found if o is not None]


def model_option(state: dict, name: str):
    for opts in model_options(state):
        value = _get(opts, name)
        if value is not None:
            return value
    return None


# --------------------------------------------------------------------------------------------- spans
@dataclass
class SpanStack:
    """Spans of one stack of layers (e.g. 'encoder'): ``rows[layer] = [z per head]``."""

    name: str
    rows: "OrderedDict[int, List[float]]" = field(default_factory=OrderedDict)

    def tokens(self, attn_span: int, ramp: float = 0.0) -> List[List[float]]:
        return [[min(attn_span, z * attn_span + ramp) for z in self.rows[k]] for k in sorted(self.rows)]


def _stack_name(key: str):
    m = _LAYER_RE.match(key)
    if m is None:
        return key[: -len(SPAN_SUFFIX)].rstrip(".") or "model", 0
    stack = m.group("stack") or "model"
    module = m.group("module")
    if module != ENCODER_SELF.sublayer:  # e.g. a cross attention with spans: keep it apart from the self attention
        stack = f"{stack} {module}"
    return stack, int(m.group("layer"))


def find_spans(model: Dict[str, torch.Tensor]) -> "OrderedDict[str, SpanStack]":
    """Every ``...adaptive_span.current_val`` (span ratios z, shape (heads, 1, 1)) grouped by stack and layer."""
    stacks: "OrderedDict[str, SpanStack]" = OrderedDict()
    for key in model:
        if not key.endswith(SPAN_SUFFIX):
            continue
        name, layer = _stack_name(key)
        z = model[key].detach().float().reshape(-1).clamp(0.0, 1.0).tolist()
        stacks.setdefault(name, SpanStack(name)).rows[layer] = z
    order = {"encoder": 0, "decoder": 1}
    return OrderedDict(sorted(stacks.items(), key=lambda kv: (order.get(kv[0].split()[0], 2), kv[0])))


def span_table(stacks, attn_span: int, ramp: float, include_ramp: bool) -> str:
    add = ramp if include_ramp else 0.0
    what = "z * attn_span + ramp (clipped)" if include_ramp else "z * attn_span"
    lines = [f"learned spans in tokens ({what}; attn_span={attn_span}, ramp={ramp:g})"]
    for stack in stacks.values():
        grid = stack.tokens(attn_span, add)
        heads = max(len(r) for r in grid)
        lines.append("")
        lines.append(f"{stack.name:<10}" + "".join(f"{'head ' + str(h):>9}" for h in range(heads)) + f"{'mean':>9}")
        for layer, row in zip(sorted(stack.rows), grid):
            cells = "".join(f"{v:9.1f}" for v in row) + " " * 9 * (heads - len(row))
            lines.append(f"{'layer ' + str(layer):<10}" + cells + f"{sum(row) / len(row):9.1f}")
        flat = [v for row in grid for v in row]
        lines.append(f"{stack.name}: avg {sum(flat) / len(flat):.1f}, max {max(flat):.1f} tokens "
                     f"over {len(grid)} layers x {heads} heads")
    return "\n".join(lines)


def plot_spans(stacks, attn_span: int, ramp: float, include_ramp: bool, out: str, title: Optional[str] = None):
    """One annotated heatmap (layers x heads) per stack, side by side, on a common 0..attn_span colour scale."""
    # fairseq's text_to_speech task sets the root logger to DEBUG on import; keep matplotlib's chatter out
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    add = ramp if include_ramp else 0.0
    grids = [(s.name, sorted(s.rows), s.tokens(attn_span, add)) for s in stacks.values()]
    max_heads = max(len(r) for _, _, g in grids for r in g)
    max_layers = max(len(g) for _, _, g in grids)
    fig, axes = plt.subplots(1, len(grids), squeeze=False, layout="constrained",
                             figsize=(max(6.0, 1.0 + len(grids) * (1.0 + 0.6 * max_heads)), 1.9 + 0.5 * max_layers))
    image = None
    for ax, (name, layers, grid) in zip(axes[0], grids):
        data = [row + [math.nan] * (max_heads - len(row)) for row in grid]
        image = ax.imshow(data, vmin=0, vmax=attn_span, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9,
                        color="white" if v < 0.6 * attn_span else "black")
        flat = [v for row in grid for v in row]
        ax.set_title(f"{name}\navg {sum(flat) / len(flat):.1f}, max {max(flat):.1f}", fontsize=10)
        ax.set_xticks(range(max_heads), [str(h) for h in range(max_heads)])
        ax.set_yticks(range(len(layers)), [str(k) for k in layers])
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes[0].tolist(), label="span (tokens)")
    allv = [v for _, _, g in grids for row in g for v in row]
    what = "span + ramp" if include_ramp else "learned span"
    fig.suptitle(title or f"{what} per head in tokens: avg {sum(allv) / len(allv):.1f}, max {max(allv):.1f}\n"
                 f"(attn_span={attn_span}, ramp={ramp:g})", fontsize=10)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _spans_args(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt) of a model with adaptive-span attention")
    p.add_argument("-o", "--output", default="spans.png", help="image to write (default: spans.png)")
    p.add_argument("--attn-span", type=int, default=None,
                   help="maximum span S in tokens, if the checkpoint's config does not have it")
    p.add_argument("--adapt-span-ramp", type=float, default=None,
                   help="ramp R in tokens, if the checkpoint's config does not have it (default 32)")
    p.add_argument("--include-ramp", action="store_true",
                   help="plot z*S + R (every key the head can see) instead of z*S (the full-weight span)")
    p.add_argument("--title", default=None)


def _spans_run(args) -> int:
    state = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    stacks = find_spans(model_state(state))
    if not stacks:
        raise SystemExit(
            f"fluence-plot spans: {args.checkpoint} has no adaptive spans (no parameter ending in "
            f"'{SPAN_SUFFIX}'); was it trained with an adaptive-span architecture?"
        )
    attn_span = model_option(state, "attn_span")
    if attn_span is None:
        attn_span = args.attn_span
    elif args.attn_span is not None and int(args.attn_span) != int(attn_span):
        print(f"fluence-plot: using --attn-span {args.attn_span} instead of the checkpoint's {attn_span}",
              file=sys.stderr)
        attn_span = args.attn_span
    if attn_span is None:
        raise SystemExit(
            "fluence-plot spans: the checkpoint's config has no attn_span; pass --attn-span (the maximum span in "
            "tokens the model was trained with)"
        )
    ramp = model_option(state, "adapt_span_ramp")
    if args.adapt_span_ramp is not None:
        ramp = args.adapt_span_ramp
    ramp = 32.0 if ramp is None else float(ramp)
    attn_span = int(attn_span)
    print(span_table(stacks, attn_span, ramp, args.include_ramp))
    plot_spans(stacks, attn_span, ramp, args.include_ramp, args.output, args.title)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# -------------------------------------------------------------------------------------------- entmax
_KINDS = tuple(role.label for role in ROLES)
_KIND_TITLES = {role.label: role.title for role in ROLES}


def _split_label(label: str):
    role, layer = split_label(label)
    return role.label, layer


def find_alphas(model: Dict[str, torch.Tensor], alpha_lr_scale: float = 1.0) -> "OrderedDict[str, Dict[int, List[float]]]":
    """Learned α per attention type, layer and head, from every ``...pre_alpha`` parameter, computed as the
    attention computes it (:func:`~fluence_fairseq.modules.entmax.learned_alpha`, with the run's
    ``--alpha-lr-scale``)."""
    from ..modules.entmax import learned_alpha

    found: "OrderedDict[str, Dict[int, List[float]]]" = OrderedDict((k, {}) for k in _KINDS)
    for key, value in model.items():
        if not key.endswith(".pre_alpha"):
            continue
        label = attention_label(key[: -len(".pre_alpha")])
        if label is None:
            continue
        kind, layer = _split_label(label)
        alpha = learned_alpha(value.detach().float(), alpha_lr_scale)
        found[kind][layer] = alpha.tolist()
    return OrderedDict((k, v) for k, v in found.items() if v)


def measure_density(checkpoint: str, data: str, subset: str, max_tokens: int, max_batches: Optional[int]):
    """Share of non-zero weights per attention type, layer and head of a sparse-attention model over a data split
    (real queries and allowed keys only), with the model in eval mode."""
    from fairseq import checkpoint_utils, utils

    from ..criterions.fluence import sparse_attentions

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data})
    model = models[0].eval()
    attentions = sparse_attentions(model)
    if not attentions:
        raise SystemExit(f"fluence-plot entmax: {checkpoint} has no sparse (sparsemax/entmax) attention")
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    batches = task.get_batch_iterator(dataset=dataset, max_tokens=max_tokens, max_positions=utils.resolve_max_positions(
        task.max_positions(), model.max_positions()), ignore_invalid_inputs=True).next_epoch_itr(shuffle=False)
    for _, module in attentions:
        module.track_density(True)
    with torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            model(**batch["net_input"])
    density: "OrderedDict[str, Dict[int, List[float]]]" = OrderedDict((k, {}) for k in _KINDS)
    for label, module in attentions:
        counts = module.density_counts()
        module.track_density(False)
        kind, layer = _split_label(label)
        density[kind][layer] = (counts[0] / counts[1].clamp(min=1)).tolist()
    return OrderedDict((k, v) for k, v in density.items() if v)


def grid_table(title: str, grids, fmt: str = "{:6.3f}") -> str:
    lines = [title]
    for kind, rows in grids.items():
        heads = max(len(r) for r in rows.values())
        lines.append("")
        lines.append(f"{_KIND_TITLES.get(kind, kind):<16}" + "".join(f"{'head ' + str(h):>8}" for h in range(heads))
                     + f"{'mean':>8}")
        for layer in sorted(rows):
            row = rows[layer]
            lines.append(f"{'layer ' + str(layer):<16}" + "".join(f"{fmt.format(v):>8}" for v in row)
                         + f"{fmt.format(sum(row) / len(row)):>8}")
    return "\n".join(lines)


def plot_entmax(alphas, density, out: str, title: Optional[str] = None) -> None:
    """Top row: α of every head against its layer, one panel per attention type (the paper's α figure). Bottom
    row (with data): density of every head (layers x heads heatmap, 1 = dense)."""
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in _KINDS if k in alphas or k in (density or {})]
    rows = int(bool(alphas)) + int(bool(density))
    fig, axes = plt.subplots(rows, len(kinds), squeeze=False, layout="constrained",
                             figsize=(3.6 * len(kinds), 3.2 * rows))
    r = 0
    if alphas:
        for ax, kind in zip(axes[r], kinds):
            for layer, values in sorted(alphas.get(kind, {}).items()):
                offsets = [(h - (len(values) - 1) / 2) * 0.08 for h in range(len(values))]
                ax.scatter([layer + o for o in offsets], values, s=22, alpha=0.8)
            layers = sorted(alphas.get(kind, {}))
            ax.set_xticks(layers, [str(k) for k in layers])
            ax.set_ylim(0.98, 2.02)
            ax.axhline(1.5, color="grey", lw=0.5, ls=":")
            ax.set_title(f"{_KIND_TITLES[kind]}: learned alpha", fontsize=10)
            ax.set_xlabel("layer")
            ax.set_ylabel("alpha (1 = softmax, 2 = sparsemax)")
        r += 1
    if density:
        image = None
        for ax, kind in zip(axes[r], kinds):
            grid = density.get(kind, {})
            layers = sorted(grid)
            data = [grid[k] for k in layers]
            if not data:
                ax.axis("off")
                continue
            image = ax.imshow(data, vmin=0, vmax=1, cmap="magma", aspect="auto")
            for i, row in enumerate(data):
                for j, v in enumerate(row):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if v < 0.6 else "black")
            ax.set_yticks(range(len(layers)), [str(k) for k in layers])
            ax.set_xticks(range(len(data[0])), [str(h) for h in range(len(data[0]))])
            ax.set_title(f"{_KIND_TITLES[kind]}: density", fontsize=10)
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
        if image is not None:
            fig.colorbar(image, ax=axes[r].tolist(), label="share of non-zero weights")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _entmax_args(p: argparse.ArgumentParser):
    p.add_argument("checkpoint", help="fairseq checkpoint (.pt) of a model with sparsemax/entmax15/alpha_entmax")
    p.add_argument("-o", "--output", default="entmax.png", help="image to write (default: entmax.png)")
    p.add_argument("--data", default=None,
                   help="binarised data directory: also measure each head's density on --subset (loads the model "
                        "with fairseq, so the checkpoint is loaded the way fairseq-generate loads it)")
    p.add_argument("--subset", default="valid")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many batches")
    p.add_argument("--title", default=None)


def _entmax_run(args) -> int:
    state = load_checkpoint(args.checkpoint, trust=args.trust_checkpoint)
    # the parameter is the pre-activation divided by the run's --alpha-lr-scale (1 in checkpoints from before it)
    alphas = find_alphas(model_state(state), float(model_option(state, "alpha_lr_scale") or 1.0))
    density = None
    if args.data:
        density = measure_density(args.checkpoint, args.data, args.subset, args.max_tokens, args.max_batches)
    if not alphas and not density:
        raise SystemExit(
            f"fluence-plot entmax: {args.checkpoint} has no learned alpha (no '...pre_alpha' parameter); for "
            "sparsemax/entmax15 models pass --data to plot the density"
        )
    if alphas:
        print(grid_table("learned alpha per head (1 = softmax, 2 = sparsemax)", alphas))
    if density:
        print(grid_table(f"\nattention density per head on '{args.subset}' (share of non-zero weights)", density))
    plot_entmax(alphas, density, args.output, args.title)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ patterns
def _parse_index_list(text: Optional[str], available: int, what: str) -> List[int]:
    if text is None:
        return list(range(available))
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"fluence-plot patterns: --{what} takes comma-separated integers, got {text!r}")
    bad = [v for v in values if not 0 <= v < available]
    if bad or not values:
        raise SystemExit(f"fluence-plot patterns: --{what} {text!r} is out of range (the file has {available} {what})")
    return sorted(set(values))


def read_patterns(path: str):
    """(averages (L, H, N, N) float32 numpy, counts (N, N) numpy or None, metadata dict) of a pattern file written
    by ``compute_attn_score`` (the ``.json`` next to it is optional)."""
    import json
    import os

    import numpy as np

    from ..pruning.patterns import load_patterns

    try:
        array = load_patterns(path).numpy()
    except ValueError as e:
        raise SystemExit(f"fluence-plot patterns: {e}")
    meta_path = os.path.splitext(path)[0] + ".json"
    meta, counts = {}, None
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("counts") is not None:
            counts = np.asarray(meta["counts"], dtype=np.float64)
            if counts.shape != array.shape[2:]:
                counts = None
    return array, counts, meta


def plot_patterns(array, counts, out: str, layers: Sequence[int], max_pos: int, log: bool = False,
                  title: Optional[str] = None, layer_names: Optional[Sequence] = None) -> None:
    """Heatmaps of average attention, one row per layer and one column per head (query position down, key
    position across), on one colour scale per layer; (query, key) pairs never seen are left blank."""
    for name in ("matplotlib", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize

    n = min(max_pos, array.shape[2])
    if counts is not None:
        seen = counts[:n, :n] > 0
        rows, cols = np.nonzero(seen)
        if rows.size:  # crop to the positions that were seen at all
            n = max(int(rows.max()), int(cols.max())) + 1
            seen = seen[:n, :n]
    else:
        seen = np.ones((n, n), dtype=bool)
    heads = array.shape[1]
    fig, axes = plt.subplots(len(layers), heads, squeeze=False, layout="constrained",
                             figsize=(1.0 + 2.2 * heads, 0.6 + 2.2 * len(layers)))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    for r, layer in enumerate(layers):
        block = array[layer, :, :n, :n].astype(np.float64)
        data = np.where(seen[None], block, np.nan)
        finite = data[np.isfinite(data)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        if log:
            positive = finite[finite > 0]
            vmin = max(float(positive.min()) if positive.size else vmax * 1e-4, vmax * 1e-4)
            norm = LogNorm(vmin=vmin, vmax=vmax, clip=True)
            data = np.where(data > 0, data, np.where(np.isnan(data), np.nan, vmin))
        else:
            norm = Normalize(vmin=0.0, vmax=vmax)
        image = None
        for h in range(heads):
            ax = axes[r][h]
            image = ax.imshow(data[h], cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
            name = layer_names[layer] if layer_names is not None else layer
            ax.set_title(f"layer {name}, head {h}", fontsize=9)
            if r == len(layers) - 1:
                ax.set_xlabel("key position")
            if h == 0:
                ax.set_ylabel("query position")
            ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=axes[r].tolist(), shrink=0.9,
                     label="mean probability" + (" (log)" if log else ""))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _patterns_args(p: argparse.ArgumentParser):
    p.add_argument("patterns", help="<type>.npy written by compute_attn_score (its .json is read when present)")
    p.add_argument("-o", "--output", "--out", dest="output", default="patterns.png",
                   help="image to write (default: patterns.png)")
    p.add_argument("--max-pos", type=int, default=64, help="plot query/key positions below this (default 64)")
    p.add_argument("--layers", default=None, metavar="I,J,...", help="0-based layers to plot (default: all)")
    p.add_argument("--log", action="store_true",
                   help="logarithmic colour scale (down to 1e-4 of each layer's maximum): shows the structure of the "
                        "low-probability pairs that pruning removes first")
    p.add_argument("--title", default=None)


def _patterns_run(args) -> int:
    if args.max_pos < 1:
        raise SystemExit("fluence-plot patterns: --max-pos must be positive")
    array, counts, meta = read_patterns(args.patterns)
    layers = _parse_index_list(args.layers, array.shape[0], "layers")
    names = meta.get("layers") if isinstance(meta.get("layers"), list) and len(meta["layers"]) == array.shape[0] else None
    title = args.title
    if title is None:
        what = meta.get("type", "attention")
        extra = f", {meta['sentences']} sentences of '{meta.get('split', '?')}'" if "sentences" in meta else ""
        title = f"average {what} attention{extra}"
    plot_patterns(array, counts, args.output, layers, args.max_pos, args.log, title, names)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------ commands
@dataclass(frozen=True)
class PlotCommand:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


PLOTS: Dict[str, PlotCommand] = OrderedDict()


def register_plot(command: PlotCommand) -> PlotCommand:
    if command.name in PLOTS:
        raise ValueError(f"plot {command.name!r} is already registered")
    PLOTS[command.name] = command
    return command


register_plot(PlotCommand("spans", "learned adaptive attention span per head and layer", _spans_args, _spans_run))
register_plot(PlotCommand("entmax", "learned alpha and attention density per head and layer (sparse attention)",
                          _entmax_args, _entmax_run))
register_plot(PlotCommand("patterns", "average attention per layer and head (from compute_attn_score)",
                          _patterns_args, _patterns_run))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fluence-plot", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in PLOTS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.add_argument("--trust-checkpoint", action="store_true",
                       help="load with weights_only=False (arbitrary code in the file runs: trusted files only)")
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
