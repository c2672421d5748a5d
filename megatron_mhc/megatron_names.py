"""Megatron names replaced for the duration of one call.

Several Megatron-Core 0.19.2 constructors and helpers build a class they look up by name in their
module's namespace and offer no argument to choose another (GPTModel's decoder block, MTP block
and schedule plan, HybridModel's MTP block, megatron.training's MLA config class). The mHC model
classes point those names at their own classes while that call runs.
"""

import contextlib
import types


@contextlib.contextmanager
def names_in(module: types.ModuleType, **replacements):
    """`module.<name>` is `replacements[name]` inside the block, restored on any exit.

    Every name must exist in `module`: a Megatron version that renamed it fails here, loudly,
    instead of building Megatron's own class. Single-threaded use only (model construction).
    """
    missing = [name for name in replacements if not hasattr(module, name)]
    if missing:
        raise RuntimeError(
            f"megatron_mhc: {module.__name__} has no {missing}; megatron-mhc replaces these names "
            "in megatron-core 0.19.2 to build its mHC classes"
        )
    originals = {name: getattr(module, name) for name in replacements}
    for name, replacement in replacements.items():
        setattr(module, name, replacement)
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)
