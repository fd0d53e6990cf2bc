from attention_contract import AttentionContract, Case
from fluence_fairseq.modules import FSSoftmax, FSAdaptiveSpan

class TestSoftmaxContract(AttentionContract):
    case = Case("softmax", lambda **kw: FSSoftmax(32, 4, **kw))

class TestAdaptiveSpanContract(AttentionContract):
    case = Case("adaptive_span", lambda **kw: FSAdaptiveSpan(32, 4, attn_span=8, adapt_span_ramp=2, adapt_span_init=0.5, **kw))
