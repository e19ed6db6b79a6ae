"""The hand-written layers of cnn_from_scratch.py in float64: the reference layers against torch
autograd, every fast layer and the whole fast network against the reference, and finite
differences; then the optimizer, the schedule and --check-gradients.

References (F.conv2d, F.max_pool2d, F.linear, F.cross_entropy, torch.nn) are allowed here and
only here. Shapes are drawn at random per case; inputs are random, so every assertion compares
two independently computed values.
"""

from __future__ import annotations

import itertools
import random
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import cnn_from_scratch as cnn
from bench.cnn_vs_autograd import torch_nn_twin

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def layouts(x: torch.Tensor) -> list[torch.Tensor]:
    """The same values as contiguous NCHW and as channels-last (the layers accept both)."""
    return [x.contiguous(), x.contiguous(memory_format=torch.channels_last)]


def conv_cases(strides=(1, 2)) -> list[tuple]:
    """Kernel 1/3/5 x stride x padding 0/1/2, random non-square sizes and channels, plus
    rectangular kernels and mixed strides/paddings."""
    rng = random.Random(1234)
    cases = []
    for kernel, stride, padding in itertools.product((1, 3, 5), strides, (0, 1, 2)):
        batch = rng.choice((1, 2, 3))
        c_in, c_out = rng.choice((1, 2, 3, 8)), rng.choice((1, 4, 5))
        height = rng.randint(max(1, kernel - 2 * padding), 11)
        width = rng.randint(max(1, kernel - 2 * padding), 13)
        cases.append((batch, c_in, c_out, height, width, kernel, stride, padding))
    cases.append((1, 2, 3, 6, 10, (1, 5), (1, 3), (0, 2)))
    cases.append((2, 3, 4, 9, 7, (3, 1), (1, 2), (1, 0)))
    if 2 in strides:
        cases.append((2, 3, 4, 9, 7, (3, 1), (2, 1), (1, 0)))
    return cases


def conv_against_autograd(conv, x):
    out = conv.forward(x)
    grad_out = torch.randn_like(out)
    grad_in = conv.backward(grad_out)
    x_ref = x.clone().requires_grad_()
    weight = conv.params["weight"].clone().requires_grad_()
    bias = conv.params["bias"].clone().requires_grad_()
    out_ref = F.conv2d(x_ref, weight, bias, conv.stride, conv.padding)
    out_ref.backward(grad_out)
    assert out.shape == out_ref.shape
    torch.testing.assert_close(out, out_ref, **TOL)
    if conv.needs_input_grad:
        torch.testing.assert_close(grad_in, x_ref.grad, **TOL)
    else:
        assert grad_in is None
    torch.testing.assert_close(conv.grads["weight"], weight.grad, **TOL)
    torch.testing.assert_close(conv.grads["bias"], bias.grad, **TOL)
    assert conv.grads["weight"].shape == conv.params["weight"].shape


@pytest.mark.parametrize("batch,c_in,c_out,height,width,kernel,stride,padding", conv_cases())
def test_reference_conv2d_matches_autograd(
    batch, c_in, c_out, height, width, kernel, stride, padding
):
    torch.manual_seed(hash((batch, c_in, c_out, height, width)) % 2**31)
    conv = cnn.Conv2D(c_in, c_out, kernel, stride, padding, dtype=F64)
    conv.params["bias"].normal_()
    for x in layouts(torch.randn(batch, c_in, height, width, dtype=F64)):
        conv_against_autograd(conv, x)


def fast_against_reference(fast, reference, x, needs_input_grad=True):
    """Same weights, same input, same output gradient: the same output and gradients."""
    fast.params = {k: v.clone() for k, v in reference.params.items()}
    fast.needs_input_grad = reference.needs_input_grad = needs_input_grad
    out, out_ref = fast.forward(x), reference.forward(x)
    torch.testing.assert_close(out, out_ref, **TOL)
    grad_out = torch.randn_like(out_ref)
    grad_in, grad_in_ref = fast.backward(grad_out), reference.backward(grad_out)
    if needs_input_grad:
        torch.testing.assert_close(grad_in, grad_in_ref, **TOL)
    else:
        assert grad_in is None and grad_in_ref is None
    for name in ("weight", "bias"):
        torch.testing.assert_close(fast.grads[name], reference.grads[name], **TOL)
    return out


@pytest.mark.parametrize("batch,c_in,c_out,height,width,kernel,stride,padding", conv_cases())
def test_columns_conv2d_matches_reference(
    batch, c_in, c_out, height, width, kernel, stride, padding
):
    torch.manual_seed(hash((batch, c_in, height, width, "columns")) % 2**31)
    reference = cnn.Conv2D(c_in, c_out, kernel, stride, padding, dtype=F64)
    reference.params["bias"].normal_()
    fast = cnn.ColumnsConv2D(c_in, c_out, kernel, stride, padding, dtype=F64)
    for x in layouts(torch.randn(batch, c_in, height, width, dtype=F64)):
        for needs_input_grad in (True, False):
            out = fast_against_reference(fast, reference, x, needs_input_grad)
            assert out.is_contiguous(memory_format=torch.channels_last) or out.shape[1] == 1


@pytest.mark.parametrize(
    "batch,c_in,c_out,height,width,kernel,stride,padding", conv_cases(strides=(1, (1, 2), (1, 3)))
)
def test_kernel_rows_conv2d_matches_reference(
    batch, c_in, c_out, height, width, kernel, stride, padding
):
    """Vertical stride 1 (what kernel rows need), horizontal strides 1/2/3."""
    torch.manual_seed(hash((batch, c_in, height, width, "rows")) % 2**31)
    reference = cnn.Conv2D(c_in, c_out, kernel, stride, padding, dtype=F64)
    reference.params["bias"].normal_()
    fast = cnn.KernelRowsConv2D(c_in, c_out, kernel, stride, padding, dtype=F64)
    for x in layouts(torch.randn(batch, c_in, height, width, dtype=F64)):
        for needs_input_grad in (True, False):
            fast_against_reference(fast, reference, x, needs_input_grad)


def test_fast_layers_reuse_buffers_without_mixing_up_steps():
    """Two calls with different shapes, then the first shape again: buffers are reused only
    for the same shape, and nothing a layer returned is overwritten by its next call."""
    for fast_class in (cnn.ColumnsConv2D, cnn.KernelRowsConv2D):
        reference = cnn.Conv2D(3, 4, 3, padding=1, dtype=F64)
        fast = fast_class(3, 4, 3, padding=1, dtype=F64)
        first = torch.randn(2, 3, 7, 6, dtype=F64)
        out_first = fast_against_reference(fast, reference, first).clone()
        kept = fast.forward(first)
        fast_against_reference(fast, reference, torch.randn(3, 3, 5, 9, dtype=F64))
        fast.forward(first)
        torch.testing.assert_close(kept, out_first, **TOL)


def test_kernel_rows_need_vertical_stride_one_and_pool_shortcut_stride_one():
    with pytest.raises(ValueError, match="vertical stride of 1"):
        cnn.KernelRowsConv2D(1, 2, 3, stride=(2, 1)).forward(torch.randn(1, 1, 8, 8))
    conv = cnn.ColumnsConv2D(1, 2, 3, stride=2, dtype=F64)
    pool = cnn.FastMaxPool2D(2)
    pooled = pool.forward(conv.forward(torch.randn(1, 1, 9, 9, dtype=F64)))
    with pytest.raises(ValueError, match="stride-1"):
        conv.weight_grad_through_pool(pool, torch.ones_like(pooled))


def test_conv2d_float32_and_skipped_input_gradient():
    for conv_class in (cnn.Conv2D, cnn.ColumnsConv2D, cnn.KernelRowsConv2D):
        conv = conv_class(3, 4, 3, padding=1)
        x = torch.randn(2, 3, 9, 6)
        torch.testing.assert_close(
            conv.forward(x), F.conv2d(x, conv.params["weight"], conv.params["bias"], padding=1)
        )
        conv.needs_input_grad = False
        assert conv.backward(torch.randn(2, 4, 9, 6)) is None
        assert set(conv.grads) == {"weight", "bias"}


@pytest.mark.parametrize("conv_class", [cnn.Conv2D, cnn.ColumnsConv2D, cnn.KernelRowsConv2D])
def test_backward_overwrites_gradients(conv_class):
    conv = conv_class(2, 3, 3, dtype=F64)
    linear = cnn.Linear(5, 4, dtype=F64)
    x, v = torch.randn(1, 2, 5, 5, dtype=F64), torch.randn(3, 5, dtype=F64)
    for layer, inp in ((conv, x), (linear, v)):
        out = layer.forward(inp)
        grad = torch.randn_like(out)
        layer.backward(grad)
        first = {k: t.clone() for k, t in layer.grads.items()}
        layer.forward(inp)
        layer.backward(grad)
        for name in first:  # the same gradient again, not twice it
            torch.testing.assert_close(layer.grads[name], first[name], **TOL)


def pool_cases() -> list[tuple]:
    """Pools that tile the input, overlap, leave gaps, rectangular."""
    rng = random.Random(99)
    cases = []
    for kernel, stride in ((2, None), (2, 1), (3, None), (3, 2), (2, 3), ((2, 3), (1, 2))):
        batch, channels = rng.choice((1, 2, 4)), rng.choice((1, 3, 8))
        cases.append((batch, channels, rng.randint(4, 11), rng.randint(4, 13), kernel, stride))
    cases.append((2, 3, 8, 10, 2, None))  # tiles exactly: the fast backward skips zeroing
    return cases


@pytest.mark.parametrize("pool_class", [cnn.MaxPool2D, cnn.FastMaxPool2D])
@pytest.mark.parametrize("batch,channels,height,width,kernel,stride", pool_cases())
def test_maxpool2d_matches_autograd_without_ties(
    pool_class, batch, channels, height, width, kernel, stride
):
    # A permutation of distinct values: no ties, so the argmax is unambiguous.
    values = torch.randperm(batch * channels * height * width, dtype=F64) / 7.0
    for x in layouts(values.view(batch, channels, height, width)):
        pool = pool_class(kernel, stride)
        out = pool.forward(x)
        grad_out = torch.randn_like(out)
        grad_in = pool.backward(grad_out)
        x_ref = x.clone().requires_grad_()
        out_ref = F.max_pool2d(x_ref, kernel, stride)
        out_ref.backward(grad_out)
        torch.testing.assert_close(out, out_ref, **TOL)
        torch.testing.assert_close(grad_in, x_ref.grad, **TOL)


@pytest.mark.parametrize("pool_class", [cnn.MaxPool2D, cnn.FastMaxPool2D])
@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 1), (2, 1), (2, 3)])
def test_maxpool2d_ties_go_to_the_first_maximum_like_torch(pool_class, kernel, stride):
    # After a ReLU, whole windows of zeros are common: the gradient must go to one element.
    x = torch.randint(0, 3, (2, 3, 8, 9)).to(F64).contiguous(memory_format=torch.channels_last)
    pool = pool_class(kernel, stride)
    out = pool.forward(x)
    grad_out = torch.rand_like(out) + 0.5
    for grad in layouts(grad_out):  # a gradient in another layout than the masks, too
        grad_in = pool.backward(grad)
        x_ref = x.clone().requires_grad_()
        F.max_pool2d(x_ref, kernel, stride).backward(grad)
        torch.testing.assert_close(grad_in, x_ref.grad, **TOL)


@pytest.mark.parametrize(
    "window,first_maximum",
    [
        ([[1.0, 5.0], [5.0, 0.0]], (0, 1)),
        ([[0.0, 0.0, 5.0], [5.0, 0.0, 5.0], [0.0, 5.0, 0.0]], (0, 2)),
    ],
)
def test_fast_maxpool2d_ties_across_rows_go_to_the_first_in_row_order(window, first_maximum):
    # The fast pool takes each row's maximum first, then the rows': a tie between an earlier
    # row's later column and a later row's first column must still go to the earlier row.
    x = torch.tensor(window, dtype=F64).view(1, 1, len(window), len(window))
    pool = cnn.FastMaxPool2D(len(window))
    grad_in = pool.backward(torch.full_like(pool.forward(x), 2.0))
    expected = torch.zeros_like(x)
    expected[0, 0, first_maximum[0], first_maximum[1]] = 2.0
    torch.testing.assert_close(grad_in, expected, **TOL)
    x_ref = x.clone().requires_grad_()
    F.max_pool2d(x_ref, len(window)).backward(torch.full((1, 1, 1, 1), 2.0, dtype=F64))
    torch.testing.assert_close(grad_in, x_ref.grad, **TOL)


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), (2, 1)])
def test_relu_mask_on_the_pooled_grid_equals_relu_backward_after_pool_backward(kernel, stride):
    x = torch.randn(2, 4, 9, 8, dtype=F64)
    x[:, :, ::3] = 0.0  # some windows all zero after the ReLU: ties and the kink
    relu, pool = cnn.ReLU(), cnn.FastMaxPool2D(kernel, stride)
    reference_relu, reference_pool = cnn.ReLU(), cnn.MaxPool2D(kernel, stride)
    out = pool.forward(relu.forward(x))
    torch.testing.assert_close(out, reference_pool.forward(reference_relu.forward(x)), **TOL)
    grad_out = torch.randn_like(out)
    fused = pool.backward(pool.relu_mask(grad_out))
    torch.testing.assert_close(
        fused, reference_relu.backward(reference_pool.backward(grad_out)), **TOL
    )


def conv_pool_cases() -> list[tuple]:
    """Conv kernel 1/3/5 x padding 0/1/2 x pools that tile, overlap, leave gaps, rectangular."""
    rng = random.Random(4321)
    pools = ((2, None), (3, 2), (2, 1), (2, 3), ((2, 3), (1, 2)))
    cases = []
    for (kernel, padding), (pool_kernel, pool_stride) in itertools.product(
        ((1, 0), (3, 1), (3, 0), (5, 2)), pools
    ):
        batch, c_in, c_out = rng.choice((1, 2, 3)), rng.choice((1, 3)), rng.choice((2, 5))
        height, width = rng.randint(kernel + 3, 12), rng.randint(kernel + 3, 13)
        cases.append((batch, c_in, c_out, height, width, kernel, padding, pool_kernel, pool_stride))
    return cases


@pytest.mark.parametrize(
    "batch,c_in,c_out,height,width,kernel,padding,pool_kernel,pool_stride", conv_pool_cases()
)
def test_weight_grad_through_pool_matches_the_reference_layers(
    batch, c_in, c_out, height, width, kernel, padding, pool_kernel, pool_stride
):
    """The first block's fused step (conv -> ReLU -> max-pool, weight gradient straight from
    the pooled gradient) against Conv2D, ReLU, MaxPool2D backward one after the other."""
    torch.manual_seed(hash((batch, c_in, c_out, height, width, kernel)) % 2**31)
    reference = [
        cnn.Conv2D(c_in, c_out, kernel, padding=padding, dtype=F64),
        cnn.ReLU(),
        cnn.MaxPool2D(pool_kernel, pool_stride),
    ]
    reference[0].params["bias"].normal_()
    conv = cnn.ColumnsConv2D(c_in, c_out, kernel, padding=padding, dtype=F64)
    conv.params = {k: v.clone() for k, v in reference[0].params.items()}
    conv.needs_input_grad = reference[0].needs_input_grad = False
    pool = cnn.FastMaxPool2D(pool_kernel, pool_stride)
    for x in layouts(torch.randn(batch, c_in, height, width, dtype=F64)):
        pooled = pool.forward(cnn.ReLU(inplace=True).forward(conv.forward(x)))
        expected = x
        for layer in reference:
            expected = layer.forward(expected)
        torch.testing.assert_close(pooled, expected, **TOL)
        grad_pooled = torch.randn_like(pooled)
        conv.weight_grad_through_pool(pool, pool.relu_mask(grad_pooled))
        grad = grad_pooled
        for layer in reversed(reference):
            grad = layer.backward(grad)
        torch.testing.assert_close(conv.grads["weight"], reference[0].grads["weight"], **TOL)
        torch.testing.assert_close(conv.grads["bias"], reference[0].grads["bias"], **TOL)


def test_relu_flatten_linear_match_autograd():
    x = torch.randn(4, 3, 5, 6, dtype=F64)
    x[x.abs() < 1e-3] = 0.5  # keep away from the kink at 0
    relu, flatten, linear = cnn.ReLU(), cnn.Flatten(), cnn.Linear(90, 7, dtype=F64)
    linear.params["bias"].normal_()
    out = linear.forward(flatten.forward(relu.forward(x)))
    grad_out = torch.randn_like(out)
    grad_in = relu.backward(flatten.backward(linear.backward(grad_out)))

    x_ref = x.clone().requires_grad_()
    weight = linear.params["weight"].clone().requires_grad_()
    bias = linear.params["bias"].clone().requires_grad_()
    out_ref = F.linear(torch.relu(x_ref).flatten(1), weight, bias)
    out_ref.backward(grad_out)
    torch.testing.assert_close(out, out_ref, **TOL)
    torch.testing.assert_close(grad_in, x_ref.grad, **TOL)
    torch.testing.assert_close(linear.grads["weight"], weight.grad, **TOL)
    torch.testing.assert_close(linear.grads["bias"], bias.grad, **TOL)


@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_softmax_cross_entropy_matches_autograd_and_is_stable(scale):
    logits = torch.randn(9, 6, dtype=F64) * scale  # 1e3: exp() would overflow unstabilised
    targets = torch.randint(0, 6, (9,))
    loss_fn = cnn.SoftmaxCrossEntropy()
    loss = loss_fn.forward(logits, targets)
    grad = loss_fn.backward()
    logits_ref = logits.clone().requires_grad_()
    loss_ref = F.cross_entropy(logits_ref, targets)
    loss_ref.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, loss_ref, **TOL)
    torch.testing.assert_close(grad, logits_ref.grad, **TOL)


def directional_derivative(forward, x: torch.Tensor, direction: torch.Tensor, weights) -> float:
    """Central finite difference of sum(forward(x) * weights) along `direction`."""
    eps = 1e-6
    plus = (forward(x + eps * direction) * weights).sum()
    minus = (forward(x - eps * direction) * weights).sum()
    return float((plus - minus) / (2 * eps))


@pytest.mark.parametrize(
    "layer",
    [
        lambda: cnn.Conv2D(2, 3, 3, stride=2, padding=1, dtype=F64),
        lambda: cnn.Conv2D(3, 2, (1, 3), padding=(0, 2), dtype=F64),
        lambda: cnn.ColumnsConv2D(2, 3, 3, stride=2, padding=1, dtype=F64),
        lambda: cnn.KernelRowsConv2D(3, 2, (3, 2), stride=(1, 2), padding=(1, 2), dtype=F64),
        lambda: cnn.MaxPool2D(2),
        lambda: cnn.MaxPool2D(3, 2),
        lambda: cnn.FastMaxPool2D(3, 2),
        lambda: cnn.ReLU(),
    ],
)
def test_input_gradients_against_finite_differences(layer):
    torch.manual_seed(7)
    module = layer()
    x = (
        torch.randperm(2 * 3 * 7 * 8, dtype=F64).view(2, 3, 7, 8) / 50.0 - 1.505
    )  # never exactly 0 (the ReLU kink)
    if isinstance(module, cnn.Conv2D):
        x = x[:, : module.in_channels].contiguous()
    weights = torch.randn_like(module.forward(x))
    module.forward(x)
    grad_in = module.backward(weights)
    for _ in range(3):
        direction = torch.randn_like(x)
        numeric = directional_derivative(module.forward, x, direction, weights)
        analytic = float((grad_in * direction).sum())
        assert numeric == pytest.approx(analytic, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("conv_class", [cnn.Conv2D, cnn.ColumnsConv2D, cnn.KernelRowsConv2D])
def test_weight_gradients_against_finite_differences(conv_class):
    torch.manual_seed(3)
    conv = conv_class(2, 3, 3, padding=1, dtype=F64)
    x = torch.randn(2, 2, 5, 6, dtype=F64)
    weights = torch.randn_like(conv.forward(x))
    conv.backward(weights)
    grads = {name: grad.clone() for name, grad in conv.grads.items()}
    for name in ("weight", "bias"):
        original = conv.params[name]
        direction = torch.randn_like(original)

        def forward_with(value, name=name, original=original):
            conv.params[name] = value
            try:
                return conv.forward(x)
            finally:
                conv.params[name] = original

        numeric = directional_derivative(forward_with, original, direction, weights)
        analytic = float((grads[name] * direction).sum())
        assert numeric == pytest.approx(analytic, rel=1e-6)


def network_gradients(model, x, y) -> tuple[torch.Tensor, dict]:
    loss_fn = cnn.SoftmaxCrossEntropy()
    loss = loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    grads = {
        f"{i}.{k}": g.clone()
        for i, layer in model.trainable_layers()
        for k, g in layer.grads.items()
    }
    return loss, grads


@pytest.mark.parametrize("batch", [1, 5])
def test_reference_network_gradients_match_torch_nn_twin(batch):
    torch.manual_seed(batch)
    model = cnn.CNN(layers="reference", dtype=F64, generator=torch.Generator().manual_seed(batch))
    for _, layer in model.trainable_layers():
        layer.params["bias"].normal_(std=0.1)
    twin = torch_nn_twin(model)
    x = torch.randn(batch, 1, 28, 28, dtype=F64)
    y = torch.randint(0, 10, (batch,))
    loss, grads = network_gradients(model, x, y)
    loss_ref = F.cross_entropy(twin(x), y)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    for index, _ in model.trainable_layers():
        torch.testing.assert_close(grads[f"{index}.weight"], twin[index].weight.grad, **TOL)
        torch.testing.assert_close(grads[f"{index}.bias"], twin[index].bias.grad, **TOL)


@pytest.mark.parametrize("conv_kernels", cnn.CONV_KERNELS)
@pytest.mark.parametrize("batch,seed", [(1, 0), (4, 1), (7, 2)])
def test_fast_network_matches_the_reference_network(batch, seed, conv_kernels):
    """With either formulation of the second convolution (the run-time choice): same seed, same
    initial weights; then the same loss and every gradient, and the same weights after three
    SGD steps. Inputs with ReLU ties (zero images) included."""
    models = {
        kind: cnn.CNN(
            layers=kind,
            conv_kernels=conv_kernels,
            dtype=F64,
            generator=torch.Generator().manual_seed(seed),
        )
        for kind in cnn.LAYER_KINDS
    }
    second_conv = models["fast"].layers[3]
    expected = cnn.KernelRowsConv2D if conv_kernels == "kernel-rows" else cnn.ColumnsConv2D
    assert type(second_conv) is expected
    assert models["fast"].state_dict().keys() == models["reference"].state_dict().keys()
    for name, tensor in models["fast"].state_dict().items():
        assert torch.equal(tensor, models["reference"].state_dict()[name]), name
    optimizers = {kind: cnn.SGD(model, 0.1, 0.9, 5e-4) for kind, model in models.items()}
    generator = torch.Generator().manual_seed(100 + seed)
    for _ in range(3):
        x = torch.randn(batch, 1, 28, 28, generator=generator, dtype=F64)
        x[0, :, :10] = 0.0
        y = torch.randint(0, 10, (batch,), generator=generator)
        results = {kind: network_gradients(model, x, y) for kind, model in models.items()}
        torch.testing.assert_close(results["fast"][0], results["reference"][0], **TOL)
        for name, grad in results["reference"][1].items():
            torch.testing.assert_close(results["fast"][1][name], grad, **TOL)
        for optimizer in optimizers.values():
            optimizer.step()
    for name, tensor in models["reference"].state_dict().items():
        torch.testing.assert_close(models["fast"].state_dict()[name], tensor, **TOL)


def test_network_kind_is_checked():
    with pytest.raises(ValueError, match="layers must be one of"):
        cnn.CNN(layers="quick")
    with pytest.raises(ValueError, match="conv_kernels must be one of"):
        cnn.CNN(conv_kernels="winograd")


def test_gradients_are_keyed_like_parameters_and_are_the_last_backward():
    model = cnn.CNN(dtype=F64, generator=torch.Generator().manual_seed(0))
    loss_fn = cnn.SoftmaxCrossEntropy()
    x = torch.randn(3, 1, 28, 28, dtype=F64)
    loss_fn.forward(model.forward(x), torch.tensor([1, 2, 3]))
    model.backward(loss_fn.backward())
    params = model.parameters()
    grads = model.gradients()
    assert list(grads) == list(params)
    for key, grad in grads.items():
        assert grad.shape == params[key].shape and grad is not params[key]
        index = int(key.split(".")[1])
        assert grad is model.layers[index].grads[key.split(".")[2]]


def test_time_conv_kernels_times_both_and_leaves_the_global_random_state_alone():
    before = torch.random.get_rng_state()
    milliseconds = cnn.time_conv_kernels(8, torch.device("cpu"), repeats=1)
    assert set(milliseconds) == set(cnn.CONV_KERNELS)
    assert all(value > 0 for value in milliseconds.values())
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.5, 0.0)])
def test_sgd_matches_torch_optim(momentum, weight_decay):
    model = cnn.CNN(dtype=F64, generator=torch.Generator().manual_seed(0))
    twin = torch_nn_twin(model)
    optimizer = cnn.SGD(model, 0.1, momentum, weight_decay)
    reference = torch.optim.SGD(
        twin.parameters(), 0.1, momentum=momentum, weight_decay=weight_decay, nesterov=True
    )
    loss_fn = cnn.SoftmaxCrossEntropy()
    for step in range(3):
        x, y = torch.randn(4, 1, 28, 28, dtype=F64), torch.randint(0, 10, (4,))
        optimizer.lr = reference.param_groups[0]["lr"] = 0.1 / (step + 1)
        with torch.no_grad():
            loss_fn.forward(model.forward(x), y)
            model.backward(loss_fn.backward())
            optimizer.step()
        reference.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        reference.step()
    for index, layer in model.trainable_layers():
        torch.testing.assert_close(layer.params["weight"], twin[index].weight.detach(), **TOL)


@pytest.mark.parametrize("kind", cnn.LAYER_KINDS)
def test_training_never_builds_an_autograd_graph(kind, tmp_path):
    """Trace every executed line of the script during real training steps (grad mode left ON
    by the caller) and check that no local tensor requires grad or has a grad_fn."""
    model = cnn.CNN(layers=kind, generator=torch.Generator().manual_seed(0))
    optimizer = cnn.SGD(model, lr=0.05)
    images = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (96,))
    args = SimpleNamespace(batch_size=32, epochs=1, lr=0.05, warmup_epochs=0.5, seed=0)
    data = {"train": (images, labels), "val": (images[:10], labels[:10])}
    state = {"epoch": 0, "step_in_epoch": 0, "history": [], "lr_by_step": [], "train_time_s": 0}
    offences, lines_checked = [], [0]

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != cnn.__file__:
            return None
        if event == "line":
            lines_checked[0] += 1
            assert not torch.is_grad_enabled(), f"grad mode on at line {frame.f_lineno}"
            for name, value in frame.f_locals.items():
                if isinstance(value, torch.Tensor) and (value.requires_grad or value.grad_fn):
                    offences.append((frame.f_code.co_name, frame.f_lineno, name))
        return tracer

    stop = SimpleNamespace(received=None)
    assert torch.is_grad_enabled()
    sys.settrace(tracer)
    try:
        outcome = cnn.train(args, model, optimizer, data, state, stop, tmp_path)
    finally:
        sys.settrace(None)
    assert outcome == "done"
    assert lines_checked[0] > 500  # the tracer really saw the training loop and the layers
    assert not offences, offences


def test_learning_rate_schedule_warmup_then_cosine():
    values = [cnn.learning_rate(step, 100, 0.2, 10) for step in range(100)]
    assert values[0] == pytest.approx(0.02)
    assert values[9] == pytest.approx(0.2)  # the end of the warmup reaches the peak
    assert values[10] == pytest.approx(0.2)
    assert values[55] == pytest.approx(0.1)  # half-way through the cosine
    assert values[-1] < 1e-3
    assert all(a >= b for a, b in zip(values[9:], values[10:]))


def test_relu_in_place_matches_and_overwrites_its_input():
    x = torch.randn(3, 4, 5, 5, dtype=F64).contiguous(memory_format=torch.channels_last)
    grad_out = torch.randn_like(x)
    plain, in_place = cnn.ReLU(), cnn.ReLU(inplace=True)
    expected_out = plain.forward(x)
    expected_grad = plain.backward(grad_out)
    x_copy = x.clone()
    out = in_place.forward(x_copy)
    torch.testing.assert_close(out, expected_out, **TOL)
    torch.testing.assert_close(in_place.backward(grad_out), expected_grad, **TOL)
    assert out.data_ptr() == x_copy.data_ptr() and torch.equal(x_copy, expected_out)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_check_gradients_reports_every_layer_of_both_networks(capsys):
    assert cnn.main(["--check-gradients"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for kind in cnn.LAYER_KINDS:
        model = cnn.CNN(layers=kind)
        names = [f"{i} {type(layer).__name__}" for i, layer in enumerate(model.layers)]
        rows = [line.split() for line in lines if line.startswith(kind + " ")]
        assert [" ".join(row[1:-2]) for row in rows] == [*names, "whole network"]
        for row in rows:
            finite, autograd = float(row[-2]), float(row[-1])
            assert finite <= 1e-6 and autograd <= 1e-10
    assert lines[-1].startswith("all within the tolerances")


def test_check_gradients_fails_on_a_wrong_backward(monkeypatch, capsys):
    """A backward that is 1% off (in the fast second convolution) is caught: exit 1."""
    original = cnn.KernelRowsConv2D.backward

    def slightly_wrong(self, grad_out):
        grad_in = original(self, grad_out)
        self.grads["weight"] = self.grads["weight"] * 1.01
        return grad_in

    monkeypatch.setattr(cnn.KernelRowsConv2D, "backward", slightly_wrong)
    assert cnn.main(["--check-gradients"]) == cnn.FAILURE_EXIT_CODE
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("FAILED")
    bad = [
        line
        for line in lines
        if "KernelRowsConv2D" in line or line.split()[:2] == ["fast", "whole"]
    ]
    assert bad and all(float(line.split()[-2]) > 1e-3 for line in bad)
    reference = [line for line in lines if line.startswith("reference ")]
    assert reference and all(float(line.split()[-2]) <= 1e-6 for line in reference)
