"""The plain torch.nn networks: the tutorial's exact sizes and layers, Keras init and summary."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fashion_lightning import ConvNet, DenseNet, UserError, keras_init_, summary


def test_dense_baseline_has_the_tutorials_29898_parameters() -> None:
    net = DenseNet()
    assert [p.numel() for p in net.parameters()] == [3584, 128, 8192, 64, 17920, 10]
    assert sum(p.numel() for p in net.parameters()) == 29_898
    assert net(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_dense_applies_the_first_layers_to_each_row() -> None:
    torch.manual_seed(0)
    net = DenseNet()
    x = torch.rand(3, 1, 28, 28)
    row = F.relu(net.row2(F.relu(net.row1(x[1, 0, 7]))))  # image 1, row 7, through the two row layers
    hidden = F.relu(net.row2(F.relu(net.row1(x[:, 0]))))
    assert torch.allclose(hidden[1, 7], row, atol=1e-6)
    assert torch.allclose(net(x), net.out(hidden.reshape(3, 28 * 64)), atol=1e-6)


def test_cnn_has_the_tutorials_804554_parameters() -> None:
    net = ConvNet()
    assert [p.numel() for p in net.parameters()] == [288, 32, 802_816, 128, 1280, 10]
    assert sum(p.numel() for p in net.parameters()) == 804_554
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_cnn_is_conv_relu_pool_flatten_dense_relu_dense() -> None:
    torch.manual_seed(0)
    net = ConvNet()
    x = torch.rand(4, 1, 28, 28)
    h = F.max_pool2d(F.relu(F.conv2d(x, net.conv.weight, net.conv.bias, padding=1)), 2)
    expected = F.linear(F.relu(F.linear(h.flatten(1), net.fc.weight, net.fc.bias)), net.out.weight, net.out.bias)
    assert torch.allclose(net(x), expected, atol=1e-6)


@pytest.mark.parametrize("k", range(1, 8))
def test_every_kernel_size_keeps_the_6272_flatten(k: int) -> None:
    net = ConvNet(kernel_size=k)
    assert net.fc.in_features == 6272
    assert net.pool(net.conv(torch.rand(2, 1, 28, 28))).flatten(1).shape == (2, 6272)
    assert sum(p.numel() for p in net.parameters()) == 32 * k * k + 32 + 802_944 + 1290


@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_same_padding_matches_keras_for_even_and_odd_kernels(k: int) -> None:
    net = ConvNet(kernel_size=k)
    x = torch.rand(1, 1, 28, 28)
    before = (k - 1) // 2  # Keras/TensorFlow 'same': the extra pixel of an even kernel goes after
    expected = F.conv2d(F.pad(x, (before, k - 1 - before, before, k - 1 - before)), net.conv.weight, net.conv.bias)
    assert torch.allclose(net.conv(x), expected, atol=1e-6)


def test_keras_init_gives_zero_biases_and_glorot_bounds() -> None:
    torch.manual_seed(0)
    net = keras_init_(ConvNet())
    for layer, fan_in, fan_out in ((net.conv, 9, 32 * 9), (net.fc, 6272, 128), (net.out, 128, 10)):
        assert torch.count_nonzero(layer.bias) == 0
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = layer.weight.abs()
        assert w.max() <= bound and w.max() > 0.95 * bound  # uniform over the whole +-bound range
    default = ConvNet()
    assert torch.count_nonzero(default.fc.bias) > 0


@pytest.mark.parametrize(("kwargs", "name"), [({"kernel_size": 0}, "kernel_size"), ({"kernel_size": -3}, "kernel_size"),
                                              ({"kernel_size": 2.5}, "kernel_size"), ({"filters": 0}, "filters"),
                                              ({"hidden": 0}, "hidden")])
def test_bad_cnn_sizes(kwargs: dict, name: str) -> None:
    value = next(iter(kwargs.values()))
    with pytest.raises(UserError, match=f"model.{name} must be a positive integer, got {value!r}"):
        ConvNet(**kwargs)


def test_bad_dense_width() -> None:
    with pytest.raises(UserError, match="model.hidden1 must be a positive integer, got 0"):
        DenseNet(hidden1=0)


def test_summary_matches_the_tutorials_tables() -> None:
    cnn = summary(ConvNet())
    assert "conv (Conv2d)" in cnn and "(None, 32, 28, 28)" in cnn and "320" in cnn
    assert "pool (MaxPool2d)" in cnn and "(None, 32, 14, 14)" in cnn
    assert "(None, 6272)" in cnn and "802,944" in cnn and "1,290" in cnn
    assert "Total params: 804,554" in cnn
    dense = summary(DenseNet())
    for shape, params in (("(None, 28, 128)", "3,712"), ("(None, 28, 64)", "8,256"), ("(None, 1792)", "0"),
                          ("(None, 10)", "17,930")):
        assert any(shape in line and line.rstrip().endswith(params) for line in dense.splitlines())
    assert "Total params: 29,898" in dense
