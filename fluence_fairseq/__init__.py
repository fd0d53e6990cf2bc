"""fluence_fairseq: adaptive, sparse and efficient attention for fairseq (``--user-dir fluence_fairseq``)."""
from . import compat

compat.install()

from .modules import *  # noqa: E402,F401,F403
from . import criterions, models  # noqa: E402,F401  (registers models, --arch names and criterions)
from .models import EfficientTransformerEncoder  # noqa: E402,F401
from .layerdrop import LayerDrop  # noqa: E402,F401
from . import compute_attn_score  # noqa: E402,F401  (registers the compute_attn_score task)
from . import orthogonal  # noqa: E402,F401  (registers hex_classifier and its archs)

# ``python -m fluence_fairseq.compute_attn_score`` runs a module this package has already imported (to register its
# task); runpy warns about that, harmlessly: the command delegates to the imported copy.
import warnings as _warnings  # noqa: E402

_warnings.filterwarnings("ignore", category=RuntimeWarning,
                         message=r".*'fluence_fairseq\.compute_attn_score' found in sys\.modules.*")

__version__ = "0.1.0"
