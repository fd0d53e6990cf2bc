"""Which attention each transformer sublayer uses, as command-line flags generated from the attention registry.

A model has *roles* (:mod:`fluence_fairseq.roles`): the attention sublayers it builds (``encoder_self_attention``,
``decoder_self_attention``, ``cross_attention``; ``--decoder-cross-attention`` is an alias of ``--cross-attention``). Each role is one flag (``--decoder-self-attention adaptive_span``) whose choices are
the keys of :data:`fluence_fairseq.modules.registry.ATTENTIONS`, and every option of every registered attention
becomes a flag too (``attn_span`` -> ``--attn-span``). Adding a row to the registry is enough for the models to
offer it.

Reading options back: fairseq turns the argparse namespace into a ``TransformerConfig``, which routes names that
start with ``encoder_``/``decoder_``/``quant_noise_`` into sub-configs (``decoder_self_attention`` is stored as
``cfg.decoder.self_attention``). :func:`fairseq.utils.safe_getattr` reads them through the config's routing, on a
Namespace and on a ``TransformerConfig`` alike, so every read here goes through it.
"""
import dataclasses
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

from fairseq.models.transformer.transformer_config import EncDecBaseConfig
from fairseq.utils import safe_getattr

from ..modules.attention_base import PATTERNS, describe_patterns
from ..roles import DECODER_CROSS, DECODER_SELF, ENCODER_SELF, AttentionRole  # noqa: F401  (re-exported)
from ..modules.registry import ATTENTIONS, AttentionOption, AttentionSpec, get_attention

#: attention used by a role that neither the --arch nor the command line chose
DEFAULT_ATTENTION = "softmax"


# Option names that fairseq's TransformerConfig copies into both the encoder and the decoder sub-config (they would
# silently change layer sizes), plus names fairseq already uses for other things.
RESERVED_OPTION_NAMES = frozenset(f.name for f in dataclasses.fields(EncDecBaseConfig)) | frozenset(
    {"dropout", "attention_dropout", "activation_dropout", "arch", "data", "task", "criterion"}
)


@dataclass
class _MergedOption:
    option: AttentionOption
    users: List[Tuple[str, Any]]  # (attention name, its default)


def merged_options(specs: Optional[Iterable[AttentionSpec]] = None) -> Dict[str, _MergedOption]:
    """Options of all (or the given) attentions by name; attentions that share an option share its flag."""
    merged: Dict[str, _MergedOption] = {}
    for spec in ATTENTIONS.values() if specs is None else specs:
        for opt in spec.options:
            if opt.name in RESERVED_OPTION_NAMES or opt.name.startswith("quant_noise_"):
                raise ValueError(
                    f"attention {spec.name!r}: option name {opt.name!r} is reserved by fairseq's transformer config; "
                    "rename the option in the attention registry"
                )
            if opt.name in merged:
                first = merged[opt.name]
                if first.option.type != opt.type:
                    raise ValueError(
                        f"attentions {first.users[0][0]!r} and {spec.name!r} both have an option {opt.name!r} but "
                        "with different types; one flag cannot serve both, rename one of them"
                    )
                first.users.append((spec.name, opt.default))
            else:
                merged[opt.name] = _MergedOption(opt, [(spec.name, opt.default)])
    return merged


def _option_help(m: _MergedOption) -> str:
    defaults = {d for _, d in m.users}
    if len(defaults) == 1:
        default = f"default: {m.users[0][1]}"
    else:
        default = "defaults: " + ", ".join(f"{n}={d}" for n, d in m.users)
    users = ", ".join(n for n, _ in m.users)
    return f"{m.option.help} [attention: {users}; {default}, unless the --arch sets another]"


def add_attention_args(parser, roles: Iterable[AttentionRole], model_name: str) -> None:
    """Add one flag per role and one flag per registered attention option, all without argparse defaults.

    Defaults come from the ``--arch`` function (see :mod:`fluence_fairseq.models.architectures`), so that they
    are also applied when an old checkpoint is loaded.
    """
    existing = getattr(parser, "_option_string_actions", {})
    names = sorted(ATTENTIONS)
    for role in roles:
        if role.flag in existing:
            continue  # the same parser asked twice (fairseq builds helper parsers)
        parser.add_argument(
            *role.flags, dest=role.attr, type=str, metavar="NAME", choices=names,
            help=f"attention used for the {role.what}: one of {', '.join(names)} [default: set by the --arch, "
                 f"{DEFAULT_ATTENTION} for --arch {model_name}]",
        )
    for name, merged in merged_options().items():
        flag = "--" + name.replace("_", "-")
        if flag in existing:
            action = existing[flag]
            if getattr(action, "_fluence_option", None) == name:
                continue
            raise ValueError(
                f"attention option {name!r} (from {', '.join(n for n, _ in merged.users)}) clashes with the existing "
                f"fairseq flag {flag}; rename the option in the attention registry"
            )
        action = parser.add_argument(flag, type=merged.option.type, metavar=name.split("_")[-1].upper(),
                                     help=_option_help(merged))
        action._fluence_option = name


def check_pattern(spec: AttentionSpec, role: AttentionRole) -> None:
    supported = getattr(spec.cls, "supported_patterns", None)
    if supported is not None and role.pattern not in supported:
        raise ValueError(
            f"{role.flag} {spec.name}: {spec.name} cannot be used as {role.what} ({PATTERNS[role.pattern]} "
            f"attention); it supports {describe_patterns(supported)}"
        )


def attention_name(cfg, role: AttentionRole) -> str:
    for attr in (role.attr,) + role.aliases:
        name = safe_getattr(cfg, attr, None)
        if name:
            return name
    return DEFAULT_ATTENTION


def fill_attention_defaults(args, roles: Iterable[AttentionRole]) -> None:
    """Give every role an attention and every option of the chosen attentions a value, where still missing.

    Writing the resolved values into ``args`` puts them in the checkpoint, so a model loads the same way even if
    a registry default changes later.
    """
    for role in roles:
        name = attention_name(args, role)
        spec = get_attention(name)
        check_pattern(spec, role)
        setattr(args, role.attr, name)
        for opt in spec.options:
            if safe_getattr(args, opt.name, None) is None:
                setattr(args, opt.name, opt.default)


def attention_kwargs(spec: AttentionSpec, cfg) -> Dict[str, Any]:
    """The constructor options of ``spec`` read from ``cfg`` (a Namespace or a TransformerConfig)."""
    out = {}
    for opt in spec.options:
        value = safe_getattr(cfg, opt.name, None)
        out[opt.name] = opt.default if value is None else value
    return out


def build_attention(
    cfg,
    role: AttentionRole,
    embed_dim: int,
    num_heads: int,
    *,
    dropout: float,
    kdim: Optional[int] = None,
    vdim: Optional[int] = None,
    q_noise: float = 0.0,
    qn_block_size: int = 8,
):
    """Build the attention the config chose for ``role``, with the role's causal/cross flags."""
    spec = get_attention(attention_name(cfg, role))
    check_pattern(spec, role)
    kwargs = attention_kwargs(spec, cfg)
    # only cross attention has foreign key/value sizes; omit them when equal so self-only classes need no kdim
    if kdim is not None and kdim != embed_dim:
        kwargs["kdim"] = kdim
    if vdim is not None and vdim != embed_dim:
        kwargs["vdim"] = vdim
    return spec.build(
        embed_dim, num_heads, dropout=dropout, causal=role.causal, cross=role.cross,
        q_noise=q_noise, qn_block_size=qn_block_size, **kwargs,
    )
