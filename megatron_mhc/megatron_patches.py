"""The one way megatron-mhc replaces a name in Megatron (or in torch, for Megatron's sake).

Where megatron-core 0.19.2 offers no argument, hook or config field for what megatron-mhc needs,
megatron-mhc replaces a name that Megatron looks up in a module's namespace or on a class
(docs/megatron_patches.md lists every such patch, why, and what would remove it). A patch written
for one Megatron version can silently do nothing or break a later call in another: the name may
have moved, or the function may take other parameters. A :class:`MegatronPatch` therefore
checks, before it replaces anything, that

* megatron-core is a version the patches are written for (:data:`SUPPORTED_MEGATRON_CORE`),
* the name exists where the patch replaces it,
* a replaced function takes the parameters the replacement relies on (``inspect.signature``),

and raises :class:`MegatronPatchError` naming the patch, the name and the versions when not.
Replacements that read the replaced function's arguments bind them by name with
:meth:`MegatronPatch.bind`, never by position.
"""

import contextlib
import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any

from packaging.version import Version

__all__ = [
    "SUPPORTED_MEGATRON_CORE",
    "MegatronPatch",
    "MegatronPatchError",
    "check_patches",
    "megatron_core_version",
]

# The megatron-core releases every patch was written and tested against.
SUPPORTED_MEGATRON_CORE = ("0.19.2",)


class MegatronPatchError(RuntimeError):
    """A patch does not fit the installed Megatron (version, name or signature)."""


def megatron_core_version() -> str:
    """The installed megatron-core release, without a local build suffix ('0.19.2+abc' -> ...)."""
    import megatron.core

    return Version(megatron.core.__version__).public


@dataclasses.dataclass(frozen=True)
class MegatronPatch:
    """The replacement of `owner.name`, described as `patch`.

    Args:
        patch: what the patch does, as errors name it ("CPU platform: ...").
        owner: the import path of the module holding the name, or "module:Class" for a class
            attribute.
        name: the replaced name.
        parameters: parameters the replaced callable must take, by name; None when the name is
            not a function whose arguments the replacement passes or reads (a module, a class).
    """

    patch: str
    owner: str
    name: str
    parameters: tuple[str, ...] | None = None

    @property
    def target(self) -> str:
        return f"{self.owner.replace(':', '.')}.{self.name}"

    def error(self, problem: str) -> MegatronPatchError:
        return MegatronPatchError(
            f"megatron-mhc patch '{self.patch}' cannot replace {self.target}: {problem} "
            f"(megatron-core {megatron_core_version()} installed; the patch is written for "
            f"megatron-core {', '.join(SUPPORTED_MEGATRON_CORE)})"
        )

    def owner_object(self) -> Any:
        module_name, _, class_name = self.owner.partition(":")
        try:
            owner = importlib.import_module(module_name)
        except ImportError as err:
            raise self.error(f"module {module_name} does not import ({err})") from err
        if class_name:
            if not hasattr(owner, class_name):
                raise self.error(f"{module_name} has no {class_name!r}")
            owner = getattr(owner, class_name)
        return owner

    def check(self) -> None:
        """Raise MegatronPatchError unless the installed Megatron is one this patch fits."""
        if megatron_core_version() not in SUPPORTED_MEGATRON_CORE:
            raise self.error("unsupported megatron-core version")
        owner = self.owner_object()
        if not hasattr(owner, self.name):
            raise self.error(f"{self.owner.replace(':', '.')} has no {self.name!r}")
        if self.parameters is None:
            return
        original = getattr(owner, self.name)
        try:
            signature = inspect.signature(original)
        except (TypeError, ValueError) as err:
            raise self.error(f"it has no inspectable signature ({err})") from err
        missing = [name for name in self.parameters if name not in signature.parameters]
        if missing:
            raise self.error(
                f"its signature {signature} lacks the parameter(s) {', '.join(missing)}"
            )

    def original(self) -> Any:
        """The current value of the name, after `check`."""
        self.check()
        return getattr(self.owner_object(), self.name)

    def replace(self, replacement: Any) -> None:
        """Set the name to `replacement`, after `check`."""
        self.check()
        setattr(self.owner_object(), self.name, replacement)

    def wrap(self, make_replacement: Callable[[Any], Any]) -> None:
        """Set the name to `make_replacement(original)`, after `check`."""
        self.replace(make_replacement(self.original()))

    @contextlib.contextmanager
    def replaced(self, replacement: Any):
        """The name is `replacement` inside the block, restored on any exit (single-threaded
        use: model construction)."""
        original = self.original()
        owner = self.owner_object()
        setattr(owner, self.name, replacement)
        try:
            yield
        finally:
            setattr(owner, self.name, original)

    @staticmethod
    def bind(function: Callable, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The arguments of a call `function(*args, **kwargs)`, by parameter name (defaults
        included)."""
        bound = inspect.signature(function).bind(*args, **kwargs)
        bound.apply_defaults()
        return bound.arguments


def check_patches(patches: Iterable[MegatronPatch]) -> None:
    """Check every patch of a concern before any is installed: either all fit or none is made."""
    for patch in patches:
        patch.check()
