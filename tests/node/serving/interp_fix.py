"""Import before running Triton kernels under TRITON_INTERPRET=1 with numpy >= 2.4.

Triton 3.6's interpreter turns a scalar (a kernel's int argument, a loaded value) into a
one-element 1-d array and calls `int()` on it for `range()` bounds, which numpy 2.4 refuses
("only 0-dimensional arrays can be converted to Python scalars"). This patches that one conversion.
"""

from __future__ import annotations

from typing import Any

import numpy as np

try:
    import triton.runtime.interpreter as _interp
except ImportError:  # no Triton: nothing to patch
    _interp = None

if _interp is not None and hasattr(_interp, "_LangPatchScope"):
    _set_attr = _interp._LangPatchScope.set_attr

    def _set_attr_fixed(self: Any, obj: object, name: str, value: object) -> None:
        if name == "__index__":
            value = lambda t: int(np.asarray(t.handle.data).reshape(-1)[0])  # noqa: E731
        _set_attr(self, obj, name, value)

    _interp._LangPatchScope.set_attr = _set_attr_fixed
