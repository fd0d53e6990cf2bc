"""Command-line tools (each also a console script, see ``setup.py``):

* ``fluence-help`` (:mod:`.help`): the plugin's architectures and flags;
* ``fluence-plot`` (:mod:`.plot`): learned spans, entmax alphas and densities, attention patterns;
* ``fluence-attn-score`` (:mod:`.attn_score`): average attention patterns for data-informed pruning;
* ``fluence-prune-layers`` (:mod:`.prune_layers`): keep some layers of a LayerDrop checkpoint;
* ``fluence-prune-weights`` (:mod:`.prune_weights`): magnitude/random/structured weight pruning;
* ``fluence-sample`` (:mod:`.sample`): importance sampling of a binarised training split;
* ``fluence-stream-bpc`` (:mod:`.stream_bpc`): a stream LM's bits per token by position in the segment, with and
  without its memory.
"""
