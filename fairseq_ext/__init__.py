"""fairseq_ext: a fairseq plugin for training and decoding beyond teacher-forced maximum likelihood.

Load it with ``--user-dir /path/to/fairseq_ext`` or, once installed, ``--user-dir fairseq_ext``
resolved to the package directory (see README).  Importing it registers every component below
and installs the checkpoint allowlist that torch >= 2.6 needs to load fairseq checkpoints safely, the
checkpoint guards (atomic copies, damaged-checkpoint and missing --restore-file errors) and a clean
exit on errors (fairseq_ext/modules/clean_exit.py).
"""
__version__ = "0.1.0"

from fairseq_ext.checkpoint_safety import install_checkpoint_allowlist, install_checkpoint_guards
from fairseq_ext.modules.clean_exit import install_clean_exit

install_checkpoint_allowlist()
install_checkpoint_guards()
install_clean_exit()

# Registering modules, one per line (fairseq auto-imports only models/ and tasks/ of a user dir).
from fairseq_ext.criterions import differentiable_ss  # noqa: E402,F401
from fairseq_ext.criterions import energy_kl_projection  # noqa: E402,F401
from fairseq_ext.criterions import energy_likelihood  # noqa: E402,F401
from fairseq_ext.criterions import energy_mlm  # noqa: E402,F401
from fairseq_ext.criterions import energy_pseudolikelihood  # noqa: E402,F401
from fairseq_ext.criterions import flowseq_loss  # noqa: E402,F401
from fairseq_ext.criterions import mgs  # noqa: E402,F401
from fairseq_ext.criterions import mrt  # noqa: E402,F401
from fairseq_ext.criterions import parallel_ss  # noqa: E402,F401
from fairseq_ext.criterions import policy_gradient  # noqa: E402,F401
from fairseq_ext.criterions import self_normalized_cross_entropy  # noqa: E402,F401
from fairseq_ext.criterions import sequential_ss  # noqa: E402,F401
from fairseq_ext.criterions import soft_beam_loss  # noqa: E402,F401
from fairseq_ext.models import energy_mlm  # noqa: E402,F401
from fairseq_ext.models import flowseq  # noqa: E402,F401
from fairseq_ext.models import seq2seq_tagger  # noqa: E402,F401
from fairseq_ext.scoring import span_f1  # noqa: E402,F401
from fairseq_ext.scoring import tag_accuracy  # noqa: E402,F401
from fairseq_ext.tasks import search_aware_translation  # noqa: E402,F401
from fairseq_ext.tasks import tagging  # noqa: E402,F401
from fairseq_ext.tasks import text_completion  # noqa: E402,F401
from fairseq_ext.tasks import translation_flowseq  # noqa: E402,F401
from fairseq_ext.tasks import translation_mh  # noqa: E402,F401
