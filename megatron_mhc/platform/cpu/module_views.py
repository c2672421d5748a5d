"""How a CPU patch replaces ``torch`` (or ``torch.cuda``) as one Megatron module sees it.

Megatron calls ``torch.<name>`` / ``torch.cuda.<name>`` through the ``torch`` of its own module
namespace. Replacing that one name with a view of ``torch`` in which a few attributes differ
changes what that module calls, and nothing in torch or in any other module.
"""

import types

import torch

from megatron_mhc.megatron_patches import MegatronPatch


class _ModuleView(types.ModuleType):
    """A module (``torch`` or ``torch.cuda``) as one Megatron module sees it on CPU: the real
    module, except for the attributes set on the view."""

    def __init__(self, real: types.ModuleType):
        super().__init__(real.__name__)
        self._real = real

    def __getattr__(self, name):  # only called for names not set on the view
        return getattr(self._real, name)


def torch_views(what: str, module_names: tuple[str, ...]) -> tuple[MegatronPatch, ...]:
    """The patches, described as `what`, of the `torch` name of each of `module_names`."""
    return tuple(MegatronPatch(f"CPU platform: {what}", name, "torch") for name in module_names)


def override_torch_in(patch: MegatronPatch, cuda: dict | None = None, **torch_attrs) -> None:
    """In the Megatron module whose `torch` `patch` replaces, make `torch.<name>` resolve to
    `torch_attrs[name]` and `torch.cuda.<name>` to `cuda[name]`; every other name still resolves
    to torch's. Patches of the same module's `torch` add to one view."""
    module_torch = patch.original()
    view = module_torch if isinstance(module_torch, _ModuleView) else _ModuleView(torch)
    if cuda:
        if not isinstance(view.cuda, _ModuleView):
            view.cuda = _ModuleView(torch.cuda)
        vars(view.cuda).update(cuda)
    vars(view).update(torch_attrs)
    patch.replace(view)
