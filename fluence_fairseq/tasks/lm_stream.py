"""``--task fluence_lm_stream``: language modelling over a stream, segment by segment, with memory.

The corpus of a split is one token stream (the binarised lines one after the other, each ending with ``</s>``).
It is cut into ``--batch-size`` rows per data-parallel rank (rank ``r`` of ``W`` takes rows ``r*B .. r*B+B-1`` of
the ``W*B`` equal, contiguous pieces), and batch ``i`` is segment ``i`` of every row: ``--tokens-per-sample``
tokens and the next token as target. Consecutive batches continue each row, in order (no shuffling), and every
causal self attention carries its memory of the earlier segments from one batch to the next
(:class:`~fluence_fairseq.models.stream_memory.StreamMemory`), detached: truncated backpropagation through time.
What an attention remembers is its own bound: ``--mem-len`` keys for softmax and entmax, the window for local
attention, the current span + ramp for adaptive span, the recurrent state of ABC, Performer, S4D and LongShort.
cosFormer cannot stream and is refused.

Memories are kept per split (training, each validation split, the ``fairseq-eval-lm`` subset) and start empty at
the first segment of every pass, so nothing leaks from training into validation or from one pass into the next.
They are not saved in checkpoints: training resumed in the middle of an epoch continues its streams with an empty
memory. Positions: the model must have no absolute position embeddings (``--no-token-positional-embeddings``:
they would restart at every segment); ``--attn-position-bias alibi`` gives the attentions that take a relative
bias one that survives memory.

``fairseq-eval-lm DATA --task fluence_lm_stream --path CKPT --batch-size 1`` scores the whole stream of
``--gen-subset`` with memory (with ``--batch-size B`` the first token of each row and the last ``< B`` tokens are
not scored). Generation (``fairseq-generate``/``fairseq-interactive``, the hub's ``sample()``) works as for any
language model: the decoding cache is the memory, bounded in the same way.

The name is not fairseq's ``truncated_bptt_lm`` example task, which it does not clash with; its flags are the
``language_modeling`` task's.
"""
import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from fairseq.data import FairseqDataset, data_utils, iterators
from fairseq.tasks import TASK_REGISTRY, register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from ..models.stream_memory import StreamMemory, streaming_attentions

logger = logging.getLogger(__name__)

TASK_NAME = "fluence_lm_stream"


class StreamSegments(FairseqDataset):
    """Item ``i`` is the whole batch of segment ``i`` of this rank's rows (a fairseq sample)."""

    def __init__(self, stream: torch.Tensor, rows: int, segment: int, split: str, pad: int,
                 num_shards: int = 1, shard_id: int = 0):
        if rows < 1 or segment < 1:
            raise ValueError(f"need at least one row (--batch-size) and one token per segment (--tokens-per-sample), "
                             f"got {rows} and {segment}")
        total_rows = rows * num_shards
        self.row_len = (stream.numel() - 1) // total_rows  # predicted tokens per row
        if self.row_len < 1:
            raise ValueError(f"split {split!r} has {stream.numel()} tokens: too few for {total_rows} rows "
                             f"({rows} per rank x {num_shards} ranks); lower --batch-size")
        first = shard_id * rows
        starts = torch.arange(first, first + rows) * self.row_len
        index = starts.view(-1, 1) + torch.arange(self.row_len + 1).view(1, -1)
        self.rows = stream[index]  # (rows, row_len + 1): inputs are [:-1], targets [1:]
        self.segment = segment
        self.split = split
        self.pad = pad

    def __len__(self) -> int:
        return (self.row_len + self.segment - 1) // self.segment

    def __getitem__(self, i: int) -> Dict:
        start = i * self.segment
        end = min(self.row_len, start + self.segment)
        src = self.rows[:, start:end].contiguous()
        rows, length = src.shape
        return {
            "id": torch.arange(rows), "nsentences": rows, "ntokens": rows * length,
            "net_input": {"src_tokens": src, "src_lengths": torch.full((rows,), length, dtype=torch.long)},
            "target": self.rows[:, start + 1:end + 1].contiguous(), "segment": i, "split": self.split,
        }

    def collater(self, samples: List[Dict]) -> Dict:
        return samples[0]

    def num_tokens(self, index):
        return self.segment * self.rows.size(0)

    def size(self, index):
        return self.segment


@dataclass
class StreamLanguageModelingConfig(LanguageModelingConfig):
    stream_without_memory: bool = field(default=False, metadata={
        "help": "read the stream segment by segment but forget every segment before the next (the baseline of "
                "the same data without memory)"})


class StreamLanguageModelingTask(LanguageModelingTask):
    """``fluence_lm_stream`` (see the module docstring)."""

    def __init__(self, args, dictionary, output_dictionary=None, targets=None):
        super().__init__(args, dictionary, output_dictionary, targets)
        self.streams: Dict[str, torch.Tensor] = {}
        self.memories: Dict[str, StreamMemory] = {}
        self.models: List[torch.nn.Module] = []  # built by this task: eval-lm scores them with memory

    # ------------------------------------------------------------------------------------------------ model
    def build_model(self, args, from_checkpoint=False):
        model = super().build_model(args, from_checkpoint)
        check_streaming_model(model)
        self.models.append(model)
        return model

    # ------------------------------------------------------------------------------------------------- data
    def load_dataset(self, split: str, epoch=1, combine=False, **kwargs):
        paths = self.args.data.split(":")
        path = f"{paths[(epoch - 1) % len(paths)]}/{split}"
        lines = data_utils.load_indexed_dataset(path, self.dictionary, self.args.dataset_impl, combine=combine)
        if lines is None:
            raise FileNotFoundError(f"fluence_lm_stream: no binarised split {split!r} at {path}.bin/.idx")
        self.streams[split] = torch.cat([lines[i] for i in range(len(lines))]).long()
        self.datasets[split] = StreamSegments(self.streams[split], 1, self.args.tokens_per_sample, split,
                                              self.dictionary.pad())
        logger.info(f"{split}: one stream of {self.streams[split].numel():,} tokens")

    def get_batch_iterator(self, dataset, max_tokens=None, max_sentences=None, max_positions=None,
                           ignore_invalid_inputs=False, required_batch_size_multiple=1, seed=1, num_shards=1,
                           shard_id=0, num_workers=0, epoch=1, data_buffer_size=0, disable_iterator_cache=False,
                           skip_remainder_batch=False, grouped_shuffling=False, update_epoch_batch_itr=False):
        split = next((s for s, d in self.datasets.items() if d is dataset), None)
        if split is None:  # a dataset of prompts (fairseq-interactive, the hub): batched like any LM's
            return super().get_batch_iterator(
                dataset, max_tokens=max_tokens, max_sentences=max_sentences, max_positions=max_positions,
                ignore_invalid_inputs=ignore_invalid_inputs, required_batch_size_multiple=required_batch_size_multiple,
                seed=seed, num_shards=num_shards, shard_id=shard_id, num_workers=num_workers, epoch=epoch,
                data_buffer_size=data_buffer_size, disable_iterator_cache=disable_iterator_cache,
                skip_remainder_batch=skip_remainder_batch, grouped_shuffling=grouped_shuffling,
                update_epoch_batch_itr=update_epoch_batch_itr)
        if max_sentences is None:
            raise ValueError("fluence_lm_stream needs --batch-size (rows: parallel streams per rank); "
                             "--max-tokens alone cannot say how many")
        segments = StreamSegments(self.streams[split], max_sentences, self.args.tokens_per_sample, split,
                                  self.dictionary.pad(), num_shards=num_shards, shard_id=shard_id)
        # the rows are this rank's shard already: the iterator must not shard (or shuffle) the segments again
        return iterators.EpochBatchIterator(
            dataset=segments, collate_fn=segments.collater, batch_sampler=[[i] for i in range(len(segments))],
            seed=seed, num_shards=1, shard_id=0, num_workers=0, epoch=epoch, disable_shuffling=True,
        )

    # ----------------------------------------------------------------------------------------------- memory
    def memory(self, sample: Dict) -> Optional[StreamMemory]:
        """The memory of the sample's split, reset at the first segment of a pass; None for a sample that is not
        a stream segment (fairseq's dummy batches)."""
        if not sample or "segment" not in sample:
            return None
        memory = self.memories.setdefault(sample["split"], StreamMemory())
        if sample["segment"] == 0 or self.args.stream_without_memory:
            memory.reset()
        memory.fit_rows(sample["net_input"]["src_tokens"].size(0))
        return memory

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        memory = self.memory(sample)
        if memory is None:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        with memory.attached(model):
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        memory = self.memory(sample)
        if memory is None:
            return super().valid_step(sample, model, criterion)
        with memory.attached(model):
            return super().valid_step(sample, model, criterion)

    def eval_lm_dataloader(self, dataset, max_tokens=36000, batch_size=None, max_positions=None, num_shards=1,
                           shard_id=0, num_workers=1, data_buffer_size=10, context_window=0):
        if context_window:
            raise ValueError("fluence_lm_stream scores with memory: drop --context-window (the memory is the "
                             "context)")
        itr = self.get_batch_iterator(dataset, max_sentences=batch_size or 1, num_shards=num_shards,
                                      shard_id=shard_id).next_epoch_itr(shuffle=False)
        return _ScoredWithMemory(itr, self)


class _ScoredWithMemory:
    """The eval-lm batches, each scored with the memory of the ones before (attached to the task's models)."""

    def __init__(self, itr, task: StreamLanguageModelingTask):
        self.itr, self.task = itr, task

    def __len__(self):
        return len(self.itr)

    def __iter__(self):
        if not self.task.models:
            raise RuntimeError("fluence_lm_stream: the models to score were not built by this task")
        memories = {}
        for sample in self.itr:
            stack = []
            for index, model in enumerate(self.task.models):
                memory = memories.setdefault(index, StreamMemory())
                if sample["segment"] == 0 or self.task.args.stream_without_memory:
                    memory.reset()
                stack.append(memory.attached(model))
            for context in stack:
                context.__enter__()
            try:
                yield sample
            finally:
                for context in stack:
                    context.__exit__(None, None, None)


def check_streaming_model(model) -> None:
    """Refuse a model that cannot read a stream with memory, naming the flag that fixes it."""
    embed_positions = getattr(getattr(model, "decoder", None), "embed_positions", None)
    if embed_positions is not None:
        raise ValueError("fluence_lm_stream carries memory from one segment to the next, but the model has absolute "
                         "position embeddings, which restart at every segment: train it with "
                         "--no-token-positional-embeddings (and --attn-position-bias alibi where the attention "
                         "takes a relative bias)")
    attentions = streaming_attentions(model)
    if not attentions:
        raise ValueError(f"fluence_lm_stream needs a fluence language model (--arch fluence_transformer_lm or "
                         f"transformer_lm_<attention>), got {type(model).__name__}")
    for path, attn in attentions:
        if not attn.supports_memory:
            raise ValueError(f"{path}: {type(attn).__name__} cannot carry memory: {attn.memory_refusal}")
        if attn.unbounded_memory():
            raise ValueError(f"{path}: {type(attn).__name__}'s memory grows with the stream unless --mem-len N "
                             "bounds it (the keys, or compressed chunks, of the last N tokens); pass --mem-len "
                             "(e.g. the segment length or more)")
    blind = order_blind_attentions(attentions)
    if blind:
        logger.warning("fluence_lm_stream: the model has no position embeddings, and these attentions get no token "
                       "order either, so they see the prefix as a bag of tokens: " + "; ".join(blind))


def order_blind_attentions(attentions) -> List[str]:
    """Attentions of a model without absolute positions that cannot tell one earlier token's distance from
    another's: ALiBi-capable ones without ALiBi, and those whose state is a plain sum (position scheme "none")."""
    blind = []
    for path, attn in attentions:
        name = type(attn).__name__
        if attn.position_scheme == "alibi" and getattr(attn, "alibi_slopes", None) is None:
            blind.append(f"{path} ({name}: pass --attn-position-bias alibi)")
        elif attn.position_scheme == "none":
            blind.append(f"{path} ({name}: its state is order-free; use an attention with a relative bias or S4D)")
    return blind


if TASK_NAME not in TASK_REGISTRY:
    register_task(TASK_NAME, dataclass=StreamLanguageModelingConfig)(StreamLanguageModelingTask)
