"""fluence_fairseq: adaptive, sparse and efficient attention for fairseq (``--user-dir fluence_fairseq``).

Importing the package registers its fairseq models, ``--arch`` names, criterions and the ``compute_attn_score``
task, and installs the documented compatibility fixes (:mod:`.compat`). Layout:

* :mod:`.ops`: the math, pure torch on ``(B, H, L, Dh)`` tensors (nothing from fairseq or the rest of the package);
* :mod:`.modules`: the attention base (the fairseq glue, written once) and one module per attention;
* :mod:`.models`, :mod:`.criterions`, :mod:`.tasks`: what fairseq registers;
* :mod:`.pruning`: attention pruning (patterns, policy, masks, flags, collection), weight and layer pruning;
* :mod:`.roles`: the three attention roles of a transformer, named once;
* :mod:`.layerdrop`, :mod:`.sampling`, :mod:`.hex`: the other Fluence utilities;
* :mod:`.cli`: the command-line tools.
"""
from . import compat

compat.install()

from . import modules  # noqa: E402  (registers the attentions)
from .modules import *  # noqa: E402,F401,F403
from . import criterions, models, tasks  # noqa: E402,F401  (registers models, --arch names, criterions, tasks)
from .layerdrop import LayerDrop  # noqa: E402
from .models import EfficientTransformerEncoder  # noqa: E402
from .roles import DECODER_CROSS, DECODER_SELF, ENCODER_SELF, ROLES, AttentionRole  # noqa: E402

__version__ = "0.2.0"

__all__ = list(modules.__all__) + [
    "EfficientTransformerEncoder", "LayerDrop",
    "AttentionRole", "ENCODER_SELF", "DECODER_SELF", "DECODER_CROSS", "ROLES",
]
