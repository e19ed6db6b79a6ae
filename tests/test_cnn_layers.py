"""Every hand-written layer of cnn_from_scratch.py against torch autograd, in float64.

References (F.conv2d, F.max_pool2d, F.linear, F.cross_entropy, torch.nn) are allowed here and
only here. Shapes are drawn at random per case; inputs are random, so every assertion compares
two independently computed values.
"""

from __future__ import annotations

import itertools
import random
import sys

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


def conv_cases() -> list[tuple]:
    """Kernel 1/3/5 x stride 1/2 x padding 0/1/2, random non-square sizes and channels."""
    rng = random.Random(1234)
    cases = []
    for kernel, stride, padding in itertools.product((1, 3, 5), (1, 2), (0, 1, 2)):
        batch = rng.choice((1, 2, 3))
        c_in, c_out = rng.choice((1, 2, 3, 8)), rng.choice((1, 4, 5))
        height = rng.randint(max(1, kernel - 2 * padding), 11)
        width = rng.randint(max(1, kernel - 2 * padding), 13)
        cases.append((batch, c_in, c_out, height, width, kernel, stride, padding))
    # Rectangular kernels and mixed strides/paddings too.
    cases.append((2, 3, 4, 9, 7, (3, 1), (2, 1), (1, 0)))
    cases.append((1, 2, 3, 6, 10, (1, 5), (1, 3), (0, 2)))
    return cases


@pytest.mark.parametrize("batch,c_in,c_out,height,width,kernel,stride,padding", conv_cases())
def test_conv2d_matches_autograd(batch, c_in, c_out, height, width, kernel, stride, padding):
    torch.manual_seed(hash((batch, c_in, c_out, height, width)) % 2**31)
    conv = cnn.Conv2D(c_in, c_out, kernel, stride, padding, dtype=F64)
    conv.params["bias"].normal_()
    for x in layouts(torch.randn(batch, c_in, height, width, dtype=F64)):
        out = conv.forward(x)
        grad_out = torch.randn_like(out)
        grad_in = conv.backward(grad_out)

        x_ref = x.clone().requires_grad_()
        weight = conv.params["weight"].clone().requires_grad_()
        bias = conv.params["bias"].clone().requires_grad_()
        out_ref = F.conv2d(x_ref, weight, bias, stride, padding)
        out_ref.backward(grad_out)

        assert out.shape == out_ref.shape
        torch.testing.assert_close(out, out_ref, **TOL)
        torch.testing.assert_close(grad_in, x_ref.grad, **TOL)
        torch.testing.assert_close(conv.grads["weight"], weight.grad, **TOL)
        torch.testing.assert_close(conv.grads["bias"], bias.grad, **TOL)
        assert conv.grads["weight"].shape == conv.params["weight"].shape


def test_conv2d_float32_and_skipped_input_gradient():
    conv = cnn.Conv2D(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 9, 6)
    torch.testing.assert_close(
        conv.forward(x), F.conv2d(x, conv.params["weight"], conv.params["bias"], padding=1)
    )
    conv.needs_input_grad = False
    assert conv.backward(torch.randn(2, 4, 9, 6)) is None
    assert set(conv.grads) == {"weight", "bias"}


def test_backward_overwrites_gradients():
    conv = cnn.Conv2D(2, 3, 3, dtype=F64)
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
    rng = random.Random(99)
    cases = []
    for kernel, stride in ((2, None), (2, 1), (3, None), (3, 2), (2, 3), ((2, 3), (1, 2))):
        batch, channels = rng.choice((1, 2, 4)), rng.choice((1, 3, 8))
        cases.append((batch, channels, rng.randint(4, 11), rng.randint(4, 13), kernel, stride))
    return cases


@pytest.mark.parametrize("batch,channels,height,width,kernel,stride", pool_cases())
def test_maxpool2d_matches_autograd_without_ties(batch, channels, height, width, kernel, stride):
    # A permutation of distinct values: no ties, so the argmax is unambiguous.
    values = torch.randperm(batch * channels * height * width, dtype=F64) / 7.0
    for x in layouts(values.view(batch, channels, height, width)):
        pool = cnn.MaxPool2D(kernel, stride)
        out = pool.forward(x)
        grad_out = torch.randn_like(out)
        grad_in = pool.backward(grad_out)
        x_ref = x.clone().requires_grad_()
        out_ref = F.max_pool2d(x_ref, kernel, stride)
        out_ref.backward(grad_out)
        torch.testing.assert_close(out, out_ref, **TOL)
        torch.testing.assert_close(grad_in, x_ref.grad, **TOL)


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 1), (2, 1)])
def test_maxpool2d_ties_go_to_the_first_maximum_like_torch(kernel, stride):
    # After a ReLU, whole windows of zeros are common: the gradient must go to one element.
    x = torch.randint(0, 3, (2, 3, 8, 9)).to(F64).contiguous(memory_format=torch.channels_last)
    pool = cnn.MaxPool2D(kernel, stride)
    out = pool.forward(x)
    grad_out = torch.rand_like(out) + 0.5
    grad_in = pool.backward(grad_out)
    x_ref = x.clone().requires_grad_()
    F.max_pool2d(x_ref, kernel, stride).backward(grad_out)
    torch.testing.assert_close(grad_in, x_ref.grad, **TOL)


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
def test_conv_weight_gradient_through_pool_matches_autograd(
    batch, c_in, c_out, height, width, kernel, padding, pool_kernel, pool_stride
):
    """The first layer's shortcut (conv -> ReLU -> max-pool, weight gradient straight from the
    pooled gradient) against conv2d -> relu -> max_pool2d in autograd."""
    torch.manual_seed(hash((batch, c_in, c_out, height, width, kernel)) % 2**31)
    conv = cnn.Conv2D(c_in, c_out, kernel, padding=padding, dtype=F64)
    conv.params["bias"].normal_()
    for x in layouts(torch.randn(batch, c_in, height, width, dtype=F64)):
        conv.needs_input_grad = False
        pool = cnn.MaxPool2D(pool_kernel, pool_stride)
        pooled = pool.forward(cnn.ReLU(inplace=True).forward(conv.forward(x)))
        grad_pooled = torch.randn_like(pooled)
        cnn.conv_weight_grad_through_pool(conv, pool, (pooled > 0) * grad_pooled)

        weight = conv.params["weight"].clone().requires_grad_()
        bias = conv.params["bias"].clone().requires_grad_()
        pooled_ref = F.max_pool2d(
            F.relu(F.conv2d(x, weight, bias, padding=padding)), pool_kernel, pool_stride
        )
        pooled_ref.backward(grad_pooled)
        torch.testing.assert_close(pooled, pooled_ref.detach(), **TOL)
        torch.testing.assert_close(conv.grads["weight"], weight.grad, **TOL)
        torch.testing.assert_close(conv.grads["bias"], bias.grad, **TOL)


def test_conv_weight_gradient_through_pool_needs_stride_one():
    conv = cnn.Conv2D(1, 2, 3, stride=2, dtype=F64)
    pool = cnn.MaxPool2D(2)
    pooled = pool.forward(conv.forward(torch.randn(1, 1, 9, 9, dtype=F64)))
    with pytest.raises(ValueError, match="stride-1"):
        cnn.conv_weight_grad_through_pool(conv, pool, torch.ones_like(pooled))


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
        lambda: cnn.MaxPool2D(2),
        lambda: cnn.MaxPool2D(3, 2),
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


def test_weight_gradients_against_finite_differences():
    torch.manual_seed(3)
    conv = cnn.Conv2D(2, 3, 3, padding=1, dtype=F64)
    x = torch.randn(2, 2, 5, 6, dtype=F64)
    weights = torch.randn_like(conv.forward(x))
    conv.backward(weights)
    for name in ("weight", "bias"):
        param = conv.params[name]
        direction = torch.randn_like(param)
        original = param.clone()

        def forward_with(value, name=name, original=original):
            conv.params[name] = value
            try:
                return conv.forward(x)
            finally:
                conv.params[name] = original

        numeric = directional_derivative(forward_with, original, direction, weights)
        analytic = float((conv.grads[name] * direction).sum())
        assert numeric == pytest.approx(analytic, rel=1e-6)


@pytest.mark.parametrize("batch", [1, 5])
def test_whole_network_gradients_match_torch_nn_twin(batch):
    torch.manual_seed(batch)
    model = cnn.CNN(dtype=F64, generator=torch.Generator().manual_seed(batch))
    for _, layer in model.trainable_layers():
        layer.params["bias"].normal_(std=0.1)
    twin = torch_nn_twin(model)
    x = torch.randn(batch, 1, 28, 28, dtype=F64)
    y = torch.randint(0, 10, (batch,))
    loss_fn = cnn.SoftmaxCrossEntropy()
    loss = loss_fn.forward(model.forward(x), y)
    model.backward(loss_fn.backward())
    loss_ref = F.cross_entropy(twin(x), y)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    for index, layer in model.trainable_layers():
        torch.testing.assert_close(layer.grads["weight"], twin[index].weight.grad, **TOL)
        torch.testing.assert_close(layer.grads["bias"], twin[index].bias.grad, **TOL)


@pytest.mark.parametrize("nesterov,momentum,weight_decay", [(True, 0.9, 5e-4), (False, 0.5, 0.0)])
def test_sgd_matches_torch_optim(nesterov, momentum, weight_decay):
    model = cnn.CNN(dtype=F64, generator=torch.Generator().manual_seed(0))
    twin = torch_nn_twin(model)
    optimizer = cnn.SGD(model, 0.1, momentum, weight_decay, nesterov=nesterov)
    reference = torch.optim.SGD(
        twin.parameters(), 0.1, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
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


def test_training_never_builds_an_autograd_graph(monkeypatch):
    """Trace every executed line of the script during real training steps (grad mode left ON
    by the caller) and check that no local tensor requires grad or has a grad_fn."""
    model = cnn.CNN(generator=torch.Generator().manual_seed(0))
    optimizer = cnn.SGD(model, lr=0.05)
    images = torch.randint(0, 256, (96, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (96,))
    args = type("Args", (), {"batch_size": 32, "epochs": 1, "lr": 0.05, "warmup_epochs": 0.5})
    args.seed = 0
    data = {"train": (images, labels), "val": (images[:10], labels[:10])}
    state = {"epoch": 0, "step_in_epoch": 0, "history": [], "train_time_s": 0.0}
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

    stop = cnn.StopSignal()
    assert torch.is_grad_enabled()
    sys.settrace(tracer)
    try:
        outcome = cnn.train(args, model, optimizer, data, state, lambda: None, stop, print)
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
