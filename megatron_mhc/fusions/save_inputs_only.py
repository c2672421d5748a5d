"""`SaveInputsOnly`: an op that autograd differentiates, run keeping only its inputs for backward.

The HC modules run the reference ops in it and the fused backends their unfused `hc_mappings`:
backward reruns the op with grad from the saved inputs, so that nothing but the inputs stays
alive between forward and backward and the recompute manager can free and restore the stream
input.
"""

import torch


class SaveInputsOnly(torch.autograd.Function):
    """op(*inputs) keeping only the inputs for backward, where op is rerun with grad."""

    @staticmethod
    def forward(ctx, op, *inputs):
        ctx.op = op
        ctx.save_for_backward(*inputs)
        return op(*inputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        inputs = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
        with torch.enable_grad():
            outputs = ctx.op(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [
            (o, g)
            for o, g in zip(outputs, grad_outputs, strict=True)
            if g is not None and o.requires_grad
        ]
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(
            torch.autograd.grad(
                [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
            )
            if pairs and wanted
            else ()
        )
        return (None, *(next(grads) if t.requires_grad else None for t in inputs))
