"""The three attention roles are named once (fluence_fairseq.roles) and every other place reads them from there."""
import ast

import pytest

import fairseq_helpers as H
from fluence_fairseq.cli.help import build_parser
from fluence_fairseq.criterions.fluence import fluence_attentions
from fluence_fairseq.modules import FluenceAttention
from fluence_fairseq.pruning.collect import TYPES, find_attentions
from fluence_fairseq.pruning.flags import PATTERN_TYPES, pattern_flag
from fluence_fairseq.roles import DECODER_CROSS, DECODER_SELF, ENCODER_SELF, ROLES, attention_label, role_at, split_label


def test_every_name_of_a_role_round_trips():
    for role in ROLES:
        path = role.module_path(3)
        assert role_at(path) == (role, 3) and role_at("module." + path) == (role, 3)  # wrappers add prefixes
        assert attention_label(path) == f"{role.label}_3" and split_label(f"{role.label}_3") == (role, 3)
    assert role_at("encoder.layers.0.encoder_attn") is None and role_at("decoder.layers.1.fc1") is None
    assert [r.pattern_name for r in ROLES] == ["self-enc", "self-dec", "enc-dec"] == list(TYPES)
    assert PATTERN_TYPES == {"self-enc": False, "self-dec": True, "enc-dec": False}
    assert DECODER_CROSS.flags == ("--cross-attention", "--decoder-cross-attention")


def test_flags_of_every_role_reach_the_command_line():
    text = build_parser().format_help()
    for role in ROLES:
        assert role.flag in text and pattern_flag(role.pattern_name) in text


def test_a_model_names_each_attention_by_the_role_its_math_was_built_for():
    model, _, _ = H.build("fluence_transformer_tiny", [])
    found = find_attentions(model)
    assert list(found) == list(TYPES)
    for kind, entries in found.items():
        role = next(r for r in ROLES if r.pattern_name == kind)
        assert [layer for layer, _, _ in entries] == [0, 1]
        assert all((m.cross, m.causal) == role.pattern for _, _, m in entries)
    labels = [label for label, _ in fluence_attentions(model)]
    assert labels == ["enc_self_0", "enc_self_1", "dec_self_0", "cross_0", "dec_self_1", "cross_1"]
    assert all(isinstance(m, FluenceAttention) for _, m in fluence_attentions(model))


ROLE_NAMES = {name for role in ROLES for name in
              (role.attr, role.pattern_name, role.label, role.sublayer, *role.aliases)} - {"cross"}


@pytest.mark.parametrize("path", sorted((H.REPO / "fluence_fairseq").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(H.REPO / "fluence_fairseq")))
def test_no_module_but_roles_spells_a_role_name(path):
    """String literals in code (docstrings aside) never spell a role's names: they come from the roles module."""
    if path.name == "roles.py":
        return
    tree = ast.parse(path.read_text())
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)}
    spelled = [(n.lineno, n.value) for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and id(n) not in docstrings and n.value in ROLE_NAMES]
    assert not spelled, f"{path.name} spells role names {spelled}; read them from fluence_fairseq.roles"
