"""Pipeline stages. Importing this package registers every built-in stage in ``STAGES``; a new
stage is one module here with a ``Config`` and a ``run`` plus one line below."""
from .base import STAGES, StageContext, StageOutput, StageSpec, register_stage  # noqa: F401
from . import train, prune, finetune, sparsify, export, benchmark  # noqa: F401,E402
from . import tensorrt  # noqa: F401,E402
from . import lottery  # noqa: F401,E402
from . import search  # noqa: F401,E402
