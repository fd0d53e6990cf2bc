"""fairseq tasks of fluence_fairseq (registered on import): ``compute_attn_score`` and ``fluence_lm_stream``."""
from .compute_attn_score import ComputeAttnScoreConfig, ComputeAttnScoreTask
from .lm_stream import StreamLanguageModelingConfig, StreamLanguageModelingTask

__all__ = ["ComputeAttnScoreConfig", "ComputeAttnScoreTask", "StreamLanguageModelingConfig",
           "StreamLanguageModelingTask"]
