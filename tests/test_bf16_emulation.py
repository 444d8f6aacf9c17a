"""benchmarks/bf16_training: its emulation of bfloat16 autocast training, checked by hand and against autocast."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bf16_training  # noqa: E402


def test_values_bfloat16_holds_pass_exactly_and_others_are_rounded() -> None:
    conv = nn.Conv2d(1, 1, 1, bias=True)
    with torch.no_grad():
        conv.weight.fill_(3.0)
        conv.bias.fill_(1.0)
    x = torch.tensor([[[[2.0, -5.0]]]], requires_grad=True)
    with bf16_training.EmulatedBF16():
        y = conv(x)
        y.backward(torch.tensor([[[[1.0, 0.5]]]]))
    assert y.tolist() == [[[[7.0, -14.0]]]]  # small integers: exact in bfloat16
    assert x.grad.tolist() == [[[[3.0, 1.5]]]] and conv.weight.grad.item() == 2.0 * 1.0 - 5.0 * 0.5
    with bf16_training.EmulatedBF16():
        # 1 + 2^-10 is not a bfloat16 (8 significant bits): the input rounds to 1, so 3 * 1 + 1.
        assert conv(torch.tensor([[[[1.0 + 2.0**-10]]]])).item() == 4.0
        # 257 = 2^8 + 1 needs 9 bits: a product of bfloat16 values rounds back to bfloat16 (ties to even).
        conv.bias.data.fill_(0.0)
        conv.weight.data.fill_(1.0)
        assert conv(torch.tensor([[[[257.0]]]])).item() == 256.0
    assert conv(torch.tensor([[[[257.0]]]])).item() == 257.0  # float32 again outside the block


def test_transposed_convolutions_are_emulated_and_classes_restored_on_error() -> None:
    originals = (nn.Conv2d._conv_forward, nn.ConvTranspose2d.forward, nn.Conv3d._conv_forward)
    up = nn.ConvTranspose2d(1, 1, 2, stride=2, bias=False)
    with torch.no_grad():
        up.weight.fill_(1.0)
    with pytest.raises(RuntimeError, match="inside"):
        with bf16_training.EmulatedBF16():
            assert up(torch.full((1, 1, 1, 1), 1.0 + 2.0**-10)).tolist() == [[[[1.0, 1.0], [1.0, 1.0]]]]
            raise RuntimeError("inside")
    assert (nn.Conv2d._conv_forward, nn.ConvTranspose2d.forward, nn.Conv3d._conv_forward) == originals


def test_emulation_is_nearer_autocast_than_float32_is() -> None:
    """On a small U-Net: the emulation differs from float32 as much as real autocast does, and from
    autocast by less than autocast from float32 (the same rounding, only accumulation order apart)."""
    check = bf16_training.emulation_check(depth=2, base=8, tile=60)
    auto, emu, between = check["autocast_vs_float32"], check["emulated_vs_float32"], check["emulated_vs_autocast"]
    # the output, then the 8 weights of a depth-2 U-Net: 2 + 2 convolutions, the up-convolution, 2 + the 1 x 1
    assert len(auto) == len(emu) == len(between) == 1 + 8
    assert 0.5 * auto[0] < emu[0] < 2 * auto[0] and between[0] < auto[0]
    assert sum(between) < sum(auto) and 0.5 * sum(auto) < sum(emu) < 2 * sum(auto)
