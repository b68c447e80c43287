"""The old import path of :mod:`alignloop.offline.dpo` (DPO moved under ``offline/`` with ILQL).

``alignloop.dpo`` IS that module (the same object in ``sys.modules``), so ``from alignloop.dpo import
train_dpo`` and patches applied through either name keep working.
"""

import importlib
import sys

sys.modules[__name__] = importlib.import_module("alignloop.offline.dpo")
