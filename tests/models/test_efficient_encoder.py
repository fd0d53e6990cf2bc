"""EfficientTransformerEncoder: a standalone stack over every registered attention, and the docstring examples."""
import doctest
import importlib
import pkgutil

import pytest
import torch

import fluence_fairseq
from fluence_fairseq import EfficientTransformerEncoder
from fluence_fairseq.modules import ATTENTIONS

NONCAUSAL = sorted(n for n, s in ATTENTIONS.items() if (False, False) in s.cls.supported_patterns)
CAUSAL = sorted(n for n, s in ATTENTIONS.items() if (False, True) in s.cls.supported_patterns)


def tiny(name, **kw):
    torch.manual_seed(0)
    return EfficientTransformerEncoder(name, num_layers=2, embed_dim=32, num_heads=4, ffn_embed_dim=64,
                                       dropout=0.0, **{**ATTENTIONS[name].tiny, **kw}).eval()


@pytest.mark.parametrize("name", NONCAUSAL)
def test_every_noncausal_attention_encodes_with_padding_invariance_and_gradients(name):
    enc = tiny(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 14, 32, generator=g)
    padding = torch.zeros(2, 14, dtype=torch.bool)
    padding[1, 9:] = True
    y = enc(x, padding_mask=padding, batch_first=True)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y[1, 9:] == 0).all()
    # the second sequence alone, unpadded, gives the same features
    alone = enc(x[1:, :9], batch_first=True)
    torch.testing.assert_close(y[1, :9], alone[0], atol=1e-5, rtol=0)
    enc.train()
    enc(x, padding_mask=padding, batch_first=True).pow(2).sum().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert all(g_ is not None and torch.isfinite(g_).all() for g_ in grads)


@pytest.mark.parametrize("name", CAUSAL)
def test_causal_stack_never_sees_the_future(name):
    enc = tiny(name, causal=True)
    x = torch.randn(12, 1, 32, generator=torch.Generator().manual_seed(2))
    y = enc(x)
    x2 = x.clone()
    x2[7:] += 1.0
    torch.testing.assert_close(enc(x2)[:7], y[:7], atol=1e-5, rtol=0)


def test_bad_options_say_what_exists():
    with pytest.raises(ValueError, match="has no option"):
        EfficientTransformerEncoder("softmax", num_layers=1, embed_dim=8, num_heads=2, wsize=3)
    with pytest.raises(ValueError, match="unknown attention"):
        EfficientTransformerEncoder("nope")


def _modules():
    for info in pkgutil.walk_packages(fluence_fairseq.__path__, "fluence_fairseq."):
        if info.name.endswith(("bench", "plot", "help", "__main__")):
            continue
        yield info.name


@pytest.mark.parametrize("module", sorted(_modules()))
def test_docstring_examples_run(module):
    mod = importlib.import_module(module)
    torch.manual_seed(0)
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {module} fail; run python -m doctest -v"
