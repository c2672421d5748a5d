"""Exact accounting of the activations a forward pass saves for backward.

`SavedActivations` installs saved-tensor hooks: every tensor autograd saves is seen once, and
its storage is counted once however many tensors share it. The bytes are read when asked, so
storages freed after they were saved (the recompute manager's) count for what they hold then.
Parameters (weights saved by matmuls) are not activations and are left out.
"""

from collections.abc import Iterable

import torch


class SavedActivations:
    """Context manager counting the storages saved for backward inside it."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self._excluded = {p.untyped_storage()._cdata for p in parameters}
        self._storages: dict[int, torch.UntypedStorage] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self._excluded:
            self._storages.setdefault(storage._cdata, storage)
        return tensor

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)

    @property
    def nbytes(self) -> int:
        """Bytes the saved storages hold now."""
        return sum(storage.nbytes() for storage in self._storages.values())
