"""Python 2 names as CPython's unpickler rewrites them (``fix_imports``, protocol < 3).

``_pickle`` applies the mapping inside ``find_class`` when ``self.proto < 3``: first the
(module, name) pair table, else the module table. Using the stdlib's own tables keeps the walker
in step with whichever Python runs it.
"""

from __future__ import annotations

import _compat_pickle

_NAME_MAPPING: dict[tuple[str, str], tuple[str, str]] = dict(_compat_pickle.NAME_MAPPING)
_IMPORT_MAPPING: dict[str, str] = dict(_compat_pickle.IMPORT_MAPPING)


def map_name(module: str, name: str, proto: int) -> tuple[str, str]:
    """The (module, name) the loader imports for a raw pair read under protocol ``proto``."""
    if proto >= 3:
        return module, name
    pair = _NAME_MAPPING.get((module, name))
    if pair is not None:
        return pair
    return _IMPORT_MAPPING.get(module, module), name
