"""The models of the examples and benchmarks."""

from __future__ import annotations

import math

import torch
from torch import nn


class MnistCNN(nn.Module):
    """The blog's MNIST network: one convolution of 32 filters, max-pooling by 2, 100 tanh units, a linear output.

    Layout (the blog's order): 1×28×28 → conv 5×5, 32 filters, tanh → max-pool 2 → 32×12×12 → fully connected 100,
    tanh → linear 10 (logits for ``nn.CrossEntropyLoss``). The blog does not give the kernel size; 5×5 is our choice.

    :meth:`forward` pools before the first tanh: tanh is increasing, so the maximum of the tanh of four numbers is the
    tanh of their maximum. The network is the same function with a quarter of the tanh evaluations; its gradient is
    the same but for float rounding and for which of two numbers with equal tanh the pooling picks. A gradient pass
    over the embedded digits, in channels_last, took 0.72–0.84× the time (``python benchmarks/mnist_cnn_passes.py``,
    docs/performance.md, lever 58).

    In channels_last, :meth:`forward` also hands the gradient of the pooled activations back in channels_last. Their
    ``flatten`` for the hidden layer copies them into the default (NCHW) order, so the gradient autograd brings back
    through it is NCHW. The CPU's max-pooling backward, given an NHWC input and an NCHW gradient, spent more time
    converting between the two layouts than pooling (two copies of the 128 × 32 × 24 × 24 gradient a batch, in a
    profile). A tensor hook (:func:`_gradient_as_channels_last`) lays the gradient out as the activations are, one
    copy of the smaller 12 × 12 maps: the same numbers bit for bit, in 0.78–0.95× a gradient pass's time (four
    runs of ``python benchmarks/mnist_cnn_passes.py``, docs/performance.md, lever 59).
    """

    def __init__(self, filters: int = 32, kernel_size: int = 5, hidden: int = 100, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, filters, kernel_size)
        side = (28 - kernel_size + 1) // 2
        self.hidden = nn.Linear(filters * side * side, hidden)
        self.output = nn.Linear(hidden, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of images shaped (B, 1, 28, 28), (B, 28, 28) or (B, 784).

        Raises:
            ValueError: a batch whose images are not 784 pixels each (the reshape would make other rows of them).
        """
        one_image = images.shape in ((28, 28), (1, 28, 28), (784,))  # unbatched, as before this check
        if not one_image and (images.dim() < 2 or math.prod(images.shape[1:]) != 28 * 28):
            raise ValueError(
                f"MnistCNN takes images of 28 × 28 = 784 pixels, shaped (B, 1, 28, 28), (B, 28, 28) or (B, 784); got "
                f"a batch of shape {tuple(images.shape)}"
            )
        x = images.reshape(-1, 1, 28, 28)
        x = torch.tanh(torch.max_pool2d(self.conv(x), 2))  # = max_pool2d(tanh(conv(x)), 2): tanh is increasing
        if x.requires_grad and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            x.register_hook(_gradient_as_channels_last)  # flatten's gradient comes back NCHW (class docstring)
        x = torch.tanh(self.hidden(x.flatten(1)))
        return self.output(x)


def _gradient_as_channels_last(gradient: torch.Tensor) -> torch.Tensor:
    """The gradient of :class:`MnistCNN`'s pooled activations laid out as they are, channels_last (the same numbers).

    Made NHWC-contiguous through ``permute`` rather than ``contiguous(memory_format=torch.channels_last)``: the same
    strides and bits, and ``torch.func.vmap`` (per-sample gradients, ``jacrev``, ``is_grads_batched``) takes it, where
    it refuses a channels_last ``memory_format``.
    """
    return gradient.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
