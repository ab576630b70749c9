"""Loads the compiled extension `mtdl_fast._C`, or records why it is absent.

Every entry point of `_C` has a pure-PyTorch twin; callers ask `ext()` and fall back when it is
None. The package warns once, at import, so a missing build is never silent.
"""
from __future__ import annotations

import warnings
from types import ModuleType

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

try:
    from mtdl_fast import _C as _compiled
    _import_error: Exception | None = None
except ImportError as err:  # not built, or built against another torch
    _compiled = None
    _import_error = err
    warnings.warn(
        f"mtdl_fast._C is not available ({err}); using the pure-PyTorch fallbacks. "
        "Build it with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def ext() -> ModuleType | None:
    """The compiled extension module, or None when it could not be imported."""
    return _compiled
