"""The attention contract (``tests/attention_contract.py``) for every registered attention, read from the registry.

Nothing here names an attention: each spec runs with its ``tiny`` options (what the test architectures use, chosen
so that short test sequences still exercise the method) and, where they differ, with its defaults on longer
sequences. A new attention module is covered as soon as the registry discovers it. Test modules of single
attentions add contract runs of further configurations (small chunks, the narrow band kernel, ...).
"""
from attention_contract import AttentionContract, Case
import pytest

import randomized
from fluence_fairseq.modules.registry import ATTENTIONS

WIDTH, HEADS = 32, 4


def _case(spec, options, suffix, **lengths):
    return Case(f"{spec.name}{suffix}", lambda **kw: spec.build(WIDTH, HEADS, **options, **kw), **lengths)


def contract_cases():
    for spec in ATTENTIONS.values():
        yield _case(spec, dict(spec.tiny), "")
        if spec.tiny:  # the defaults, on sequences longer than the default landmarks, chunks, ...
            yield _case(spec, {}, "-defaults", tgt_len=20, src_len=18)


for _case_ in contract_cases():
    _name = "TestContract_" + _case_.name.replace("-", "_")
    globals()[_name] = type(_name, (AttentionContract,), {"case": _case_, "__module__": __name__})


@pytest.mark.parametrize("seed,small", randomized.seeds(10))
def test_random_padded_batches_equal_their_items_alone(seed, small):
    """Any attention, any pattern, random lengths and one item padded on either side: each item's outputs and
    gradients equal its own run without padding, and padding gets no gradient (:func:`randomized.batch_case`)."""
    randomized.check(randomized.batch_case, seed, small)


@pytest.mark.parametrize("seed,small", randomized.seeds(10))
def test_random_decoding_equals_the_whole_pass(seed, small):
    """Any attention's causal and cross patterns fed in random calls with beam reorders equal one whole pass
    (:func:`randomized.decoding_case`)."""
    randomized.check(randomized.decoding_case, seed, small)
