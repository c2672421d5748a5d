"""Megatron names replaced for the duration of one call.

Several Megatron-Core 0.19.2 constructors and helpers build a class they look up by name in their
module's namespace and offer no argument to choose another (GPTModel's decoder block, MTP block
and schedule plan, HybridModel's MTP block, megatron.training's MLA config class). The mHC model
classes point those names at their own classes, subclasses of Megatron's, while that call runs.
"""

import contextlib
import types

from megatron_mhc.megatron_patches import MegatronPatch, check_patches


@contextlib.contextmanager
def names_in(module: types.ModuleType, **replacements: type):
    """`module.<name>` is `replacements[name]` inside the block, restored on any exit.

    Each swap is a MegatronPatch: a megatron-core version the swaps are not written for, a name
    Megatron no longer has, or a replacement that is not a subclass of the class it replaces
    raises MegatronPatchError before any name is swapped. Single-threaded use only (model
    construction).
    """
    patches = {
        name: MegatronPatch(
            f"mHC class {replacement.__name__} in place of {name}", module.__name__, name
        )
        for name, replacement in replacements.items()
    }
    check_patches(patches.values())
    for name, patch in patches.items():
        original = patch.original()
        if not (isinstance(original, type) and issubclass(replacements[name], original)):
            raise patch.error(f"{replacements[name].__name__} does not subclass {original!r}")
    with contextlib.ExitStack() as swapped:
        for name, patch in patches.items():
            swapped.enter_context(patch.replaced(replacements[name]))
        yield
