"""Write a smaller checkpoint that keeps only some layers of a (LayerDrop-trained) fairseq model.

    fluence-prune-layers CHECKPOINT OUT.pt [--encoder-layers-to-keep 0,2] [--decoder-layers-to-keep 1]

Kept layers are renumbered 0..k-1 in their original order (a keep list is a set: ``2,0`` is ``0,2``). The stored
model config (``args`` and/or ``cfg.model``) gets the new ``*_layers`` and empty ``*_layers_to_keep``, so the output
loads in ``fairseq-generate``/``fairseq-train --restore-file`` as a plain smaller model without extra flags. The
optimizer state indexes the full model's parameters, so it is dropped (a fine-tuning run restarts its optimizer and
update count). Works on any fairseq checkpoint whose layers are ``encoder.layers.<n>.*``/``decoder.layers.<n>.*``
(fluence_transformer, fluence_transformer_lm, fairseq's transformer and transformer_lm).
"""
from typing import Dict, List, Mapping, Optional

import torch

from ..layerdrop import count_layers, format_layers_to_keep, parse_layers_to_keep, prune_state_dict, set_pruned_config

SIDES = ("encoder", "decoder")


def count_parameters(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Elements of the state dict's tensors, each storage counted once (shared embeddings are one tensor), leaving
    out fairseq's one-element ``*.version`` markers: for fluence models this is fairseq's ``num. model params``
    (other persistent buffers, if a model has any, are counted too)."""
    seen, total = set(), 0
    for name, tensor in state_dict.items():
        if not torch.is_tensor(tensor) or name.endswith(".version"):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel()
    return total


def model_configs(state: dict) -> List:
    """The stored model configs to rewrite: ``state['args']`` and ``state['cfg']['model']`` (whichever exist)."""
    out = []
    if state.get("args") is not None:
        out.append(state["args"])
    cfg = state.get("cfg")
    if cfg is not None:
        model = cfg.get("model") if isinstance(cfg, dict) else getattr(cfg, "model", None)
        if model is not None and all(model is not c for c in out):
            out.append(model)
    return out


def _set(cfg, side: str, layers: int) -> None:
    if isinstance(cfg, dict):
        cfg[f"{side}_layers"] = layers
        cfg[f"{side}_layers_to_keep"] = None
    else:
        set_pruned_config(cfg, side, layers)


def prune_checkpoint(state: dict, keep: Mapping[str, Optional[object]], log=print) -> dict:
    """Prune a loaded checkpoint dict in place and return it. ``keep`` maps "encoder"/"decoder" to keep lists."""
    model = state["model"]
    parsed: Dict[str, List[int]] = {}
    for side, value in keep.items():
        if value is None:
            continue
        available = count_layers(model, side)
        if available == 0:
            raise ValueError(f"{side}_layers_to_keep given, but the checkpoint has no {side} layers "
                             f"(no '{side}.layers.<n>.' keys)")
        parsed[side] = parse_layers_to_keep(value, available, name=f"{side}_layers_to_keep")
        log(f"{side}: keeping layers {format_layers_to_keep(parsed[side])} of {available}")
    if not parsed:
        raise ValueError("nothing to prune: give --encoder-layers-to-keep and/or --decoder-layers-to-keep")
    before = count_parameters(model)
    state["model"] = prune_state_dict(model, parsed)
    extra = state.get("extra_state") or {}
    if isinstance(extra.get("ema"), Mapping):  # --ema keeps a second copy of the weights
        extra["ema"] = prune_state_dict(extra["ema"], parsed)
        log("pruned the EMA weights too")
    after = count_parameters(state["model"])
    for cfg in model_configs(state):
        for side, kept in parsed.items():
            _set(cfg, side, len(kept))
    if state.get("last_optimizer_state") is not None:
        state["last_optimizer_state"] = None
        log("dropped the optimizer state: it belongs to the unpruned parameters (fine-tuning starts a fresh "
            "optimizer)")
    log(f"parameters: {before:,} -> {after:,} ({after / before:.1%})")
    return state
