"""On/off environment settings (STRATLM_COMPILE, STRATLM_KERNELS, STRATLM_BLAS, ...), read one way.
Imports nothing heavy: the BLAS preloader reads it before mlx.core is imported."""

from __future__ import annotations

import os

ON = ("on", "1", "yes", "true")
OFF = ("off", "0", "no", "false", "none")


def flag(name: str) -> bool | None:
    """True for on/1/yes/true, False for off/0/no/false/none (any case), None when unset or other."""
    value = os.environ.get(name, "").strip().lower()
    if value in ON:
        return True
    if value in OFF:
        return False
    return None
