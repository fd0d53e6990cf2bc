"""Performer (FAVOR+): contract, explicit slow reference, softmax approximation, projection buffer, redraws."""
import math

import pytest
import torch

from attention_contract import AttentionContract, Case
from fluence_fairseq.modules import FSPerformer, Performer
from fluence_fairseq.modules.performer import FEATURE_EPS, orthogonal_gaussian_projection
from fluence_fairseq.ops.linear_attention import causal_linear_attention, linear_attention

E, H = 32, 4


class TestPerformerContract(AttentionContract):
    case = Case("performer", lambda **kw: FSPerformer(32, 4, approx_attn_dim=6, chunk_size=4, **kw))


class TestPerformerDefaultsContract(AttentionContract):
    case = Case("performer-defaults", lambda **kw: FSPerformer(32, 4, **kw), tgt_len=9, src_len=7)
