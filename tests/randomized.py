"""Randomized cases checked against plain references: one seed draws one case (shapes, lengths across the fast
paths' thresholds, masks, padding, dtypes, layouts, α), runs it and returns what disagreed (empty when nothing).

The default suite runs a few small seeds of each; ``pytest -m slow`` runs hundreds (``SLOW_SEEDS``). They found
what fixed-shape tests had not: a pruning layout that raised IndexError for a head keeping keys only in its last
partial query block, and α's gradient of the blocked α-entmax attention near α = 1 far less accurate than the
plain computation's. Each ``*_case`` function takes ``seed`` and ``small`` (cap the sizes for the default suite)
and returns a list of problems, each naming the case; an exception propagates with the case in its message.
"""
import random
from typing import Callable, List, Optional

import torch

#: seeds the slow suite runs for each kind of case
SLOW_SEEDS = range(300)


def _compare(problems: List[str], name: str, got: Optional[torch.Tensor], want: Optional[torch.Tensor], tol: float,
             case: dict, floor: Optional[torch.Tensor] = None) -> None:
    """Append a problem when ``got`` is not finite or is off ``want`` by more than ``tol`` times the larger of 1 and
    ``want``'s largest magnitude (and, with ``floor``, than 3x the error of ``floor``, another computation of the
    same quantity in the same precision). None stands for zeros (autograd's "no dependence")."""
    if got is None and want is None:
        return
    got = torch.zeros_like(want) if got is None else got
    want = torch.zeros_like(got) if want is None else want
    if got.shape != want.shape:
        problems.append(f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)} in {case}")
        return
    if got.numel() == 0:
        return
    if not bool(torch.isfinite(got).all()):
        problems.append(f"{name}: not finite in {case}")
        return
    err = float((got.detach().double() - want.detach().double()).abs().max())
    bound = tol * max(1.0, float(want.detach().abs().max()))
    if floor is not None:
        bound = max(bound, 3 * float((floor.detach().double() - want.detach().double()).abs().max()))
    if not err <= bound:
        problems.append(f"{name}: off by {err:.3g} (bound {bound:.3g}) in {case}")


def _grads(loss: torch.Tensor, leaves: list) -> list:
    return list(torch.autograd.grad(loss, leaves, allow_unused=True))


# --------------------------------------------------------------------------------------------- pruned attention
def _pruning_keep(heads: int, tgt_len: int, src_len: int, causal: bool, rng: random.Random,
                  gen: torch.Generator) -> torch.Tensor:
    kind = rng.choice(["random", "band", "blocky", "full"])
    if kind == "random":
        keep = torch.rand(heads, tgt_len, src_len, generator=gen) < rng.uniform(0.05, 0.95)
    elif kind == "band":
        rel = torch.arange(tgt_len).view(-1, 1) - torch.arange(src_len).view(1, -1)
        keep = torch.stack([rel.abs() <= rng.randrange(max(1, src_len // 2)) for _ in range(heads)])
        keep |= torch.rand(heads, tgt_len, src_len, generator=gen) < 0.02
    elif kind == "blocky":
        blocks = torch.rand(heads, -(-tgt_len // 32), -(-src_len // 32), generator=gen) < rng.uniform(0.05, 0.95)
        keep = blocks.repeat_interleave(32, 1).repeat_interleave(32, 2)[:, :tgt_len, :src_len]
        keep &= torch.rand(heads, tgt_len, src_len, generator=gen) < 0.9
    else:
        keep = torch.ones(heads, tgt_len, src_len, dtype=torch.bool)
    if causal:
        keep &= torch.ones(tgt_len, src_len, dtype=torch.bool).tril()
    if rng.random() < 0.3:  # rows without a key
        keep[:, torch.randint(0, tgt_len, (3,), generator=gen)] = False
    if rng.random() < 0.2:  # a head without a key
        keep[rng.randrange(heads)] = False
    return keep


def _key_padding(bsz: int, src_len: int, rng: random.Random, gen: torch.Generator) -> Optional[torch.Tensor]:
    kind = rng.choice(["none", "none", "right", "left", "both", "holes", "all"])
    if kind == "none":
        return None
    kpm = torch.zeros(bsz, src_len, dtype=torch.bool)
    for b in range(bsz):
        n = rng.randrange(src_len + 1)
        if kind == "right" and n:
            kpm[b, src_len - n :] = True
        elif kind == "left":
            kpm[b, :n] = True
        elif kind == "both":
            kpm[b, : n // 2] = True
            kpm[b, src_len - (n - n // 2) :] = True
        elif kind == "holes":
            kpm[b] = torch.rand(src_len, generator=gen) < 0.3
        elif kind == "all":
            kpm[b] = True
    return kpm


def pruned_attention_case(seed: int, small: bool = False) -> List[str]:
    """:func:`~fluence_fairseq.ops.pruned_attention.pruned_attention` (every path, plans built or not, tuned or
    not, the padded per-item path forced or not, contiguous heads or views of (L, B, H, D)) against a float64
    masked softmax in outputs and the three input gradients."""
    from fluence_fairseq.ops import pruned_attention as pa

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    bsz, heads, dim = rng.choice([1, 2, 3]), rng.choice([1, 2, 4]), rng.choice([8, 16, 64])
    lengths = [1, 5, 31, 32, 33, 64, 100] + ([] if small else [257, 300, 600])
    tgt_len = rng.choice(lengths)
    self_attention = rng.random() < 0.6
    src_len = tgt_len if self_attention else rng.choice([1, 7, 32, 65, 200] + ([] if small else [333, 700]))
    causal = self_attention and rng.random() < 0.5
    keep = _pruning_keep(heads, tgt_len, src_len, causal, rng, gen)
    kpm = _key_padding(bsz, src_len, rng, gen)
    dtype = rng.choice([torch.float32, torch.float64])
    layout = rng.choice(["bhld", "lbhd"])
    path = rng.choice(["auto", "dense", "block-sparse"])
    block = rng.choice([16, 32])
    per_item_from = rng.choice([None, 0])
    plan = None if rng.random() < 0.3 else pa.PrunedPlan(keep, block, tune=rng.random() < 0.3)
    case = dict(seed=seed, bsz=bsz, heads=heads, dim=dim, tgt_len=tgt_len, src_len=src_len, causal=causal,
                padding=kpm is not None, dtype=dtype, layout=layout, path=path, block=block,
                per_item_from=per_item_from, plan=plan is not None)
    if layout == "bhld":
        leaves = [torch.randn(bsz, heads, n, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
                  for n in (tgt_len, src_len, src_len)]
        heads_of = list
    else:
        leaves = [torch.randn(n, bsz, heads, dim, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
                  for n in (tgt_len, src_len, src_len)]

        def heads_of(xs):
            return [(x * 1.0).permute(1, 2, 0, 3) for x in xs]
    grad = torch.randn(bsz, heads, tgt_len, dim, generator=gen, dtype=torch.float64)
    saved = pa.PER_ITEM_FROM
    if per_item_from is not None:
        pa.PER_ITEM_FROM = per_item_from
    try:
        out = pa.pruned_attention(*heads_of(leaves), keep, key_padding_mask=kpm, plan=plan, path=path,
                                  block=block)[0]
        got = [out] + _grads((out * grad.to(dtype)).sum(), leaves)
    except Exception as error:
        raise AssertionError(f"pruned attention failed in {case}") from error
    finally:
        pa.PER_ITEM_FROM = saved
    q, k, v = (x.double() for x in heads_of(leaves))
    allowed = keep.unsqueeze(0).expand(bsz, -1, -1, -1)
    if kpm is not None:
        allowed = allowed & ~kpm.view(bsz, 1, 1, src_len)
    scores = torch.matmul(q, k.transpose(-1, -2)).mul(dim ** -0.5).masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, -1), nan=0.0).masked_fill(~allowed, 0.0)
    ref = torch.matmul(probs, v)
    want = [ref] + _grads((ref * grad).sum(), leaves)
    problems: List[str] = []
    tol = 2e-4 if dtype == torch.float32 else 1e-9
    for name, a, b in zip(("out", "grad q", "grad k", "grad v"), got, want):
        _compare(problems, name, a, b, tol, case)
    return problems


# ------------------------------------------------------------------------------------------------------ entmax
def _bisection_entmax(x: torch.Tensor, alpha: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """α-entmax of the rows of ``x`` (R, n) for ``alpha`` (R, 1) by 200 bisection steps in float64."""
    x = x.double() if mask is None else x.double().masked_fill(mask, float("-inf"))
    finite = torch.isfinite(x)
    has = finite.any(-1, keepdim=True)
    top = torch.where(has, x.masked_fill(~finite, -1e300).amax(-1, keepdim=True), torch.zeros_like(x[:, :1]))
    z = torch.where(finite, (x - top) * (alpha - 1), torch.full_like(x, -1e300))
    beta = 1 / (alpha - 1)
    lo, hi = torch.full_like(top, -1.0), torch.zeros_like(top)
    for _ in range(200):
        mid = (lo + hi) / 2
        above = (z - mid).clamp_min(0).pow(beta).sum(-1, keepdim=True) >= 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    p = (z - (lo + hi) / 2).clamp_min(0).pow(beta)
    return torch.where(has, p / p.sum(-1, keepdim=True), torch.zeros_like(p))


def entmax_case(seed: int, small: bool = False) -> List[str]:
    """:func:`~fluence_fairseq.ops.entmax.entmax` (row lengths and counts across its paths' thresholds, scales from
    near-uniform to one-hot, ties, masks, -inf entries, fully masked rows, α fixed (also above 2) or one per row or
    for all rows, learned) against bisection in float64: probabilities, the scores' gradient (the entmax Jacobian
    in float64) and α's (central differences of the bisection, at a step small enough not to move the support)."""
    from fluence_fairseq.ops.entmax import entmax

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    n = rng.choice([1, 2, 7, 31, 32, 33, 255, 256, 257, 1000] + ([] if small else [4096]))
    rows = rng.choice([1, 3, 16, 100] + ([] if small else [300, 1000])) if n < 4096 else rng.choice([1, 16, 130])
    dtype = rng.choice([torch.float32, torch.float64])
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64) * rng.choice([0.01, 1.0, 3.0, 10.0, 100.0])
    if rng.random() < 0.2:
        x = x.round()  # ties
    if rng.random() < 0.2:
        x[:, 0] += 50  # one dominant entry
    mask = None
    if rng.random() < 0.4:
        mask = torch.rand(rows, n, generator=gen) < rng.choice([0.1, 0.5, 0.95])
        if rows > 2:
            mask[1] = True  # a row with nothing to attend to
    if rng.random() < 0.15:
        x[torch.rand(rows, n, generator=gen) < 0.3] = float("-inf")
    learned = rng.random() < 0.35
    if learned:
        groups = rng.choice([1, rows])
        alpha_in = (1 + torch.rand(groups, 1, generator=gen, dtype=torch.float64).clamp_min(0.01)).to(dtype)
        alpha_in.requires_grad_()
        alpha = alpha_in.detach().double().expand(rows, 1)
    else:
        alpha_in = rng.choice([1.01, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0])
        alpha = torch.full((rows, 1), alpha_in, dtype=torch.float64)
    case = dict(seed=seed, rows=rows, n=n, dtype=dtype, alpha="learned" if learned else alpha_in,
                mask=mask is not None)
    x_in = x.to(dtype).requires_grad_()
    grad = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    try:
        p = entmax(x_in, alpha_in, mask=mask)
        got = _grads((p * grad.to(dtype)).sum(), [x_in] + ([alpha_in] if learned else []))
    except Exception as error:
        raise AssertionError(f"entmax failed in {case}") from error
    want_p = _bisection_entmax(x, alpha, mask)
    problems: List[str] = []
    # float32 thresholds are exact to rounding; above α = 2 the powers 1/(α-1) < 1 of entries at the support's
    # edge amplify it (3e-5 seen at α = 3)
    above_two = not learned and alpha_in > 2
    _compare(problems, "p", p, want_p, (1e-4 if above_two else 3e-5) if dtype == torch.float32 else 1e-9, case)
    # the gradients against the float64 Jacobian at the probabilities this pass made: an entry within rounding of
    # the threshold may sit on either side of it in float32, and the Jacobian jumps there (s = p^(2-α) is nearly
    # the support's indicator for α near 2)
    made = p.detach().double()
    s = torch.where(made > 0, made.pow(2 - alpha), torch.zeros_like(made))
    s_sum = s.sum(-1, keepdim=True).clamp_min(1e-300)
    want_x = s * (grad - (grad * s).sum(-1, keepdim=True) / s_sum)
    _compare(problems, "grad x", got[0], want_x, 1e-4 if dtype == torch.float32 else 1e-7, case)
    if learned:
        # α's: central differences of the bisection in float64 (a step too small to move the support), or for
        # float32 Proposition 1 of Correia et al. (2019) in float64 at the pass's probabilities
        picked = random.Random(seed).sample(range(alpha_in.numel()), min(3, alpha_in.numel()))
        if dtype == torch.float64:
            step = 1e-6
            for i in picked:
                bump = torch.zeros(alpha_in.numel(), 1, dtype=torch.float64)
                bump[i] = step
                base = alpha_in.detach().double()
                diff = (_bisection_entmax(x, (base + bump).expand(rows, 1), mask)
                        - _bisection_entmax(x, (base - bump).expand(rows, 1), mask))
                _compare(problems, f"grad alpha[{i}]", got[1].view(-1)[i], (diff * grad).sum() / (2 * step), 1e-4,
                         case)
        else:
            skewed = s / s_sum
            p_log_p = torch.where(made > 0, made * made.clamp_min(1e-300).log(), torch.zeros_like(made))
            am1 = alpha - 1
            rows_part = ((grad * (made - skewed)).sum(-1, keepdim=True) / am1 ** 2
                         - (grad * (p_log_p - skewed * p_log_p.sum(-1, keepdim=True))).sum(-1, keepdim=True) / am1)
            per_alpha = rows_part.sum(0) if alpha_in.numel() == 1 else rows_part.view(-1)
            for i in picked:
                _compare(problems, f"grad alpha[{i}]", got[1].view(-1)[i], per_alpha.view(-1)[i], 2e-2, case)
    return problems


# -------------------------------------------------------------------------------------- blocked α-entmax attention
def blocked_entmax_case(seed: int, small: bool = False) -> List[str]:
    """:func:`~fluence_fairseq.ops.entmax_attention.blocked_entmax_attention` (random query blocks, causal with and
    without an offset, padding, ALiBi-like relative bias, kept probabilities, returned weights, sparse and dense
    rows, α fixed, shared or per head) against autograd through the plain entmax in float64; in float32, each
    quantity within the float64 tolerance or 3x the plain float32 computation's own error."""
    from fluence_fairseq.ops.entmax import entmax
    from fluence_fairseq.ops.entmax_attention import blocked_entmax_attention

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    big = not small and rng.random() < 0.35
    bsz, heads, dim = rng.choice([1, 2]), rng.choice([8] if big else [1, 2, 8]), rng.choice([8, 32, 64])
    tgt_len = rng.choice([512, 700] if big else [1, 3, 33, 64, 100])
    causal = rng.random() < 0.5
    offset = rng.choice([0, 0, 5]) if causal else 0
    if causal and rng.random() < 0.7:
        src_len = tgt_len + offset
    else:
        src_len = rng.choice([512, 900] if big else [1, 40, 64, 129])
    dtype = rng.choice([torch.float32, torch.float64])
    kind = rng.choice(["1.5", "2", "per head", "shared"])
    if kind in ("1.5", "2"):
        alpha = float(kind)
    else:
        alpha = 1.02 + 0.95 * torch.rand(1, heads if kind == "per head" else 1, 1, 1, generator=gen,
                                         dtype=torch.float64)
    kpm = _key_padding(bsz, src_len, rng, gen)
    slopes = torch.rand(heads, generator=gen, dtype=torch.float64) * 0.1 if rng.random() < 0.2 else None
    cuts = sorted(rng.sample(range(1, tgt_len), min(tgt_len - 1, rng.randrange(4)))) if tgt_len > 1 else []
    bounds = [0] + cuts + [tgt_len]
    blocks = list(zip(bounds[:-1], bounds[1:]))
    keep_probabilities, need_weights = rng.random() < 0.3, rng.random() < 0.4
    sharp = rng.choice([1.0, 3.0, 8.0])  # larger scores: sparser rows, which work on their support
    case = dict(seed=seed, bsz=bsz, heads=heads, dim=dim, tgt_len=tgt_len, src_len=src_len, causal=causal,
                offset=offset, dtype=dtype, alpha=kind, padding=kpm is not None, bias=slopes is not None,
                blocks=len(blocks), keep_probabilities=keep_probabilities, need_weights=need_weights, sharp=sharp)
    q = torch.randn(bsz, heads, tgt_len, dim, generator=gen, dtype=torch.float64) * sharp
    k, v = (torch.randn(bsz, heads, src_len, dim, generator=gen, dtype=torch.float64) for _ in range(2))
    grad_out = torch.randn(bsz, heads, tgt_len, dim, generator=gen, dtype=torch.float64)
    grad_weights = torch.randn(bsz, 1, tgt_len, src_len, generator=gen, dtype=torch.float64)

    def leaves_in(precision):
        made = [t.to(precision).requires_grad_() for t in (q, k, v)]
        return made + ([alpha.to(precision).requires_grad_()] if isinstance(alpha, torch.Tensor) else [])

    def rel_bias_in(precision):
        if slopes is None:
            return None
        return lambda rel: -(slopes.to(precision).view(-1, *([1] * rel.dim())) * rel.abs().to(precision))

    def loss_of(out, weights, precision):
        loss = (out * grad_out.to(precision)).sum()
        return loss + (weights * grad_weights.to(precision)).sum() if weights is not None else loss

    def blocked(precision):
        leaves = leaves_in(precision)
        a = leaves[3] if len(leaves) > 3 else alpha
        result = blocked_entmax_attention(*leaves[:3], a, blocks=blocks, causal=causal, query_offset=offset,
                                          key_padding_mask=kpm, rel_bias=rel_bias_in(precision),
                                          keep_probabilities=keep_probabilities, need_weights=need_weights)
        out, weights = result if need_weights else (result, None)
        return [out, weights] + _grads(loss_of(out, weights, precision), leaves)

    def plain(precision):
        leaves = leaves_in(precision)
        a = leaves[3] if len(leaves) > 3 else alpha
        qq, kk, vv = leaves[:3]
        scores = torch.matmul(qq, kk.transpose(-1, -2)) * dim ** -0.5
        rel = torch.arange(tgt_len).view(-1, 1) + offset - torch.arange(src_len).view(1, -1)
        if slopes is not None:
            scores = scores + rel_bias_in(precision)(rel)
        mask = torch.zeros(bsz, heads, tgt_len, src_len, dtype=torch.bool)
        if causal:
            mask |= rel < 0
        if kpm is not None:
            mask |= kpm.view(bsz, 1, 1, src_len)
        p = entmax(scores, a, mask=mask)
        out, weights = torch.matmul(p, vv), (p.mean(1, keepdim=True) if need_weights else None)
        return [out, weights] + _grads(loss_of(out, weights, precision), leaves)

    try:
        got = blocked(dtype)
    except Exception as error:
        raise AssertionError(f"blocked entmax attention failed in {case}") from error
    want = plain(torch.float64)
    floor = plain(dtype) if dtype == torch.float32 else [None] * len(want)
    problems: List[str] = []
    # float32: the rebuilt probabilities may put an entry at the threshold on the other side of it than the
    # forward did (seen: 2.4e-4 of the gradient's scale at 700 x 512, 3.7x the plain float32 error)
    tol = 5e-4 if dtype == torch.float32 else 1e-8
    names = ("out", "weights", "grad q", "grad k", "grad v", "grad alpha")
    for name, a, b, c in zip(names, got, want, floor):
        if b is None and a is None:
            continue
        _compare(problems, name, a, b, tol, case, floor=c if dtype == torch.float32 else None)
    return problems


# ------------------------------------------------------------------------------------ every registered attention
def _module(name: str, cross: bool, causal: bool, dim: int, heads: int, seed: int):
    from fluence_fairseq.modules.registry import ATTENTIONS

    options = {"cosformer_max_len": 2048} if name == "cosformer" else {}
    torch.manual_seed(seed)
    return ATTENTIONS[name].build(dim, heads, causal=causal, cross=cross, **options).eval().double()


def batch_case(seed: int, small: bool = False, names: Optional[List[str]] = None) -> List[str]:
    """Every registered attention in every pattern it has: a batch of two, the second item left- or right-padded
    by a random amount, against each item run alone without padding, in outputs and in the gradients of the
    inputs; padded positions (keys, and self attention's queries) get no gradient. Lengths cross the attentions'
    chunk and group sizes."""
    from fluence_fairseq.modules.registry import ATTENTIONS

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    name = rng.choice(sorted(names or ATTENTIONS))
    cross, causal = rng.choice(sorted(ATTENTIONS[name].cls.supported_patterns))
    dim, heads = rng.choice([(32, 4), (64, 4), (64, 8)])
    tgt_len = rng.choice([1, 2, 5, 17, 64, 65, 100] + ([] if small else [257, 511, 513, 700, 1030]))
    src_len = tgt_len if not cross or causal else rng.choice([1, 3, 40, 129] + ([] if small else [600, 1025]))
    module = _module(name, cross, causal, dim, heads, seed)
    side = "right" if causal else rng.choice(["right", "left"])
    kept = rng.randrange(1, src_len + 1)  # the second item's real keys (and, in self attention, queries)
    real = slice(0, kept) if side == "right" else slice(src_len - kept, src_len)
    queries = slice(0, tgt_len) if cross else real
    kpm = torch.zeros(2, src_len, dtype=torch.bool)
    kpm[1] = True
    kpm[1, real] = False
    case = dict(seed=seed, attention=name, cross=cross, causal=causal, dim=dim, heads=heads, tgt_len=tgt_len,
                src_len=src_len, kept=kept, side=side)
    x = torch.randn(tgt_len, 2, dim, generator=gen, dtype=torch.float64)
    src = torch.randn(src_len, 2, dim, generator=gen, dtype=torch.float64) if cross else None
    weights = torch.randn(tgt_len, 2, dim, generator=gen, dtype=torch.float64)
    used = torch.zeros(tgt_len, 2, 1, dtype=torch.float64)
    used[:, 0] = 1.0
    used[queries, 1] = 1.0

    def run(query, source, padding, loss_weights):
        query = query.clone().requires_grad_()
        source = None if source is None else source.clone().requires_grad_()
        keys = query if source is None else source
        out = module(query=query, key=keys, value=keys, key_padding_mask=padding, need_weights=False)[0]
        leaves = [query] + ([] if source is None else [source])
        return [out] + _grads((out * loss_weights).sum(), leaves)

    try:
        both = run(x, src, kpm, weights * used)
        first = run(x[:, :1], None if src is None else src[:, :1], None, weights[:, :1])
        second = run(x[queries, 1:], None if src is None else src[real, 1:], None, weights[queries, 1:])
    except Exception as error:
        raise AssertionError(f"attention failed in {case}") from error
    problems: List[str] = []
    _compare(problems, "out, first item", both[0][:, 0], first[0][:, 0], 1e-8, case)
    _compare(problems, "out, second item", both[0][queries, 1], second[0][:, 0], 1e-8, case)
    _compare(problems, "grad query, first item", both[1][:, 0], first[1][:, 0], 1e-8, case)
    _compare(problems, "grad query, second item", both[1][queries, 1], second[1][:, 0], 1e-8, case)
    if cross:
        _compare(problems, "grad source, first item", both[2][:, 0], first[2][:, 0], 1e-8, case)
        _compare(problems, "grad source, second item", both[2][real, 1], second[2][:, 0], 1e-8, case)
    into_padding = (both[2] if cross else both[1])[:, 1].clone()
    into_padding[real] = 0.0
    if float(into_padding.abs().max()) > 0:
        problems.append(f"padded positions got a gradient in {case}")
    return problems


def decoding_case(seed: int, small: bool = False, names: Optional[List[str]] = None) -> List[str]:
    """Every registered attention in its causal and cross patterns: the whole sequence in one call against calls
    of 1, 2, 5 or 17 tokens with the incremental state (cross: its source padded on the right), the beam reordered
    at random between calls. ProbSparse cross attention is left out: it picks its top-u queries among each call's,
    so one query per call is exact attention by design."""
    from fluence_fairseq.modules.registry import ATTENTIONS

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    choices = sorted(names or ATTENTIONS)
    name = rng.choice(choices)
    patterns = [p for p in sorted(ATTENTIONS[name].cls.supported_patterns) if p[0] or p[1]]
    if name == "probsparse":
        patterns = [p for p in patterns if not p[0]]
    if not patterns:
        return []
    cross, causal = rng.choice(patterns)
    dim, heads = rng.choice([(32, 4), (64, 8)])
    tgt_len = rng.choice([1, 2, 7, 33, 64, 65] + ([] if small else [130, 300]))
    src_len = tgt_len if causal else rng.choice([1, 5, 64] + ([] if small else [200, 700]))
    bsz = rng.choice([1, 3])
    module = _module(name, cross, causal, dim, heads, seed)
    x = torch.randn(tgt_len, bsz, dim, generator=gen, dtype=torch.float64)
    src = torch.randn(src_len, bsz, dim, generator=gen, dtype=torch.float64) if cross else None
    kpm = None
    if cross and bsz > 1 and rng.random() < 0.5:
        kpm = torch.zeros(bsz, src_len, dtype=torch.bool)
        kpm[1, rng.randrange(1, src_len + 1):] = True
    reorder = bsz > 1 and rng.random() < 0.5
    sizes: List[int] = []
    while sum(sizes) < tgt_len:
        sizes.append(min(tgt_len - sum(sizes), rng.choice([1, 1, 1, 2, 5, 17])))
    case = dict(seed=seed, attention=name, cross=cross, causal=causal, dim=dim, heads=heads, tgt_len=tgt_len,
                src_len=src_len, bsz=bsz, padding=kpm is not None, reorder=reorder, calls=len(sizes))
    try:
        with torch.no_grad():
            keys = x if src is None else src
            whole = module(query=x, key=keys, value=keys, key_padding_mask=kpm, need_weights=False)[0]
            state: dict = {}
            outs, start, order = [], 0, torch.arange(bsz)
            for i, size in enumerate(sizes):
                piece = x[start : start + size, order]
                if src is None:
                    out = module(query=piece, key=piece, value=piece, incremental_state=state, need_weights=False)[0]
                else:
                    out = module(query=piece, key=src[:, order], value=src[:, order], static_kv=True,
                                 key_padding_mask=None if kpm is None else kpm[order], incremental_state=state,
                                 need_weights=False)[0]
                outs.append(out[:, torch.argsort(order)])
                start += size
                if reorder and i % 2 == 0:
                    new = torch.randperm(bsz, generator=gen)
                    module.reorder_incremental_state(state, new)
                    order = order[new]
    except Exception as error:
        raise AssertionError(f"decoding failed in {case}") from error
    problems: List[str] = []
    _compare(problems, "incremental against whole", torch.cat(outs), whole, 1e-8, case)
    return problems


# ------------------------------------------------------------------------------------------------- adaptive span
def adaptive_span_case(seed: int, small: bool = False) -> List[str]:
    """Adaptive span attention with spans at random, whole-token (z S an integer), zero and full values, against
    the reference computation (softmax, times the soft mask, renormalised exactly) in float64: outputs, input
    gradients and the spans' gradients, including the reference's gradient at the ramp's far end."""
    from fluence_fairseq.modules.registry import ATTENTIONS
    from attention_reference import heads as split_heads

    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    causal = rng.random() < 0.5
    span_len = rng.choice([4, 8, 32, 100])
    ramp = rng.choice([r for r in (1, 4, 32) if r <= span_len])
    dim, heads = rng.choice([(32, 4), (64, 8)])
    length = rng.choice([1, 5, 64, 130, 300] + ([] if small else [700, 1100]))
    torch.manual_seed(seed)
    module = ATTENTIONS["adaptive_span"].build(dim, heads, causal=causal, attn_span=span_len,
                                               adapt_span_ramp=ramp).double().eval()
    ratios = []
    for _ in range(heads):
        kind = rng.choice(["random", "whole", "zero", "one"])
        ratios.append({"random": rng.random(), "whole": rng.randrange(span_len + 1) / span_len, "zero": 0.0,
                       "one": 1.0}[kind])
    span = module.adaptive_span
    with torch.no_grad():
        span.current_val.copy_(torch.tensor(ratios, dtype=torch.float64).view(heads, 1, 1))
    bsz = 2
    x = torch.randn(length, bsz, dim, generator=gen, dtype=torch.float64)
    kpm = None
    if not causal and length > 1 and rng.random() < 0.5:
        kpm = torch.zeros(bsz, length, dtype=torch.bool)
        kpm[1, rng.randrange(1, length):] = True
    used = torch.ones(length, bsz, 1, dtype=torch.float64) if kpm is None else (~kpm).t().unsqueeze(-1).double()
    weights = torch.randn(length, bsz, dim, generator=gen, dtype=torch.float64) * used  # padded queries unused
    case = dict(seed=seed, causal=causal, attn_span=span_len, ramp=ramp, heads=heads, length=length,
                ratios=[round(r, 4) for r in ratios], padding=kpm is not None)

    def run(forward):
        query = x.clone().requires_grad_()
        out = forward(query)
        grads = _grads((out * weights).sum(), [query, span.current_val])
        return [torch.where(used > 0, out, 0.0)] + grads

    def reference(query):
        q, k, v = (split_heads(module, proj(query)) for proj in (module.q_proj, module.k_proj, module.v_proj))
        scores = (q * module.head_dim ** -0.5) @ k.transpose(-1, -2)
        if causal:
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        if kpm is not None:
            scores = scores.masked_fill(kpm.view(bsz, 1, 1, length), torch.finfo(scores.dtype).min)
        rel = torch.arange(length).view(-1, 1) - torch.arange(length).view(1, -1)
        probs = scores.softmax(-1) * span.mask(rel)
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-300)  # exactly (the reference adds 1e-8)
        out = (probs @ v).permute(2, 0, 1, 3).reshape(length, bsz, dim)
        return module.out_proj(out)

    try:
        got = run(lambda query: module(query=query, key=query, value=query, key_padding_mask=kpm,
                                       need_weights=False)[0])
    except Exception as error:
        raise AssertionError(f"adaptive span attention failed in {case}") from error
    want = run(reference)
    problems: List[str] = []
    for name, a, b in zip(("out", "grad input", "grad spans"), got, want):
        _compare(problems, name, a, b, 1e-9, case)
    return problems


def check(case: Callable[..., List[str]], seed: int, small: bool, **kwargs) -> None:
    """Run one case and fail with every problem it found."""
    problems = case(seed, small=small, **kwargs)
    assert not problems, "\n".join(problems)


def seeds(quick: int) -> list:
    """``(seed, small)`` parameters: ``quick`` small cases for the default suite, then :data:`SLOW_SEEDS` full ones
    marked slow."""
    import pytest

    return ([pytest.param(seed, True, id=f"quick{seed}") for seed in range(quick)]
            + [pytest.param(seed, False, id=f"seed{seed}", marks=pytest.mark.slow) for seed in SLOW_SEEDS])
