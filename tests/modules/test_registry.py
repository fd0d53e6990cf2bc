"""The registry: attentions are discovered (no list to edit), a spec's declarations must agree with its class,
and a new attention module gets flags, architectures, the contract and the benchmark without any other edit."""
import inspect
import shutil
import subprocess
import sys
import textwrap

import pytest

import fairseq_helpers as H
from fluence_fairseq.modules import FluenceAttention, fsmha
from fluence_fairseq.modules.registry import ATTENTIONS, attention_modules, module_specs
from fluence_fairseq.modules.spec import AttentionOption, AttentionSpec

TOY_MODULE = '''
"""A throwaway attention for the registry test: softmax attention with a temperature."""
from ..ops.band import band_attention
from .attention_base import FluenceAttention, fsmha
from .spec import AttentionOption, AttentionSpec

__all__ = ["ToyAttention", "FSToyAttention"]


class ToyAttention(FluenceAttention):
    """Softmax attention of the queries divided by a temperature.

    Example::

        >>> attn = FSToyAttention(32, 4, toy_temperature=2.0)
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, *, toy_temperature: float = 1.0, **kwargs):
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.toy_temperature = toy_temperature

    def attend(self, q, k, v, *, key_padding_mask, attn_mask, query_offset, need_weights):
        return band_attention(q / self.toy_temperature, k, v, query_offset=query_offset,
                              right=0 if self.causal else None, key_padding_mask=key_padding_mask,
                              attn_mask=attn_mask, need_weights=need_weights)


@fsmha
class FSToyAttention(ToyAttention):
    """ToyAttention with fairseq's constructor keywords."""


ATTENTION_SPEC = AttentionSpec(
    "toy", FSToyAttention, (AttentionOption("toy_temperature", float, help="softmax temperature of the toy"),),
    "a throwaway softmax attention with a temperature", tiny={"toy_temperature": 0.5},
)
'''

CHECKS = '''
import fluence_fairseq
from fairseq.models import ARCH_MODEL_REGISTRY
from benchmarks.attention import PRESETS
from fluence_fairseq.cli.help import build_parser
from fluence_fairseq.modules import ATTENTIONS

spec = ATTENTIONS["toy"]
assert spec.options[0].default == 1.0, spec.options  # the default comes from the constructor
assert "FSToyAttention" in fluence_fairseq.__all__ and fluence_fairseq.FSToyAttention is spec.cls
for arch in ("transformer_toy", "transformer_toy_small", "transformer_toy_tiny", "transformer_lm_toy",
             "transformer_lm_toy_tiny"):
    assert arch in ARCH_MODEL_REGISTRY, arch
text = build_parser().format_help()
assert "--toy-temperature" in text and "transformer_lm_toy " in text.replace("`", " "), text[-3000:]
assert "toy" in {v.attention for v in PRESETS["efficient_noncausal"]().variants}
assert "toy" in {v.attention for v in PRESETS["efficient_causal"]().variants}
print("TOY OK")
'''


def test_every_attention_module_is_discovered_and_registered_once():
    modules = attention_modules()
    names = [spec.name for module in modules for spec in module_specs(module)]
    assert sorted(names) == sorted(ATTENTIONS) and len(set(names)) == len(names)
    assert list(ATTENTIONS)[:2] == ["softmax", "adaptive_span"]  # baselines first in every table


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_each_option_is_declared_once_in_the_constructor(name):
    """Option defaults come from the constructor signature (the spec only names, types and explains them)."""
    spec = ATTENTIONS[name]
    spec.check()
    signature = inspect.signature(spec.cls.__init__).parameters
    assert all(signature[o.name].default == o.default for o in spec.options)
    causal = {"causal": True} if (False, True) in spec.cls.supported_patterns else {}
    module = spec.build(16, 2, **causal, **{o.name: o.default for o in spec.options})
    assert set(module.hyper_parameters()) <= set(signature)


class _Toy(FluenceAttention):
    def __init__(self, embed_dim, num_heads, dropout=0.0, *, width: int = 3, **kwargs):
        super().__init__(embed_dim, num_heads, dropout=dropout, **kwargs)
        self.width = width

    def attend(self, q, k, v, **kwargs):
        return v, None


def test_a_spec_that_contradicts_its_constructor_is_refused():
    cls = fsmha(type("FSToy", (_Toy,), {}))
    AttentionSpec("ok", cls, (AttentionOption("width", int, help="w"),)).check()
    with pytest.raises(ValueError, match="defaults to 5 in the spec but to 3 in FSToy.__init__"):
        AttentionSpec("bad", cls, (AttentionOption("width", int, 5, "w"),)).check()
    with pytest.raises(ValueError, match="'height' is not a keyword of FSToy.__init__"):
        AttentionSpec("bad", cls, (AttentionOption("height", int, help="h"),)).check()
    with pytest.raises(ValueError, match="tiny/bench option 'depth'"):
        AttentionSpec("bad", cls, (AttentionOption("width", int, help="w"),), tiny={"depth": 2}).check()
    with pytest.raises(ValueError, match="family must be one of"):
        AttentionSpec("bad", cls, family="fast").check()


def test_a_new_attention_module_needs_no_other_edit(tmp_path):
    """Copy the package, add one module, and nothing else: it is registered, gets its flags, --arch names and
    benchmark rows, and passes the attention contract."""
    for folder in ("fluence_fairseq", "benchmarks"):
        shutil.copytree(H.REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "results"))
    (tmp_path / "fluence_fairseq" / "modules" / "toy.py").write_text(TOY_MODULE)
    tests = tmp_path / "tests"
    (tests / "modules").mkdir(parents=True)
    for name in ("conftest.py", "attention_contract.py", "fairseq_helpers.py", "randomized.py"):
        shutil.copy(H.REPO / "tests" / name, tests / name)
    shutil.copy(H.REPO / "tests" / "modules" / "test_contract.py", tests / "modules" / "test_contract.py")
    shutil.copy(H.REPO / "pytest.ini", tmp_path / "pytest.ini")
    env = H.clean_env()
    checks = subprocess.run([sys.executable, "-c", textwrap.dedent(CHECKS)], cwd=tmp_path, capture_output=True,
                            text=True, env=env)
    assert "TOY OK" in checks.stdout, checks.stderr[-3000:]
    contract = subprocess.run([sys.executable, "-m", "pytest", "-q", "tests/modules/test_contract.py", "-k", "toy"],
                              cwd=tmp_path, capture_output=True, text=True, env=env)
    assert contract.returncode == 0, contract.stdout[-3000:] + contract.stderr[-3000:]
    assert " passed" in contract.stdout and "failed" not in contract.stdout
    assert str(tmp_path / "fluence_fairseq") in subprocess.run(
        [sys.executable, "-c", "import fluence_fairseq; print(fluence_fairseq.__file__)"], cwd=tmp_path,
        capture_output=True, text=True).stdout  # the copy, not the checkout, was under test
