"""Counting what stalls a GPU's queue: host transfers and reads of device values.

:class:`HostSyncs` records, inside its block, every tensor call that reads a value on the
host (``item``, ``tolist``, ``bool``/``int``/``float`` of a tensor), moves a tensor between
devices (``cpu``, ``numpy``, ``cuda``, ``to`` naming a device) or pins memory; on CUDA it
also counts the synchronizations PyTorch reports (``torch.cuda.set_sync_debug_mode``).
It works on CPU, where it catches the calls that would stall a GPU.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["HostSyncs"]

_READS = {"item", "tolist", "cpu", "numpy", "cuda", "pin_memory", "__bool__", "__int__", "__float__", "__index__"}


def _names_a_device(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    values = list(args[1:]) + list(kwargs.values())
    return any(isinstance(value, (torch.device, str)) or (isinstance(value, torch.Tensor) and value is not args[0])
               for value in values)


class HostSyncs(TorchFunctionMode):
    """Records host transfers and device reads made inside the block, in :attr:`calls`."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._warnings: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _READS or (name in ("to", "copy_") and _names_a_device(args, kwargs)):
            self.calls.append(name)
        return func(*args, **kwargs)

    def __enter__(self) -> "HostSyncs":
        if torch.cuda.is_available():
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if self._warnings is not None:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
            self.calls.extend(f"cuda sync: {w.message}" for w in self._caught if "synchroniz" in str(w.message))
