"""cosFormer: contract, explicit O(L^2) re-weighted formula in every pattern, padding, M validation."""
import math

import pytest
import torch

from attention_contract import AttentionContract, Case
from fluence_fairseq.modules import CosformerAttention, FSCosformerAttention

E, H = 32, 4


class TestCosformerContract(AttentionContract):
    case = Case("cosformer", lambda **kw: FSCosformerAttention(32, 4, cosformer_max_len=16, chunk_size=4, **kw))


class TestCosformerEluContract(AttentionContract):
    case = Case("cosformer-elu", lambda **kw: FSCosformerAttention(32, 4, act_fun="elu", **kw), tgt_len=9, src_len=7)
