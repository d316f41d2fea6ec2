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


def pool_then_tanh_without_the_hook(model: MnistCNN, images: torch.Tensor) -> torch.Tensor:
    """MnistCNN's forward without the hook that lays the pooled activations' gradient out as channels_last."""
    x = torch.tanh(torch.max_pool2d(model.conv(images.reshape(-1, 1, 28, 28)), 2))
    return model.output(torch.tanh(model.hidden(x.flatten(1))))


def max_pool_backward_node(output: torch.Tensor) -> torch.autograd.graph.Node:
    """The max-pooling's node in the graph of ``output``."""
    pending, seen = [output.grad_fn], set()
    while pending:
        node = pending.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "MaxPool2D" in node.name():
            return node
        pending.extend(next_node for next_node, _ in node.next_functions)
    raise AssertionError("no max-pooling node in the graph")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_gradient_reaches_the_pooling_in_the_activations_layout(memory_format):
    # In channels_last, flatten brings the gradient back NCHW; the CPU's max-pooling backward then converted it at a
    # cost (lever 58's profile). MnistCNN hands it back as the activations are laid out.
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=memory_format)
    images = torch.rand(8, 1, 28, 28).contiguous(memory_format=memory_format)
    logits = model(images)
    layouts = []
    node = max_pool_backward_node(logits)
    node.register_prehook(lambda gradients: layouts.append(gradients[0].is_contiguous(memory_format=memory_format)))
    logits.sum().backward()
    assert layouts == [True]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_hook_changes_no_number_of_the_gradient_or_the_curvature_product(memory_format):
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=memory_format)
    images, labels = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    direction = [torch.randn_like(p) for p in model.parameters()]
    results = []
    for forward in (model, lambda x: pool_then_tanh_without_the_hook(model, x)):
        loss = torch.nn.functional.cross_entropy(forward(images), labels)
        gradient = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        product = torch.autograd.grad(gradient, list(model.parameters()), grad_outputs=direction)
        results.append([g.detach() for g in gradient] + list(product))
    for with_hook, without in zip(*results):
        assert torch.equal(with_hook, without)
