"""Process-wide TensorFlow settings that only work before TensorFlow is imported.

oneDNN's fast 3D convolutions are on by default only on CPUs with AVX512-VNNI/BF16,
AVX-VNNI or AMX; elsewhere 3D convolutions run 4-5x slower without them. TensorFlow reads
``TF_ENABLE_ONEDNN_OPTS`` once, at import, so segnet sets it here, in the package's first
import, and records whether the user had already chosen, so the choice can be logged later.
"""

from __future__ import annotations

import logging
import os
import sys

ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"

_user_choice = os.environ.get(ONEDNN_VAR)
_tf_already_imported = "tensorflow" in sys.modules
if _user_choice is None:
    os.environ[ONEDNN_VAR] = "1"
# TensorFlow's C++ start-up chatter (CUDA probing on CPU-only machines) drowns our one-line
# messages; the user can still raise it by setting the variable themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def onednn_status() -> str:
    """One sentence saying whether oneDNN is on and who decided."""
    if _tf_already_imported and _user_choice is None:
        return (
            f"oneDNN: unknown, TensorFlow was imported before segnet, so {ONEDNN_VAR}=1 came "
            "too late; import segnet first or export the variable"
        )
    if _user_choice is not None:
        return f"oneDNN: {ONEDNN_VAR}={_user_choice} (set by the user)"
    return f"oneDNN: enabled by segnet ({ONEDNN_VAR}=1)"


def log_onednn_status(logger: logging.Logger | None = None) -> None:
    (logger or logging.getLogger("segnet")).info(onednn_status())
