"""moller_scg.models: the blog's CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moller_scg import GradientAccumulator
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
    # cost (lever 59's profile). MnistCNN hands it back as the activations are laid out.
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=memory_format)
    images = torch.rand(8, 1, 28, 28).contiguous(memory_format=memory_format)
    logits = model(images)
    layouts = []
    node = max_pool_backward_node(logits)
    node.register_prehook(lambda gradients: layouts.append(gradients[0].is_contiguous(memory_format=memory_format)))
    logits.sum().backward()
    assert layouts == [True]


class WithoutTheHook(MnistCNN):
    """MnistCNN as it was before its gradient hook (the reference of the tests below)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return pool_then_tanh_without_the_hook(self, images)


@pytest.mark.parametrize("hvp_method", ["double-backward", "forward-over-reverse", "gauss-newton"])
@pytest.mark.parametrize("batch_size, dtype", [(16, torch.float32), (1, torch.float32), (16, torch.float64)])
def test_the_hook_changes_no_number_of_the_accumulators_loss_gradient_or_curvature(hvp_method, batch_size, dtype):
    torch.manual_seed(0)
    images, labels = torch.rand(40, 1, 28, 28, dtype=dtype), torch.randint(0, 10, (40,))
    results = []
    for model_type in (MnistCNN, WithoutTheHook):
        torch.manual_seed(1)
        model = model_type().to(dtype).to(memory_format=torch.channels_last)
        accumulator = GradientAccumulator(
            model, nn.CrossEntropyLoss(), (images, labels), batch_size=batch_size, hvp_method=hvp_method
        )
        direction = [
            torch.randn(p.shape, dtype=dtype, generator=torch.Generator().manual_seed(2)) for p in model.parameters()
        ]
        loss = accumulator()
        gradient = [p.grad.clone() for p in model.parameters()]
        product = accumulator.hvp(direction)
        assert accumulator.hvp_method == hvp_method  # forward-over-reverse did not fall back to double backward
        results.append([loss, *gradient, *product])
    for with_hook, without in zip(*results):
        assert torch.equal(with_hook, without)


def test_the_hook_leaves_vmapped_transforms_working():
    # Per-sample gradients and Jacobians run the backward under torch.func.vmap, which refuses a channels_last
    # memory_format: the hook lays the gradient out through permute instead.
    torch.manual_seed(0)
    model = MnistCNN().to(memory_format=torch.channels_last)
    reference = WithoutTheHook().to(memory_format=torch.channels_last)
    reference.load_state_dict(model.state_dict())
    weights = {name: p.detach() for name, p in model.named_parameters()}
    images, labels = torch.rand(3, 1, 28, 28), torch.randint(0, 10, (3,))

    def per_sample_gradients(network: MnistCNN) -> dict[str, torch.Tensor]:
        def loss(w, image, label):
            logits = torch.func.functional_call(network, w, (image[None],))
            return nn.functional.cross_entropy(logits, label[None])

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(weights, images, labels)

    for name, value in per_sample_gradients(model).items():
        torch.testing.assert_close(value, per_sample_gradients(reference)[name], rtol=0, atol=0)
    jacobian = torch.func.jacrev(lambda w: torch.func.functional_call(model, w, (images,)))(weights)
    reference_jacobian = torch.func.jacrev(lambda w: torch.func.functional_call(reference, w, (images,)))(weights)
    for name in weights:
        assert torch.equal(jacobian[name], reference_jacobian[name])


@pytest.mark.parametrize("shape", [(4, 3, 28, 28), (4, 1568), (4, 2, 784), (49, 1, 32, 32)])
def test_a_batch_of_images_that_are_not_784_pixels_is_refused(shape):
    """reshape(-1, 1, 28, 28) would make other rows of them: 12 logits for 4 RGB images, say."""
    with pytest.raises(ValueError, match=r"784 pixels.*got a batch of shape"):
        MnistCNN()(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (4, 28, 28), (4, 784)])
def test_the_three_batch_shapes_give_one_row_of_logits_per_image(shape):
    assert MnistCNN()(torch.zeros(shape)).shape == (4, 10)


@pytest.mark.parametrize("shape", [(28, 28), (1, 28, 28), (784,)])
def test_one_unbatched_image_is_one_row_of_logits_as_before(shape):
    assert MnistCNN()(torch.zeros(shape)).shape == (1, 10)
