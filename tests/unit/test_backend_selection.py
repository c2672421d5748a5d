"""mhc_kernel_backend: `auto` and `torch` give the reference; a backend that cannot run here is
an error naming the field and the reason, never a silent fallback."""

import os

import pytest
import torch

from megatron_mhc.fusions import get_backend, reference


def test_auto_and_torch_are_the_reference():
    assert get_backend("auto") is reference
    assert get_backend("torch") is reference


@pytest.mark.skipif(
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="the Triton backend can run here",
)
def test_triton_without_gpu_or_interpreter_is_a_clear_error():
    with pytest.raises(ValueError, match=r"mhc_kernel_backend='triton' cannot run here \("):
        get_backend("triton")


def _cutile_runs_here():
    from megatron_mhc.fusions import cutile

    return cutile.is_available()


@pytest.mark.skipif(_cutile_runs_here(), reason="cuTile can run on this GPU")
def test_cutile_without_a_supported_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match=r"mhc_kernel_backend='cutile' cannot run here \(.+\)"):
        get_backend("cutile")


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match=r"'cuda' is not one of \('auto', 'torch'"):
        get_backend("cuda")
