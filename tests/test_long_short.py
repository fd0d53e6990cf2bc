import math

import pytest
import torch

from attention_contract import AttentionContract, Case
from fluence_fairseq.modules import FSLongShort
from fluence_fairseq.ops.long_short import joint_window_global_attention


class TestLongShortContract(AttentionContract):
    case = Case("longshort", lambda **kw: FSLongShort(32, 4, num_landmarks=3, ls_window_size=3, chunk_size=2,
                                                      chunk_rank=2, **kw), tgt_len=13)
