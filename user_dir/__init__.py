"""A fairseq ``--user-dir`` that registers everything fluence_fairseq offers.

``--user-dir`` takes a directory. ``--user-dir fluence_fairseq`` works when the package sits in site-packages (a
normal ``pip install``: fairseq also looks next to itself) or in the current directory (a checkout). It does not
work with an editable or ``src/``-layout install run from elsewhere, nor when you prefer an explicit path: then
pass ``--user-dir /path/to/this/user_dir``. fairseq imports this directory as the module ``user_dir``; it only
imports fluence_fairseq, whose import registers the models, ``--arch`` names, criterions, the checkpoint safe
globals and the numpy compatibility shim.

Keep the directory name unique in your process: fairseq refuses a ``--user-dir`` whose basename is already
imported from another place ("not globally unique"). Within one process pass either this directory or
``fluence_fairseq``, consistently.
"""
import os
import sys

try:
    import fluence_fairseq  # noqa: F401
except ImportError:
    # not installed: use the checkout this directory belongs to
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import fluence_fairseq  # noqa: F401
