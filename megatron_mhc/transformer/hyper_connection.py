"""Hyper-connection parameters and the calls into the mHC ops (`megatron_mhc.fusions`).

`HyperConnectionModule` wraps one residual sublayer (attention, MLA, MLP or MoE): it computes
the mappings from the n-stream state, collapses the streams into the sublayer input and writes
the sublayer output back into the streams. `HyperConnectionHead` is the learned contract of
DeepSeek-V4. Parameter layout, math and initialisation follow docs/math.md; the parameters are
fp32 whatever the activation dtype, and replicated across tensor-parallel ranks like a layer
norm's. `model_backend` gives both their ops: `mhc_kernel_backend=auto` checks the fused
backends against the reference (`megatron_mhc.fusions.auto_backend`) and times each that passed
on this module (`time_hc_module`), the timer the kernels cannot own without importing a layer.
"""

import copy
import functools
import math
import time
from types import ModuleType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_mhc.config import MHCTransformerConfig
from megatron_mhc.fusions import auto_backend
from megatron_mhc.fusions.save_inputs_only import SaveInputsOnly
from megatron_mhc.fusions.verification import CheckedShape
from megatron_mhc.transformer.high_priority_stream import HighPriorityStream
from megatron_mhc.transformer.recompute import HCRecomputePlan


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class _FP32ParamsModule(MegatronModule):
    """Keeps its own parameters in fp32 through `.half()`, `.bfloat16()` and Float16Module.

    The mappings are computed in fp32 (docs/math.md); casting fn/base/scale to bf16 would round the
    Sinkhorn logits and the gates before they are computed.
    """

    def _new_param(self, *shape: int) -> torch.nn.Parameter:
        device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
        param = torch.nn.Parameter(torch.empty(*shape, dtype=torch.float32, device=device))
        # Every tensor-parallel rank holds the whole parameter; with sequence parallelism each
        # rank sees other tokens, so Megatron must all-reduce these grads like a norm's.
        param.sequence_parallel = self.config.sequence_parallel
        return param

    def _apply(self, fn, recurse=True):
        # A cast to bf16 and back would keep the dtype but round the values (by up to 2.6e-3
        # for `base`): a parameter that `fn` makes low-precision gets its own fp32 values back,
        # on the device `fn` chose.
        fp32_values = {name: p.data for name, p in self._parameters.items() if p is not None}
        super()._apply(fn, recurse)
        for name, param in self._parameters.items():
            if param is not None and param.dtype != torch.float32:
                param.data = fp32_values[name].to(device=param.device)
        return self


class HCSublayerInput(NamedTuple):
    """What an HC module's forward gives its layer."""

    sublayer_input: torch.Tensor
    """u [..., C], the collapsed streams, in the dtype the sublayer computes in."""
    h_pre: torch.Tensor
    h_post: torch.Tensor
    comb: torch.Tensor
    """The mappings [..., n], [..., n], [..., n, n] (fp32)."""
    streams: torch.Tensor
    """The stream state to pass to `update`: the input itself. For `mhc` it comes out of the
    mappings op so that a fused backend gets the update's gradient of the streams back in its
    own backward and writes the streams' gradient once (`reference.mhc_mappings_collapse`)."""


class HyperConnectionModule(_FP32ParamsModule):
    """The hyper-connection around one sublayer.

    Args:
        config: the model config (n = `mhc_num_residual_streams`, C = `hidden_size`).
        hc_index: 0-based index of this module in the whole model, in forward order (one per
            residual sublayer); the `hc` types start stream `hc_index mod n` as this module's
            input.
        update_stream: a HighPriorityStream to run the update on (None: the caller's stream).
    """

    def __init__(
        self,
        config: MHCTransformerConfig,
        hc_index: int,
        update_stream: HighPriorityStream | None = None,
    ):
        super().__init__(config=config)
        self.update_stream = update_stream
        n, hidden = config.mhc_num_residual_streams, config.hidden_size
        self.num_streams = n
        self.mhc_type = config.mhc_type
        self.ops = model_backend(config)
        # Given by the stack at its construction when it recomputes its stream states.
        self.recompute_plan: HCRecomputePlan | None = None
        num_maps = n * n + 2 * n
        self.base = self._new_param(num_maps)
        if self.mhc_type != "hc_static":
            proj_in = n * hidden if self.mhc_type == "mhc" else hidden
            proj_out = num_maps if self.mhc_type == "mhc" else 2 + n
            self.fn = self._new_param(proj_out, proj_in)
            self.scale = self._new_param(3)
        self._initialize(hc_index)

    @torch.no_grad()
    def _initialize(self, hc_index: int):
        n, config = self.num_streams, self.config
        b_pre, b_post, b_res = self.base.split([n, n, n * n])
        if self.mhc_type == "mhc":
            self.base.zero_()
            if config.mhc_init == "identity":
                # H_pre = 1/n (+eps), H_post = 1, K uniform: the baseline function (docs/math.md).
                self.fn.zero_()
                b_pre.fill_(_logit(1.0 / n))
            elif config.perform_initialization:
                config.init_method(self.fn)
        else:
            # Hyper-connections (Zhu et al.): read stream (hc_index mod n), write every stream,
            # keep each stream (B_res = I); W = 0 so the mappings start static.
            b_pre.zero_()
            b_pre[hc_index % n] = 1.0
            b_post.fill_(1.0)
            b_res.copy_(torch.eye(n, dtype=torch.float32).flatten())
            if self.mhc_type == "hc":
                self.fn.zero_()
        if self.mhc_type != "hc_static":
            self.scale.fill_(config.mhc_init_gating_factor)

    def forward(self, streams: torch.Tensor) -> "HCSublayerInput":
        """The mappings of streams [..., n, C] and the sublayer input they give (a forward, so
        that diagnostics can observe the mappings with forward hooks)."""
        config = self.config
        if self.mhc_type == "mhc":
            op = functools.partial(
                self.ops.mhc_mappings_collapse,
                sinkhorn_iters=config.mhc_sinkhorn_iterations,
                eps=config.mhc_eps,
                norm_eps=config.mhc_norm_eps,
            )
            u, h_pre, h_post, comb, streams = self._call(
                op, streams, self.fn, self.base, self.scale
            )
        else:
            if self.mhc_type == "hc":
                op = functools.partial(self.ops.hc_mappings, norm_eps=config.mhc_norm_eps)
                h_pre, h_post, comb = self._call(op, streams, self.fn, self.base, self.scale)
            else:
                h_pre, h_post, comb = self.ops.hc_static_mappings(streams, self.base)
            u = self._call(self.ops.mhc_collapse, streams, h_pre)
        if config.fp32_residual_connection:
            u = u.to(config.params_dtype)  # the dtype the sublayer computes in
        return HCSublayerInput(u, h_pre, h_post, comb, streams)

    def _call(self, op, *inputs):
        """op(*inputs), saving only the inputs for backward when the backend relies on autograd
        (fused backends set SAVES_INPUTS_ONLY: their own backward already does so)."""
        if torch.is_grad_enabled() and not getattr(self.ops, "SAVES_INPUTS_ONLY", False):
            return SaveInputsOnly.apply(op, *inputs)
        return op(*inputs)

    def update(
        self,
        streams,
        output_with_bias,
        h_post,
        comb,
        dropout_p: float,
        use_update_stream: bool = True,
    ) -> torch.Tensor:
        """Megatron's bias-dropout-add with the residual add replaced by the stream mixing.

        The mixing runs on `update_stream` when there is one, unless `use_update_stream` is False:
        a caller that already runs on the stream it wants (the overlap's schedule node) says so.
        """
        y, bias = output_with_bias
        if bias is not None:
            y = y + bias
        if self.training and dropout_p > 0:
            y = F.dropout(y, p=dropout_p)
        update = functools.partial(self._call, self.ops.mhc_update)
        if self.update_stream is not None and use_update_stream:
            out = self.update_stream.run(update, streams, y, h_post, comb)
        else:
            out = update(streams, y, h_post, comb)
        if self.recompute_plan is not None:
            self.recompute_plan.record_update(self, streams, y, h_post, comb, out)
        return out

    def set_recompute_plan(self, plan: HCRecomputePlan) -> None:
        """This module's part in its stage's recompute, given once by the stack that holds it
        when the stack is constructed (the stage's layers, and so its blocks, are known only
        then)."""
        if self.recompute_plan is not None:
            raise RuntimeError(f"{type(self).__name__}: the recompute plan is given only once")
        self.recompute_plan = plan


class HyperConnectionHead(_FP32ParamsModule):
    """Learned contract of the n streams into one before the final norm (DeepSeek-V4 head)."""

    def __init__(self, config: MHCTransformerConfig):
        super().__init__(config=config)
        n, hidden = config.mhc_num_residual_streams, config.hidden_size
        self.ops = model_backend(config)
        self.fn = self._new_param(n, n * hidden)
        self.base = self._new_param(n)
        self.scale = self._new_param(1)
        with torch.no_grad():
            self.scale.fill_(config.mhc_init_gating_factor)
            if config.mhc_init == "identity":
                self.fn.zero_()
                self.base.fill_(_logit(1.0 / n))
            else:
                self.base.zero_()
                if config.perform_initialization:
                    config.init_method(self.fn)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        config = self.config
        return self.ops.mhc_head(
            streams, self.fn, self.base, self.scale, config.mhc_eps, config.mhc_norm_eps
        )


def model_backend(config: MHCTransformerConfig) -> ModuleType:
    """The module implementing the mHC ops of a model built from config: `get_backend`, with
    `auto` checked on this device once per process and shape (`auto_backend.select`)."""
    return auto_backend.select(config, timer=time_hc_module).module


def time_hc_module(
    config,
    ops: ModuleType,
    tokens: int,
    device: torch.device,
    gen: torch.Generator,
    repeats: int = auto_backend.TIMING_REPEATS,
) -> float:
    """Milliseconds of an HC module's forward, update and backward running `ops`, averaged over
    `repeats` after one warm-up (compilation); CUDA events on a GPU."""
    module_config = copy.copy(config)
    module_config.mhc_kernel_backend = "torch"  # built without a check of its own
    module = HyperConnectionModule(module_config, hc_index=0).to(device)
    module.ops = ops
    shape = CheckedShape.from_config(config)
    streams = torch.randn(tokens, shape.n, shape.hidden, generator=gen, device=device)
    streams = streams.to(shape.dtype).requires_grad_()
    grad = torch.randn(streams.shape, generator=gen, device=device).to(shape.dtype)

    def step():
        sub = module(streams)
        out = module.update(sub.streams, (sub.sublayer_input, None), sub.h_post, sub.comb, 0.0)
        out.backward(grad)

    step()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - begin) * 1e3 / repeats
