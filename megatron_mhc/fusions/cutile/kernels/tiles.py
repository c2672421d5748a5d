"""What the cuTile kernel files share: zero padding and fp32 by name, sigmoid, a scalar load."""

import cuda.tile as ct

ZERO = ct.PaddingMode.ZERO
F32 = ct.float32


@ct.function
def sigmoid(z):
    return 1.0 / (1.0 + ct.exp(-z))


@ct.function
def scalar(array, i):
    """array[i] as an fp32 0-d tile."""
    return ct.reshape(ct.astype(ct.load(array, (i,), (1,), padding_mode=ZERO), F32), ())
