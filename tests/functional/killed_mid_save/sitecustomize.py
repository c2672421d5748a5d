"""A node failure in the middle of a checkpoint save, for tests/functional/test_optimizer_resume.py:
with this folder on PYTHONPATH and MHC_TEST_KILL_AT_SAVE=K, rank 0 of pretrain_gpt_mhc.py SIGKILLs
itself in its K-th torch_dist save, once every rank has written its data files and before the
index (`.metadata`) and Megatron's tracker file are written: the iteration directory is left
incomplete, as after a crash. The writer is patched when Megatron imports it (an import hook), so
that nothing is imported earlier than in a normal launch."""

import importlib.abc
import importlib.util
import os
import signal
import sys

_WRITER_MODULE = "megatron.core.dist_checkpointing.strategies.filesystem_async"
_KILL_AT_SAVE = int(os.environ.get("MHC_TEST_KILL_AT_SAVE", "0"))


def _die_in_finish(module) -> None:
    writer = module.FileSystemWriterAsync
    finish = writer.finish
    saves = 0

    def finish_or_die(self, metadata, results):
        nonlocal saves
        saves += 1
        if saves == _KILL_AT_SAVE:
            os.kill(os.getpid(), signal.SIGKILL)
        return finish(self, metadata, results)

    writer.finish = finish_or_die


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _WRITER_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            _die_in_finish(module)

        spec.loader.exec_module = exec_module
        return spec


if _KILL_AT_SAVE and os.environ.get("RANK") == "0":
    sys.meta_path.insert(0, _PatchOnImport())
