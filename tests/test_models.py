"""moller_scg.models: the blog's CNN."""

from __future__ import annotations

import pytest
import torch

from moller_scg.models import MnistCNN


def tanh_then_pool(model: MnistCNN, images: torch.Tensor) -> torch.Tensor:
    """The blog's order: tanh on every output of the convolution, then max-pooling by 2."""
    x = torch.max_pool2d(torch.tanh(model.conv(images.reshape(-1, 1, 28, 28))), 2)
    return model.output(torch.tanh(model.hidden(x.flatten(1))))


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_pooling_before_the_tanh_is_the_blogs_network_and_gradient(dtype, rtol, memory_format):
    torch.manual_seed(0)
    model = MnistCNN().to(dtype).to(memory_format=memory_format)
    images, labels = torch.rand(64, 1, 28, 28, dtype=dtype), torch.randint(0, 10, (64,))
    losses, gradients = [], []
    for forward in (model, lambda x: tanh_then_pool(model, x)):
        loss = torch.nn.functional.cross_entropy(forward(images), labels)
        losses.append(loss)
        gradients.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[0], losses[1], rtol=rtol, atol=0.0)
    for pooled_first, blogs in zip(*gradients):
        torch.testing.assert_close(pooled_first, blogs, rtol=rtol, atol=rtol * float(blogs.abs().max()))
    assert model(images).shape == (64, 10) and model(images.reshape(64, 784)).shape == (64, 10)
