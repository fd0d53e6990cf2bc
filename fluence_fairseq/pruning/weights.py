"""Prune the weights of a fairseq model (or any ``nn.Module``): unstructured magnitude/random pruning, structured
L_n pruning of rows/columns, and removal of attention heads, made permanent in the weights.

    fluence-prune-weights IN.pt OUT.pt --amount 0.5 [--method l1|random|ln] [--scope global|layer]
        [--types linear] [--include PATTERN ...] [--exclude PATTERN ...] [--params weight [bias]]
        [--heads MODULE:I,J ... | --prune-heads FRACTION [--head-modules PATTERN ...]] [--seed N] [--list]

What is pruned by default: the ``weight`` of every ``nn.Linear`` of the model except the decoder's output projection
(``*output_projection*``), i.e. for a fairseq transformer the attention ``q/k/v/out_proj`` and the feed-forward
``fc1``/``fc2`` of every encoder and decoder layer. Embeddings, layer norms and biases are left alone. The output
projection is excluded because fairseq ties it to the (decoder or all) embeddings with ``--share-*-embeddings``:
pruning it prunes the embeddings too (the same tensor); include it explicitly (``--include '*output_projection'``)
and the report names every parameter that shares the pruned tensor.

* ``--amount`` is a fraction in [0, 1) of the selected weights to set to zero, or an integer count (>= 1). With
  ``--scope global`` (the default, as in Fluence) one magnitude threshold is used across all selected tensors, so
  the total is exact and per-module sparsity varies; with ``--scope layer`` every tensor loses exactly that
  fraction/count. ``l1`` zeroes the smallest magnitudes (existing zeros count towards the amount); ``random``
  zeroes uniformly chosen entries (reproducible with ``--seed``). ``ln`` is structured: it zeroes whole rows
  (``--dim 0``, output features) or columns (``--dim 1``, input features) of each tensor with the smallest L_n norm
  (``--n``); it needs ``--scope layer`` (a global threshold over rows of differently-shaped tensors is not defined;
  Fluence passed it to ``global_unstructured`` and crashed with a TypeError).
* Heads: ``--heads encoder.layers.0.self_attn:1,3`` (module names may be glob patterns, e.g.
  ``decoder.layers.*.encoder_attn:0``) or ``--prune-heads 0.25`` (in every attention module, the
  ``round(0.25 * heads)`` heads with the smallest L1 norm of their q/k/v rows and out_proj columns; at least one
  head is kept per module). A removed head has its rows of q/k/v (weights and biases) and its columns of out_proj
  set to zero. Shapes are unchanged, so the checkpoint loads in unmodified fairseq code; the other heads compute
  exactly what they computed before (their projections are untouched), and the removed head contributes nothing.
  Heads are removed after the unstructured pruning.

Patterns match ``named_modules`` names (``encoder.layers.0.fc1``) as globs (``*`` also matches dots), or as Python
regular expressions (full match) when written ``re:<regex>``. ``--list`` prints the names.

The pruning uses ``torch.nn.utils.prune`` and is then made permanent (``prune.remove``): the written state dict has
plain ``weight`` tensors with zeros, no ``weight_orig``/``weight_mask``. Nothing keeps pruned weights at zero if the
checkpoint is trained further. The settings and the achieved sparsity are appended to
``extra_state['weight_pruning']`` of the checkpoint (a list: one entry per pruning run). The sparsity table is
computed from the written file (zeros / elements of each tensor), not from the requested amount.
"""
import argparse
import contextlib
import fnmatch
import math
import re
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.nn.utils import prune


METHODS = ("l1", "random", "ln")
SCOPES = ("global", "layer")
#: module type names accepted by ``types`` (classes are accepted too)
TYPE_NAMES = {
    "linear": (nn.Linear,),
    "embedding": (nn.Embedding,),
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "layernorm": (nn.LayerNorm,),
    "any": (nn.Module,),
}
DEFAULT_TYPES = ("linear",)
#: tied to the embeddings under --share-*-embeddings: excluded unless the caller overrides ``exclude``
DEFAULT_EXCLUDE = ("*output_projection*",)

Amount = Union[float, int]


class PruningError(ValueError):
    """Bad pruning settings (the message says what was wrong and how to fix it)."""


# ----------------------------------------------------------------------------------------------- settings
def parse_amount(text: str) -> Amount:
    """Command-line amount: a fraction in [0, 1) (``0.5``, ``.5``, ``0``) or an integer count >= 1 (``1000``)."""
    try:
        value = float(text)
    except ValueError:
        raise PruningError(f"--amount {text!r} is not a number: give a fraction in [0, 1) such as 0.5, "
                           f"or a whole number of weights such as 1000") from None
    if value >= 1:
        if value != int(value) or "." in text:
            raise PruningError(f"--amount {text}: a fraction must be < 1 (1.0 would remove every weight); a count "
                               f"must be a whole number written without a decimal point")
        return int(value)
    return check_amount(value)


def check_amount(amount: Amount) -> Amount:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise PruningError(f"amount must be a fraction (float in [0, 1)) or a count (int >= 0), got {amount!r}")
    if isinstance(amount, float):
        if not (0.0 <= amount < 1.0) or math.isnan(amount):
            raise PruningError(f"amount {amount} is out of range: a fraction must be in [0, 1) "
                               f"(1.0 would zero everything; for a number of weights pass an int)")
    elif amount < 0:
        raise PruningError(f"amount {amount} is negative: give a count >= 0 or a fraction in [0, 1)")
    return amount


def resolve_types(types) -> Tuple[type, ...]:
    if isinstance(types, (str, type)):
        types = [types]
    out: List[type] = []
    for t in types:
        if isinstance(t, type) and issubclass(t, nn.Module):
            out.append(t)
        elif isinstance(t, str) and t.lower() in TYPE_NAMES:
            out.extend(TYPE_NAMES[t.lower()])
        else:
            raise PruningError(f"unknown module type {t!r}: use one of {', '.join(TYPE_NAMES)} "
                               f"(or, from Python, an nn.Module subclass)")
    if not out:
        raise PruningError("no module types given: use e.g. types=['linear']")
    return tuple(out)


def matches(name: str, pattern: str) -> bool:
    """Glob match on a module name (``*`` crosses dots), or a full regex match for ``re:<regex>``."""
    if pattern.startswith("re:"):
        try:
            return re.fullmatch(pattern[3:], name) is not None
        except re.error as error:
            raise PruningError(f"bad regular expression {pattern!r}: {error}") from None
    return fnmatch.fnmatchcase(name, pattern)


def _tensor_names(model: nn.Module) -> Dict[int, List[str]]:
    """id(parameter) -> every ``module.param`` name it is reachable under (tied weights have several)."""
    names: Dict[int, List[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, p in module._parameters.items():
            if p is not None:
                full = f"{mod_name}.{p_name}" if mod_name else p_name
                names.setdefault(id(p), [])
                if full not in names[id(p)]:
                    names[id(p)].append(full)
    return names


def _example_names(names: Sequence[str], k: int = 4) -> str:
    return ", ".join(names[:k]) + (", ..." if len(names) > k else "")


class Target:
    """One tensor to prune: ``module.<param>``, with the other names the same tensor is reachable under."""

    def __init__(self, module_name: str, module: nn.Module, param: str, shared_with: List[str]):
        self.module_name, self.module, self.param, self.shared_with = module_name, module, param, shared_with

    @property
    def name(self) -> str:
        return f"{self.module_name}.{self.param}" if self.module_name else self.param


def select(model: nn.Module, types=DEFAULT_TYPES, include: Optional[Sequence[str]] = None,
           exclude: Optional[Sequence[str]] = DEFAULT_EXCLUDE, params: Sequence[str] = ("weight",),
           strict_exclude: Sequence[str] = ()) -> List[Target]:
    """The tensors to prune: ``params`` of the modules of ``types`` whose name matches an ``include`` pattern (all,
    if none given) and no ``exclude`` pattern. Each tensor appears once even if tied to several modules. Every
    ``include`` pattern, and every pattern in ``strict_exclude``, must match at least one candidate module."""
    classes = resolve_types(types)
    include = list(include or [])
    exclude = list(exclude or [])
    if not params:
        raise PruningError("no parameter names given: use params=['weight'] (and 'bias' to prune biases too)")
    candidates = [(n, m) for n, m in model.named_modules()
                  if n and isinstance(m, classes) and any(isinstance(getattr(m, p, None), nn.Parameter)
                                                          for p in params)]
    cand_names = [n for n, _ in candidates]
    type_text = "/".join(c.__name__ for c in classes)
    if not candidates:
        raise PruningError(f"the model has no {type_text} module with a {'/'.join(params)} parameter: choose "
                           f"other --types ({', '.join(TYPE_NAMES)})")
    for pattern in include + [p for p in strict_exclude]:
        if not any(matches(n, pattern) for n in cand_names):
            raise PruningError(f"pattern {pattern!r} matches no {type_text} module; their names look like "
                               f"{_example_names(cand_names)} (see --list)")
    shared = _tensor_names(model)
    seen, targets = set(), []
    for name, module in candidates:
        if include and not any(matches(name, p) for p in include):
            continue
        if any(matches(name, p) for p in exclude):
            continue
        for p in params:
            tensor = getattr(module, p, None)
            if not isinstance(tensor, nn.Parameter) or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            full = f"{name}.{p}"
            targets.append(Target(name, module, p, [n for n in shared.get(id(tensor), []) if n != full]))
    if not targets:
        raise PruningError(f"the include/exclude patterns leave no {type_text} module to prune (include "
                           f"{include or 'all'}, exclude {exclude}); candidates: {_example_names(cand_names)}")
    return targets


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    """Random pruning draws from torch's global generator: fork it so a seed makes the draw reproducible without
    changing the caller's random stream."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_count(amount: Amount, available: int, what: str) -> None:
    if isinstance(amount, int) and amount > available:
        raise PruningError(f"amount {amount} is more than the {available:,} {what}: give a smaller count or a "
                           f"fraction")


def prune_unstructured(targets: List[Target], amount: Amount, method: str = "l1", scope: str = "global",
                       n: Union[int, float, str] = 2, dim: int = 0, seed: Optional[int] = None) -> None:
    """Attach ``torch.nn.utils.prune`` masks to ``targets`` (not yet permanent: see ``make_permanent``)."""
    amount = check_amount(amount)
    if method not in METHODS:
        raise PruningError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if scope not in SCOPES:
        raise PruningError(f"unknown scope {scope!r}: use 'global' (one threshold over all selected tensors) or "
                           f"'layer' (each tensor pruned by the same amount)")
    if method == "ln":
        if scope != "layer":
            raise PruningError("method 'ln' removes whole rows/columns of each tensor; a global threshold across "
                               "tensors is not defined: use scope 'layer' (--scope layer)")
        if dim not in (0, 1):
            raise PruningError(f"dim {dim} for 'ln': use 0 (rows: output features) or 1 (columns: input features)")
        for t in targets:
            tensor = getattr(t.module, t.param)
            if tensor.dim() < 2:
                raise PruningError(f"'ln' prunes rows/columns, but {t.name} is {tensor.dim()}-D: leave biases and "
                                   f"norms out of the selection")
            _check_count(amount, tensor.shape[dim], f"{'rows' if dim == 0 else 'columns'} of {t.name}")
    elif scope == "global":
        _check_count(amount, sum(getattr(t.module, t.param).numel() for t in targets), "selected weights")
    else:
        for t in targets:
            _check_count(amount, getattr(t.module, t.param).numel(), f"weights of {t.name}")
    if amount == 0:
        return  # nothing to zero; a 0-amount mask would only add and remove a reparametrisation
    with _seeded(seed):
        if scope == "global":
            cls = prune.L1Unstructured if method == "l1" else prune.RandomUnstructured
            prune.global_unstructured([(t.module, t.param) for t in targets], pruning_method=cls, amount=amount)
        else:
            for t in targets:
                if method == "l1":
                    prune.l1_unstructured(t.module, t.param, amount=amount)
                elif method == "random":
                    prune.random_unstructured(t.module, t.param, amount=amount)
                else:
                    prune.ln_structured(t.module, t.param, amount=amount, n=n, dim=dim)


# -------------------------------------------------------------------------------------------------- heads
def attention_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """Multi-head attentions: fairseq's ``MultiheadAttention`` and anything shaped like it (the fluence
    attentions derive from it), i.e. ``num_heads``, ``head_dim``, ``v_proj`` and ``out_proj`` Linear layers."""
    out = {}
    for name, m in model.named_modules():
        if (isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int)
                and isinstance(getattr(m, "out_proj", None), nn.Linear)
                and isinstance(getattr(m, "v_proj", None), nn.Linear)):
            out[name] = m
    return out


def _head_rows(m: nn.Module, h: int) -> slice:
    return slice(h * m.head_dim, (h + 1) * m.head_dim)


def _projections(m: nn.Module) -> List[nn.Linear]:
    # q_proj/k_proj are None in value-only attentions (S4D)
    return [p for p in (getattr(m, "q_proj", None), getattr(m, "k_proj", None), m.v_proj) if isinstance(p, nn.Linear)]


def head_importance(m: nn.Module) -> torch.Tensor:
    """L1 norm of each head's parameters: its rows of q/k/v (weights) and its columns of out_proj."""
    with torch.no_grad():
        scores = torch.zeros(m.num_heads)
        for h in range(m.num_heads):
            rows = _head_rows(m, h)
            total = sum(p.weight[rows].abs().sum() for p in _projections(m))
            scores[h] = total + m.out_proj.weight[:, rows].abs().sum()
    return scores


def parse_head_specs(specs: Iterable[str], attention: Mapping[str, nn.Module]) -> Dict[str, List[int]]:
    """``['encoder.layers.0.self_attn:1,3', 'decoder.layers.*.encoder_attn:0']`` -> {module name: sorted heads}."""
    out: Dict[str, List[int]] = {}
    names = list(attention)
    for spec in specs:
        if spec.count(":") != 1:
            raise PruningError(f"head spec {spec!r}: write MODULE:I,J (e.g. encoder.layers.0.self_attn:1,3)")
        pattern, heads_text = spec.split(":")
        try:
            heads = [int(x) for x in heads_text.split(",") if x.strip() != ""]
        except ValueError:
            raise PruningError(f"head spec {spec!r}: heads must be comma-separated integers") from None
        if not heads:
            raise PruningError(f"head spec {spec!r} lists no heads")
        if len(set(heads)) != len(heads):
            raise PruningError(f"head spec {spec!r} lists a head more than once")
        hit = [n for n in names if matches(n, pattern)]
        if not hit:
            raise PruningError(f"head spec {spec!r}: {pattern!r} matches no attention module; their names look "
                               f"like {_example_names(names)} (see --list)")
        for name in hit:
            m = attention[name]
            bad = [h for h in heads if not 0 <= h < m.num_heads]
            if bad:
                raise PruningError(f"head spec {spec!r}: head {bad[0]} is out of range: {name} has {m.num_heads} "
                                   f"heads (0..{m.num_heads - 1})")
            out[name] = sorted(set(out.get(name, [])) | set(heads))
    return out


def choose_heads(model: nn.Module, specs: Optional[Sequence[str]] = None, fraction: Optional[float] = None,
                 modules: Optional[Sequence[str]] = None) -> Dict[str, List[int]]:
    """Heads to remove: explicit ``specs``, or in every attention module (matching ``modules`` patterns, if
    given) the ``round(fraction * num_heads)`` least important heads (``head_importance``), keeping at least one."""
    attention = attention_modules(model)
    if (specs is None) == (fraction is None):
        raise PruningError("give either explicit heads (--heads MODULE:I,J) or a fraction (--prune-heads F)")
    if not attention:
        raise PruningError("the model has no multi-head attention module (no num_heads/head_dim/v_proj/out_proj)")
    if specs is not None:
        return parse_head_specs(specs, attention)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise PruningError(f"--prune-heads {fraction!r}: give the fraction of heads to remove per module, in [0, 1)")
    if modules:
        for pattern in modules:
            if not any(matches(n, pattern) for n in attention):
                raise PruningError(f"--head-modules {pattern!r} matches no attention module; their names look "
                                   f"like {_example_names(list(attention))}")
        attention = {n: m for n, m in attention.items() if any(matches(n, p) for p in modules)}
    out = {}
    for name, m in attention.items():
        k = min(int(round(fraction * m.num_heads)), m.num_heads - 1)
        if k > 0:
            # stable sort: equal scores remove the lower index first, so the choice is deterministic
            scores = head_importance(m).tolist()
            order = sorted(range(m.num_heads), key=lambda h: (scores[h], h))
            out[name] = sorted(order[:k])
    return out


def remove_heads(model: nn.Module, heads: Mapping[str, Sequence[int]]) -> List[Tuple[nn.Module, str]]:
    """Attach masks that zero the given heads (q/k/v rows and biases, out_proj columns, add_bias_kv slices);
    returns the (module, param) pairs masked."""
    attention = attention_modules(model)
    masked = []
    for name, hs in heads.items():
        m = attention[name]
        keep_rows = torch.ones(m.num_heads * m.head_dim, dtype=torch.bool)
        for h in hs:
            keep_rows[_head_rows(m, h)] = False
        for proj in _projections(m):
            mask = torch.ones_like(proj.weight, dtype=torch.bool)
            mask[~keep_rows] = False
            prune.custom_from_mask(proj, "weight", mask.to(proj.weight.device))
            masked.append((proj, "weight"))
            if proj.bias is not None:
                prune.custom_from_mask(proj, "bias", keep_rows.to(proj.bias.device))
                masked.append((proj, "bias"))
        mask = torch.ones_like(m.out_proj.weight, dtype=torch.bool)
        mask[:, ~keep_rows] = False
        prune.custom_from_mask(m.out_proj, "weight", mask.to(m.out_proj.weight.device))
        masked.append((m.out_proj, "weight"))
        for extra in ("bias_k", "bias_v"):  # add_bias_kv: one learnt key/value per head slice
            p = getattr(m, extra, None)
            if isinstance(p, nn.Parameter):
                prune.custom_from_mask(m, extra, keep_rows.view(1, 1, -1).expand_as(p).to(p.device))
                masked.append((m, extra))
    return masked


def make_permanent(model: nn.Module) -> None:
    """``prune.remove`` every pruning reparametrisation: plain parameters with zeros, no ``*_orig``/``*_mask``."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)


# ------------------------------------------------------------------------------------------------- report
def _count(tensor: torch.Tensor) -> Dict[str, float]:
    zeros = int((tensor == 0).sum())
    return {"zeros": zeros, "numel": tensor.numel(), "sparsity": zeros / tensor.numel() if tensor.numel() else 0.0}


def sparsity_report(tensors: Mapping[str, torch.Tensor], names: Sequence[str]) -> Dict:
    """Achieved sparsity, from the tensors themselves: each named tensor, the named tensors together
    (``overall``), and every floating tensor of ``tensors`` with each storage counted once (``model``; fairseq's
    ``*.version`` markers left out)."""
    modules = {n: _count(tensors[n]) for n in names}
    zeros = sum(v["zeros"] for v in modules.values())
    numel = sum(v["numel"] for v in modules.values())
    seen, mz, mn = set(), 0, 0
    for key, t in tensors.items():
        if not torch.is_tensor(t) or not t.is_floating_point() or key.endswith(".version"):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in seen:
            continue
        seen.add(ident)
        c = _count(t)
        mz, mn = mz + c["zeros"], mn + c["numel"]
    return {"modules": modules,
            "overall": {"zeros": zeros, "numel": numel, "sparsity": zeros / numel if numel else 0.0},
            "model": {"zeros": mz, "numel": mn, "sparsity": mz / mn if mn else 0.0}}


def format_report(report: Mapping) -> str:
    rows = [("tensor", "zeros", "elements", "sparsity")]
    for name, v in report["modules"].items():
        rows.append((name, f"{v['zeros']:,}", f"{v['numel']:,}", f"{v['sparsity']:.2%}"))
    o, m = report["overall"], report["model"]
    rows.append(("pruned tensors together", f"{o['zeros']:,}", f"{o['numel']:,}", f"{o['sparsity']:.2%}"))
    rows.append(("whole model (all floating tensors)", f"{m['zeros']:,}", f"{m['numel']:,}", f"{m['sparsity']:.2%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join([r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]))
        if i == 0 or i == len(rows) - 3:
            lines.append("  ".join("-" * w for w in widths))
    for name, heads in (report.get("heads") or {}).items():
        lines.append(f"removed heads {','.join(map(str, heads))} of {name}")
    for name, others in (report.get("shared") or {}).items():
        lines.append(f"note: {name} is the same tensor as {', '.join(others)} (tied weights): pruned together")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- API
def prune_model(model: nn.Module, amount: Optional[Amount] = None, method: str = "l1", scope: str = "global",
                types=DEFAULT_TYPES, include: Optional[Sequence[str]] = None,
                exclude: Optional[Sequence[str]] = DEFAULT_EXCLUDE, params: Sequence[str] = ("weight",),
                n: Union[int, float, str] = 2, dim: int = 0, heads: Optional[Sequence[str]] = None,
                prune_heads: Optional[float] = None, head_modules: Optional[Sequence[str]] = None,
                seed: Optional[int] = None, strict_exclude: Sequence[str] = ()) -> Dict:
    """Prune ``model`` in place, permanently, and return the sparsity report (see ``sparsity_report``) with
    ``heads`` (module -> removed heads), ``shared`` (tied tensors) and ``settings``.

    Example::

        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
        >>> report = prune_model(model, 0.5, method="l1", scope="global")
        >>> round(report["overall"]["sparsity"], 3)     # counted from the weights
        0.5
    """
    if amount is None and heads is None and prune_heads is None:
        raise PruningError("nothing to prune: give an amount (--amount) and/or heads (--heads / --prune-heads)")
    if heads is not None and prune_heads is not None:
        raise PruningError("give either explicit heads (--heads) or a fraction (--prune-heads), not both")
    targets: List[Target] = []
    # validate everything before touching the model, so a bad setting leaves it unchanged
    if amount is not None:
        check_amount(amount)
        if method not in METHODS:
            raise PruningError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
        targets = select(model, types, include, exclude, params, strict_exclude)
    chosen: Dict[str, List[int]] = {}
    if heads is not None or prune_heads is not None:
        chosen = choose_heads(model, heads, prune_heads, head_modules)
    if targets:
        prune_unstructured(targets, amount, method, scope, n=n, dim=dim, seed=seed)
    masked = remove_heads(model, chosen)
    make_permanent(model)
    names = [t.name for t in targets]
    shared = {t.name: t.shared_with for t in targets if t.shared_with}
    all_names = _tensor_names(model)
    for module, param in masked:
        full = all_names[id(getattr(module, param))][0]
        if full not in names:
            names.append(full)
    state = {k: v for k, v in model.state_dict().items()}
    report = sparsity_report(state, names)
    report.update(heads=chosen, shared=shared, settings={
        "amount": amount, "method": method if amount is not None else None, "scope": scope if amount is not None
        else None, "types": [t if isinstance(t, str) else t.__name__ for t in
                             ([types] if isinstance(types, (str, type)) else types)],
        "include": list(include or []), "exclude": list(exclude or []), "params": list(params),
        "n": n if method == "ln" else None, "dim": dim if method == "ln" else None,
        "heads": list(heads) if heads is not None else None, "prune_heads": prune_heads,
        "head_modules": list(head_modules) if head_modules else None, "seed": seed})
    return report


# ------------------------------------------------------------------------------------------- checkpoints
def _model_cfg(state: dict):
    cfg = state.get("cfg")
    model_cfg = None
    if cfg is not None:
        model_cfg = cfg.get("model") if isinstance(cfg, Mapping) else getattr(cfg, "model", None)
    if model_cfg is None:
        model_cfg = state.get("args")
    if model_cfg is None:
        raise PruningError("the checkpoint stores no model config (neither cfg['model'] nor args): is it a fairseq "
                           "checkpoint?")
    if isinstance(model_cfg, Mapping):
        from omegaconf import OmegaConf

        model_cfg = OmegaConf.create(dict(model_cfg))
    return model_cfg


def _import_user_dir(state: dict) -> None:
    """Models from another --user-dir must be registered before they can be built."""
    cfg, user_dir = state.get("cfg"), None
    if isinstance(cfg, Mapping) and isinstance(cfg.get("common"), Mapping):
        user_dir = cfg["common"].get("user_dir")
    if user_dir is None and state.get("args") is not None:
        user_dir = getattr(state["args"], "user_dir", None)
    if user_dir and user_dir not in ("fluence_fairseq", "user_dir"):
        from fairseq import utils

        with contextlib.suppress(Exception):  # a missing dir surfaces below as an unknown architecture
            utils.import_user_module(argparse.Namespace(user_dir=user_dir))


def build_model_from_checkpoint(state: dict) -> nn.Module:
    """Build the checkpoint's model from its stored config and load its weights, without the task's data: the
    dictionaries are stand-ins of the sizes the embedding matrices have (only their sizes shape the model)."""
    from fairseq.data import Dictionary
    from fairseq.models import build_model
    from fairseq.tasks import FairseqTask

    weights = state["model"]
    sizes = {side: weights[f"{side}.embed_tokens.weight"].shape[0] for side in ("encoder", "decoder")
             if f"{side}.embed_tokens.weight" in weights}
    if not sizes:
        raise PruningError("cannot infer the dictionary sizes: the checkpoint has no encoder/decoder.embed_tokens "
                           "weight (adaptive inputs are not supported); prune the model in Python with prune_model")

    def dictionary(size):
        d = Dictionary()
        while len(d) < size:
            d.add_symbol(f"<stand-in-{len(d)}>")
        return d

    src = dictionary(sizes.get("encoder", sizes.get("decoder")))
    tgt = src if sizes.get("decoder", len(src)) == len(src) else dictionary(sizes["decoder"])

    class StandInTask(FairseqTask):
        source_dictionary = property(lambda self: src)
        target_dictionary = property(lambda self: tgt)
        dictionary = property(lambda self: tgt)
        output_dictionary = property(lambda self: tgt)

    _import_user_dir(state)
    model_cfg = _model_cfg(state)
    try:
        model = build_model(model_cfg, StandInTask(argparse.Namespace()))
    except Exception as error:  # the arch is unknown, or its build needs the real task's data
        raise PruningError(f"could not rebuild the model from the checkpoint's config ({type(error).__name__}: "
                           f"{error}); prune it in Python with prune_model on the loaded model") from error
    model.load_state_dict(weights, strict=True, model_cfg=model_cfg)
    return model


def prune_checkpoint(state: dict, log=print, **settings) -> Dict:
    """Prune a loaded fairseq checkpoint dict in place (``settings`` as ``prune_model``) and return the report,
    computed from the tensors written into ``state['model']``; the settings and achieved sparsity are appended to
    ``state['extra_state']['weight_pruning']``."""
    original = state["model"]
    model = build_model_from_checkpoint(state)
    report = prune_model(model, **settings)
    pruned = model.state_dict()
    stray = [k for k in pruned if k.endswith("_orig") or k.endswith("_mask")]
    assert not stray, f"pruning left reparametrisation tensors behind: {stray}"
    # Write back only the checkpoint's own keys, in their dtype; tensors that were one storage stay one storage.
    by_storage: Dict[Tuple, torch.Tensor] = {}
    new = {}
    for key, old in original.items():
        if not torch.is_tensor(old) or key not in pruned:
            new[key] = old
            continue
        ident = (old.untyped_storage().data_ptr(), old.storage_offset(), tuple(old.shape), old.dtype)
        if ident not in by_storage:
            by_storage[ident] = pruned[key].detach().to(dtype=old.dtype, device="cpu").clone()
        new[key] = by_storage[ident]
    state["model"] = new
    extra = state.get("extra_state")
    if extra is None:
        extra = state["extra_state"] = {}
    if isinstance(extra.get("ema"), Mapping):
        log("note: the EMA copy of the weights (extra_state['ema']) is left dense")
    names = list(report["modules"])
    saved = sparsity_report(new, [k for k in names if k in new])
    report.update(modules=saved["modules"], overall=saved["overall"], model=saved["model"])
    extra.setdefault("weight_pruning", []).append({
        "settings": report["settings"], "tensors": names, "shared": {k: list(v) for k, v in report["shared"].items()}, "heads": {k: list(v) for k, v in report["heads"].items()},
        "sparsity": report["overall"]["sparsity"], "model_sparsity": report["model"]["sparsity"]})
    return report


def list_modules(model: nn.Module) -> str:
    lines = ["prunable modules (name: type, weight shape):"]
    for name, m in model.named_modules():
        if name and isinstance(getattr(m, "weight", None), nn.Parameter):
            lines.append(f"  {name}: {type(m).__name__} {tuple(m.weight.shape)}")
    lines.append("attention modules (for --heads / --head-modules):")
    for name, m in attention_modules(model).items():
        lines.append(f"  {name}: {m.num_heads} heads of {m.head_dim}")
    return "\n".join(lines)
