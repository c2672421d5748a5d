"""megatron_mhc.platform.cpu: the tensor-parallel RNG tracker forks CPU generator states per
tensor-parallel rank; apply_cpu_platform is explicit and idempotent. (Megatron's schedules under
TP/PP on CPU: test_parallel_equivalence.py, the plain GPTModel included.)
"""

import torch

from tests.dist_utils import initialize_model_parallel, run_distributed, run_isolated


def _rng_tracker_draws(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    initialize_model_parallel(tp=2, pp=1, seed=1234)
    tracker = get_cuda_rng_tracker()
    before = torch.rand(4)
    with tracker.fork():
        forked = torch.rand(4)
        dropout = torch.nn.functional.dropout(torch.ones(64), p=0.5)
    with tracker.fork():  # continues the forked stream
        forked_again = torch.rand(4)
    after = torch.rand(4)
    return dict(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        before=before,
        forked=forked,
        dropout=dropout,
        forked_again=forked_again,
        after=after,
    )


def test_rng_tracker_forks_per_tensor_parallel_rank():
    draws = run_distributed(_rng_tracker_draws, 4)  # TP=2, DP=2
    # Outside a fork: the default generator, seeded with `seed` on every rank (as the CUDA
    # default generator is by model_parallel_cuda_manual_seed on GPU); a fork leaves it alone.
    expected = torch.rand(8, generator=torch.Generator().manual_seed(1234))
    for d in draws:
        torch.testing.assert_close(torch.cat([d["before"], d["after"]]), expected, rtol=0, atol=0)
    # Inside: the tensor-parallel stream, seeded with seed + 2718 + tp_rank: the same across
    # data-parallel replicas, different between tensor-parallel ranks, continued by each fork.
    for d in draws:
        with torch.random.fork_rng():
            torch.manual_seed(1234 + 2718 + d["tp_rank"])
            expected = dict(
                forked=torch.rand(4),
                dropout=torch.nn.functional.dropout(torch.ones(64), p=0.5),
                forked_again=torch.rand(4),
            )
        for key, value in expected.items():
            torch.testing.assert_close(d[key], value, rtol=0, atol=0, msg=key)
    by_tp_rank = {d["tp_rank"]: d["dropout"] for d in draws}
    assert not torch.equal(by_tp_rank[0], by_tp_rank[1])
    for d in draws:
        assert torch.equal(d["dropout"], by_tp_rank[d["tp_rank"]])


def _apply_twice(cuda_available):
    import megatron.core.pipeline_parallel.schedules as schedules
    import megatron.core.tensor_parallel.random as random

    from megatron_mhc.platform.cpu import apply_cpu_platform

    def patchable():
        cuda = (torch.cuda.current_device, torch.Tensor.cuda)
        return (*cuda, schedules.torch, random._set_cuda_rng_state)

    torch.cuda.is_available = lambda: cuda_available  # in this fresh process only
    at_import = patchable()
    untouched_at_import = schedules.torch is torch
    first = apply_cpu_platform()
    after_first = patchable()
    second = apply_cpu_platform()
    after_second = patchable()
    return dict(
        untouched_at_import=untouched_at_import,
        first=first,
        second=second,
        first_patched=[a is not b for a, b in zip(at_import, after_first, strict=True)],
        second_patched=[a is not b for a, b in zip(after_first, after_second, strict=True)],
    )


def test_apply_cpu_platform_is_explicit_and_idempotent():
    report = run_isolated(_apply_twice, False)
    assert report["untouched_at_import"]
    assert report["first"] is True and report["second"] is False
    assert all(report["first_patched"])
    assert not any(report["second_patched"])


def test_apply_cpu_platform_does_nothing_with_cuda():
    report = run_isolated(_apply_twice, True)
    assert report["first"] is False and report["second"] is False
    assert not any(report["first_patched"]) and not any(report["second_patched"])
