"""Errors a user can fix: the command line prints their message (no traceback) and exits 2.

Raise :class:`UserError` (or a subclass) for bad input: a wrong path, a spec that cannot
work, a checkpoint from a missing plugin. Its message says what is wrong and what to do.
Anything else escaping a command is a bug and keeps its traceback. ``statelab --debug``
or ``STATELAB_DEBUG=1`` shows the traceback of user errors too.

This module imports nothing heavy, so plugins may subclass :class:`UserError` from their
cheap ``plugin.py`` modules.
"""

from __future__ import annotations

import sys

__all__ = ["UserError", "is_user_error"]


class UserError(Exception):
    """Bad input the user can fix; the message says how."""


#: Error classes of statelab modules that predate :class:`UserError`, by module. Only
#: modules already imported can have raised them, so looking them up costs nothing.
_KNOWN: dict[str, tuple[str, ...]] = {
    "statelab.data.base": ("DataError",),
    "statelab.tokenizers": ("TokenizerError",),
    "statelab.plugins": ("PluginError",),
    "statelab.train": ("RunLockedError", "ResumeError", "TrainingDiverged"),
}


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is bad input (see the module docstring), not a bug."""
    if isinstance(exc, UserError):
        return True
    for module_name, names in _KNOWN.items():
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None) if module is not None else None
            if isinstance(cls, type) and isinstance(exc, cls):
                return True
    return False
