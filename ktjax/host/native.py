"""Calls into the native module with its argument errors as ktjax errors."""
from __future__ import annotations

from typing import Any

from ktjax.errors import KernelError


def native_call(fn, *args: Any) -> Any:
    """fn(*args); the native layer's std::invalid_argument (a ValueError) becomes KernelError."""
    try:
        return fn(*args)
    except ValueError as e:
        raise KernelError(str(e)) from e
