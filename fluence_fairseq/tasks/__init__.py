"""fairseq tasks of fluence_fairseq (registered on import): ``compute_attn_score``."""
from .compute_attn_score import ComputeAttnScoreConfig, ComputeAttnScoreTask

__all__ = ["ComputeAttnScoreConfig", "ComputeAttnScoreTask"]
