"""The segment memories of a model's causal self attentions, for training and scoring a stream segment by segment.

A :class:`StreamMemory` holds one memory per causal self attention of a model (what that attention keeps of the
earlier segments: keys and values, a window, or a recurrent state; batch on dim 0, detached). Around a forward,
``with memory.attached(model):`` makes every such attention read and update its memory, so fairseq's layers and
criterions need no change. Keep one ``StreamMemory`` per stream set (a split, a rank): memories never mix.
"""
import contextlib
import logging
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..modules.attention_base import FluenceAttention

logger = logging.getLogger(__name__)


def streaming_attentions(model: nn.Module) -> List[Tuple[str, FluenceAttention]]:
    """(path, attention) of every causal self attention of ``model`` (those that take a memory)."""
    return [(path, m) for path, m in model.named_modules()
            if isinstance(m, FluenceAttention) and m.causal and not m.cross]


class StreamMemory:
    def __init__(self) -> None:
        self.states: Dict[str, Dict[str, Optional[Tensor]]] = {}

    def reset(self) -> None:
        """Forget every earlier segment (the start of a stream)."""
        self.states.clear()

    @property
    def rows(self) -> Optional[int]:
        for state in self.states.values():
            for tensor in state.values():
                if tensor is not None:
                    return tensor.size(0)
        return None

    def fit_rows(self, rows: int) -> None:
        """Make the memory fit a batch of ``rows`` streams: a smaller batch continues the first ``rows`` streams;
        a larger one cannot continue streams it never saw, so the memory starts afresh (logged)."""
        held = self.rows
        if held is None or held == rows:
            return
        if rows < held:
            self.reorder(torch.arange(rows))
        else:
            logger.warning(f"a batch of {rows} streams follows one of {held}: the memory starts afresh")
            self.reset()

    def reorder(self, order: Tensor) -> None:
        """Select (and reorder) streams: ``index_select`` on dim 0 of every tensor, as beam search does."""
        for state in self.states.values():
            for name, tensor in state.items():
                if tensor is not None:
                    state[name] = tensor.index_select(0, order.to(tensor.device))

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator["StreamMemory"]:
        """Inside the block every causal self attention of ``model`` reads and updates its memory."""
        attentions = streaming_attentions(model)
        if not attentions:
            raise ValueError(f"{type(model).__name__} has no causal self attention to carry memory")
        for path, attn in attentions:
            if attn.active_memory is not None:
                raise RuntimeError(f"{path} already has a memory attached (nested streams?)")
            attn.active_memory = self.states.setdefault(path, {})
        try:
            yield self
        finally:
            for _, attn in attentions:
                attn.active_memory = None
