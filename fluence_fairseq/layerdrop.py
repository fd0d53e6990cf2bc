"""LayerDrop (Fan et al. 2019, "Reducing Transformer Depth on Demand with Structured Dropout") and layer pruning.

Two parts:

* :class:`LayerDrop`: a drop-in wrapper for any ``nn.ModuleList`` of residual blocks (the Python helper, in the
  spirit of Fluence's ``Layerdrop`` but without its bugs: it drops only in training, draws a fixed count without
  replacement, and never tests a tensor for truth).
* State-dict pruning for ``*_layers_to_keep`` (:func:`parse_layers_to_keep`, :func:`prune_state_dict`,
  :func:`prune_for_load`), used by the fluence models' ``load_state_dict`` at load time and by
  ``fluence-prune-layers`` to write a smaller checkpoint. Unlike fairseq's
  ``checkpoint_utils.prune_state_dict`` each side is pruned on its own (pruning only the decoder keeps every
  encoder weight, fairseq#1257) and keep lists may be strings (``"0,2"``), ints or lists of ints.

Order of kept layers: as in fairseq, a keep list is a *set*: it is sorted, and the kept layers keep their original
relative order (``"4,0,2"`` keeps layers 0, 2, 4, renumbered 0, 1, 2). Layers cannot be reordered or repeated.
"""
import contextlib
import logging
import math
import re
from collections import OrderedDict
from numbers import Integral, Real
from typing import Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .flag_types import FloatRange, restrict

logger = logging.getLogger(__name__)

KeepList = Union[None, str, int, Sequence[int]]


# ------------------------------------------------------------------------------------------ keep lists
def parse_layers_to_keep(value: KeepList, num_layers: Optional[int] = None, name: str = "layers_to_keep"
                         ) -> Optional[List[int]]:
    """A keep list as sorted ints, or None for "keep every layer" (None or an empty string).

    Accepts ``"0,2"`` (what ``--model-overrides`` and the LM's flag give), ``[0, 2]`` or ``(0, 2)`` (what the
    encoder-decoder transformer's ``--*-layers-to-keep`` flag parses to) and a single int. With ``num_layers``
    every index must be in ``range(num_layers)``. Raises ``ValueError`` naming ``name`` on anything else.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        items = [s.strip() for s in value.strip().strip("[]()").split(",")]
        try:
            indices = [int(s) for s in items]
        except ValueError:
            raise ValueError(f"{name}: expected comma-separated layer indices such as '0,2', got {value!r}") from None
    elif isinstance(value, Integral) and not isinstance(value, bool):
        indices = [int(value)]
    elif isinstance(value, (list, tuple)) or (isinstance(value, Iterable) and not isinstance(value, (bytes, dict))):
        indices = list(value)
        bad = [v for v in indices if isinstance(v, bool) or not isinstance(v, Integral)]
        if bad:
            raise ValueError(f"{name}: layer indices must be ints, got {value!r}")
        indices = [int(v) for v in indices]
    else:
        raise ValueError(f"{name}: expected a string like '0,2' or a list of ints, got {type(value).__name__} "
                         f"{value!r}")
    if not indices:
        raise ValueError(f"{name}: the keep list is empty; keep at least one layer (or pass None to keep all)")
    negative = sorted(i for i in indices if i < 0)
    if negative:
        raise ValueError(f"{name}: layer indices are 0-based and non-negative, got {negative} in {value!r}")
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise ValueError(f"{name}: layer(s) {duplicates} listed more than once in {value!r}")
    if num_layers is not None:
        out_of_range = sorted(i for i in indices if i >= num_layers)
        if out_of_range:
            raise ValueError(f"{name}: layer(s) {out_of_range} out of range: the model has {num_layers} layers "
                             f"(indices 0..{num_layers - 1}), got {value!r}")
    return sorted(indices)


def format_layers_to_keep(keep: Sequence[int]) -> str:
    """``[0, 2]`` -> ``"0,2"`` (the form fairseq's own ``build_model`` can ``.split(",")``)."""
    return ",".join(str(i) for i in keep)


# ------------------------------------------------------------------------------------------ state dicts
def _layer_key(side: str) -> "re.Pattern":
    # "<side>.layers.<n>.<rest>": the stack's own layers only (not e.g. "encoder.layer_norm")
    return re.compile(rf"^({re.escape(side)}\.layers\.)(\d+)(\..*)$")


def layer_indices(state_dict: Mapping[str, torch.Tensor], side: str) -> List[int]:
    """The sorted layer numbers of ``<side>.layers.<n>.*`` keys in ``state_dict``."""
    pattern = _layer_key(side)
    return sorted({int(m.group(2)) for m in map(pattern.match, state_dict) if m})


def count_layers(state_dict: Mapping[str, torch.Tensor], side: str) -> int:
    """How many ``side`` layers ``state_dict`` holds; they must be numbered 0..n-1."""
    present = layer_indices(state_dict, side)
    if present != list(range(len(present))):
        raise ValueError(f"the state dict's {side} layers are not numbered 0..n-1: {present}")
    return len(present)


def prune_state_dict(state_dict: Mapping[str, torch.Tensor], keep: Mapping[str, KeepList]) -> "OrderedDict":
    """A new state dict with only the kept layers of each side, renumbered 0..k-1 in their original order.

    ``keep`` maps a side (``"encoder"``, ``"decoder"``) to its keep list; a side mapped to None (or absent) is
    copied untouched, as is every key that is not a layer of a pruned side. Keep lists are validated against the
    layers the state dict holds. The tensors are shared with ``state_dict``, not copied.
    """
    passes = {}
    for side, value in keep.items():
        kept = parse_layers_to_keep(value, count_layers(state_dict, side), name=f"{side}_layers_to_keep")
        if kept is not None:
            passes[side] = (_layer_key(side), {old: new for new, old in enumerate(kept)})
    out = OrderedDict()
    for key, tensor in state_dict.items():
        for pattern, mapping in passes.values():
            m = pattern.match(key)
            if m:
                old = int(m.group(2))
                if old in mapping:
                    out[f"{m.group(1)}{mapping[old]}{m.group(3)}"] = tensor
                break  # a layer of a pruned side: kept (renumbered) or dropped
        else:
            out[key] = tensor
    return out


def _writable(cfg):
    """A context in which ``cfg`` (an argparse Namespace or an omegaconf DictConfig) accepts new attributes."""
    try:
        from omegaconf import DictConfig, open_dict
    except ImportError:  # pragma: no cover - omegaconf comes with fairseq
        return contextlib.nullcontext()
    return open_dict(cfg) if isinstance(cfg, DictConfig) else contextlib.nullcontext()


def set_pruned_config(cfg, side: str, num_layers: int) -> None:
    """Record in a model config that ``side`` now has ``num_layers`` layers and nothing left to prune."""
    if cfg is None:
        return
    with _writable(cfg):
        setattr(cfg, f"{side}_layers", num_layers)
        setattr(cfg, f"{side}_layers_to_keep", None)


#: --encoder-layerdrop / --decoder-layerdrop: p = 1 would skip every layer in training and run all of them in
#: evaluation, a model trained for nothing
LAYERDROP_RATE = FloatRange(0.0, 1.0, hi_open=True, meaning="probability of skipping a layer in training")


def restrict_layerdrop_flags(parser, sides: Sequence[str]) -> None:
    """Check fairseq's own ``--<side>-layerdrop`` flags when the arguments are parsed."""
    for side in sides:
        restrict(parser, f"--{side}-layerdrop", LAYERDROP_RATE, "in [0, 1)")


def check_layerdrop_args(args, sides: Sequence[str]) -> None:
    """At ``build_model``: the same range for values that did not come through the parser (overrides, Python)."""
    for side in sides:
        value = getattr(args, f"{side}_layerdrop", None)
        if value is not None:
            LAYERDROP_RATE.check(f"--{side}-layerdrop", value)


def normalize_layers_to_keep_args(args, sides: Sequence[str]) -> Dict[str, Optional[List[int]]]:
    """At ``build_model``: validate every ``<side>_layers_to_keep`` of ``args`` and rewrite it as a sorted
    ``"0,2"`` string (fairseq's builders call ``.split(",")``), with ``<side>_layers`` set to the kept count.

    Indices are checked against ``<side>_layers`` when that is larger than the keep list, i.e. when the args still
    describe the full model. When they are equal the args may describe a model that was trained with the keep
    list from scratch and already has that many layers; :func:`prune_for_load` sorts that out against the
    checkpoint's own layers. Returns the parsed keep lists.
    """
    parsed = {}
    for side in sides:
        attr = f"{side}_layers_to_keep"
        value = getattr(args, attr, None)
        layers = getattr(args, f"{side}_layers", None)
        keep = parse_layers_to_keep(value, name=attr)
        if keep is not None and layers is not None:
            if len(keep) > layers:
                raise ValueError(f"{attr}: keeps {len(keep)} layers ({value!r}) but the model has {layers} "
                                 f"{side} layers")
            if len(keep) < layers:
                parse_layers_to_keep(keep, layers, name=attr)
        parsed[side] = keep
        if keep is not None:
            setattr(args, attr, format_layers_to_keep(keep))
            setattr(args, f"{side}_layers", len(keep))
    return parsed


def prune_for_load(state_dict: Mapping[str, torch.Tensor], cfgs: Sequence, model_layers: Mapping[str, int]):
    """The state dict to load into a model built with ``*_layers_to_keep``, and the configs reset.

    ``cfgs`` are the model configs to read the keep lists from (the first that has one wins) and to reset
    afterwards (``*_layers_to_keep`` = None, ``*_layers`` = the kept count), so that the pruned model saves and
    reloads as a plain smaller model. ``model_layers`` maps each side to the number of layers the model was built
    with. A state dict that already has exactly that many layers on a side is loaded as it is: it is already
    pruned (a checkpoint trained with the keep list from the start, or a resumed fine-tuning run).
    """
    cfgs = [c for c in cfgs if c is not None]
    keep = {}
    for side, built in model_layers.items():
        value = next((getattr(c, f"{side}_layers_to_keep", None) for c in cfgs
                      if getattr(c, f"{side}_layers_to_keep", None) not in (None, "")), None)
        kept = parse_layers_to_keep(value, name=f"{side}_layers_to_keep")
        if kept is None:
            continue
        available = count_layers(state_dict, side)
        if available == built:
            logger.info(f"{side}: the state dict already has the {built} layers the model was built with; "
                        f"{side}_layers_to_keep={value!r} needs no pruning")
        else:
            if available < built:
                raise ValueError(f"{side}_layers_to_keep={value!r} keeps {built} layers but the checkpoint has only "
                                 f"{available} {side} layers")
            parse_layers_to_keep(kept, available, name=f"{side}_layers_to_keep")
            keep[side] = kept
            logger.info(f"pruning the {side} from {available} to {len(kept)} layers: keeping {kept}")
        for cfg in cfgs:
            set_pruned_config(cfg, side, built)
    return prune_state_dict(state_dict, keep) if keep else state_dict


# ------------------------------------------------------------------------------------------ the helper
class LayerDrop(nn.Module):
    """Apply a stack of layers, skipping each with probability ``p`` while training (LayerDrop).

    Args:
        layers: the stack (an ``nn.ModuleList``, or any iterable of modules). Each layer maps ``x`` to ``x`` (same
            shape), as residual blocks do.
        p: probability of dropping each layer, independently, in ``[0, 1)``. The number of kept layers is
            Binomial(n, 1 - p); it can be zero (then :meth:`forward` returns ``x`` unchanged).
        num_to_drop: instead of ``p``, drop exactly this many distinct layers (uniformly, without replacement) at
            every training forward, like Fluence's ``Layerdrop(module_list, layers_to_drop)``. ``0 <= num_to_drop <
            len(layers)``, so at least one layer always runs.
        generator: a ``torch.Generator`` for the draws. By default the global RNG is used, which fairseq reseeds at
            every update on every worker, so data-parallel workers drop the same layers.

    In ``eval()`` mode every layer runs and no random number is drawn. Iterating, indexing and ``len`` see all
    layers and never drop or draw either; only :meth:`forward` and :meth:`sample_kept` do.

    Example::

        >>> blocks = LayerDrop(nn.ModuleList(nn.Linear(8, 8) for _ in range(6)), p=0.5)
        >>> y = blocks(torch.randn(2, 8))   # training: about 3 of the 6 layers
        >>> small = blocks.prune([0, 2, 4])  # inference: every other layer
    """

    def __init__(self, layers: Union[nn.ModuleList, Iterable[nn.Module]], p: float = 0.0, *,
                 num_to_drop: Optional[int] = None, generator: Optional[torch.Generator] = None):
        super().__init__()
        if not isinstance(layers, nn.ModuleList):
            layers = list(layers)
            if not all(isinstance(m, nn.Module) for m in layers):
                raise TypeError("LayerDrop: layers must be an nn.ModuleList or an iterable of nn.Module")
            layers = nn.ModuleList(layers)
        if len(layers) == 0:
            raise ValueError("LayerDrop: needs at least one layer")
        if isinstance(p, bool) or not isinstance(p, Real) or math.isnan(p) or not 0.0 <= p < 1.0:
            raise ValueError(f"LayerDrop: p must be a probability in [0, 1), got {p!r} (p = 1 would drop every layer)")
        if num_to_drop is not None:
            if isinstance(num_to_drop, bool) or not isinstance(num_to_drop, Integral):
                raise ValueError(f"LayerDrop: num_to_drop must be an int, got {num_to_drop!r}")
            if not 0 <= num_to_drop < len(layers):
                raise ValueError(f"LayerDrop: num_to_drop must be in [0, {len(layers)}) for {len(layers)} layers "
                                 f"(at least one layer runs), got {num_to_drop}")
            if p > 0:
                raise ValueError("LayerDrop: give either p (independent drops) or num_to_drop (a fixed count), "
                                 "not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"LayerDrop: generator must be a torch.Generator, got {type(generator).__name__}")
        self.layers = layers
        self.p = float(p)
        self.num_to_drop = None if num_to_drop is None else int(num_to_drop)
        self.generator = generator

    def extra_repr(self) -> str:
        return f"num_to_drop={self.num_to_drop}" if self.num_to_drop is not None else f"p={self.p}"

    # plain container access: never drops
    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)

    def __getitem__(self, index):
        return self.layers[index]

    def _device(self) -> torch.device:
        return self.generator.device if self.generator is not None else torch.device("cpu")

    def sample_kept(self) -> List[int]:
        """The indices of the layers to run, in order: all of them in eval mode (or with nothing to drop);
        in training, a fresh draw."""
        n = len(self.layers)
        if not self.training or (self.num_to_drop is None and self.p == 0.0) or self.num_to_drop == 0:
            return list(range(n))
        if self.num_to_drop is not None:
            dropped = set(torch.randperm(n, generator=self.generator, device=self._device())[: self.num_to_drop]
                          .tolist())
            return [i for i in range(n) if i not in dropped]
        u = torch.rand(n, generator=self.generator, device=self._device())
        # u is uniform on [0, 1): P(u < p) = p exactly
        return [i for i, drop in enumerate((u < self.p).tolist()) if not drop]

    def forward(self, x, *args, **kwargs):
        """``x = layer(x, *args, **kwargs)`` for every kept layer, in order."""
        for i in self.sample_kept():
            x = self.layers[i](x, *args, **kwargs)
        return x

    def prune(self, keep: KeepList) -> "LayerDrop":
        """A LayerDrop over only the ``keep`` layers (sorted: original order), sharing their modules (not copies).

        Keeps ``p``; a ``num_to_drop`` is capped at the new length minus one.
        """
        kept = parse_layers_to_keep(keep, len(self.layers), name="keep")
        if kept is None:
            raise ValueError("LayerDrop.prune: give the layers to keep, e.g. [0, 2]")
        num_to_drop = None if self.num_to_drop is None else min(self.num_to_drop, len(kept) - 1)
        pruned = LayerDrop(nn.ModuleList(self.layers[i] for i in kept), self.p, num_to_drop=num_to_drop,
                           generator=self.generator)
        pruned.train(self.training)
        return pruned
