"""fluence_fairseq: adaptive, sparse and efficient attention for fairseq (``--user-dir fluence_fairseq``)."""
from . import compat

compat.install()

from .modules import *  # noqa: E402,F401,F403
from . import criterions, models  # noqa: E402,F401  (registers models, --arch names and criterions)
from .models import EfficientTransformerEncoder  # noqa: E402,F401
from .layerdrop import LayerDrop  # noqa: E402,F401

__version__ = "0.1.0"
