"""U-Net: size algebra, the paper's layer table, overlap-tile equivariance, He init, checkpoints."""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from unet_pipe.errors import CheckpointError
from unet_pipe.model import (
    UNet,
    load_checkpoint,
    margin,
    model_from_checkpoint,
    nearest_valid_input_size,
    save_checkpoint,
    valid_input_size,
    valid_output_size,
)


# ----------------------------------------------------------------- size algebra

@pytest.mark.parametrize(
    ("input_size", "depth", "output_size"),
    [
        (572, 5, 388),  # the paper, Fig. 1
        (188, 5, 4),  # smallest depth-5 tile
        (44, 2, 28),  # 44 -4-> 40 -pool-> 20 -4-> 16 -up-> 32 -4-> 28
        (44, 3, 4),  # 44 -> 40 -> 20 -> 16 -> 8 -> 4 ; up 8 -> 4
        (5, 1, 1),  # depth 1 = two valid convolutions
        (18, 2, 2),
    ],
)
def test_valid_output_size_table(input_size: int, depth: int, output_size: int) -> None:
    assert valid_output_size(input_size, depth) == output_size
    assert valid_input_size(output_size, depth) == input_size
    assert (input_size - output_size) // 2 == margin(depth)


def test_margin_formula() -> None:
    assert [margin(d) for d in range(1, 7)] == [2, 8, 20, 44, 92, 188]


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5])
def test_valid_sizes_brute_force(depth: int) -> None:
    """The closed form agrees with simulating every layer, for every size up to 400."""

    def simulate(size: int) -> int | None:
        for level in range(depth):
            size -= 4
            if size < 1:
                return None
            if level < depth - 1:
                if size % 2:
                    return None
                size //= 2
        for _ in range(depth - 1):
            size = 2 * size - 4
            if size < 1:
                return None
        return size

    factor = 2 ** (depth - 1)
    valid = []
    for size in range(1, 401):
        expected = simulate(size)
        if expected is None:
            with pytest.raises(ValueError, match="not valid"):
                valid_output_size(size, depth)
        else:
            valid.append(size)
            assert valid_output_size(size, depth) == expected
            assert (size + 4) % factor == 0
            assert (expected - 4) % factor == 0
            assert valid_input_size(expected, depth) == size
    for size in range(valid[0], 401):
        assert nearest_valid_input_size(size, depth) == max(v for v in valid if v <= size)


def test_invalid_sizes_have_helpful_messages() -> None:
    with pytest.raises(ValueError, match="nearest valid sizes: 556 and 572"):
        valid_output_size(570, 5)
    with pytest.raises(ValueError, match="smallest valid size: 188"):
        valid_output_size(100, 5)
    with pytest.raises(ValueError, match="multiple of 16"):
        valid_input_size(390, 5)
    with pytest.raises(ValueError, match="smallest is 188"):
        nearest_valid_input_size(187, 5)
    with pytest.raises(ValueError, match="depth"):
        valid_output_size(572, 0)


# ------------------------------------------------------------------- the paper

def test_paper_network_layers_and_shape() -> None:
    """UNet() reproduces Fig. 1: 572 -> 388, 23 convolutions (18 3x3, 4 up, one 1x1)."""
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        net = UNet()
        out = net(torch.empty(1, 1, 572, 572))
    assert tuple(out.shape) == (1, 2, 388, 388)
    assert net.margin == 92
    assert net.arch == {
        "in_channels": 1, "n_classes": 2, "depth": 5, "base_channels": 64, "dims": 2, "dropout": 0.5,
    }
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    ups = [m for m in net.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) + len(ups) == 23
    assert sum(m.kernel_size == (3, 3) for m in convs) == 18
    assert sum(m.kernel_size == (1, 1) for m in convs) == 1
    assert len(ups) == 4 and all(m.kernel_size == (2, 2) and m.stride == (2, 2) for m in ups)
    # Channel table of Fig. 1: 64, 128, 256, 512, 1024 on the way down.
    assert [m.out_channels for m in convs[:10:2]] == [64, 128, 256, 512, 1024]
    assert [m.out_channels for m in ups] == [512, 256, 128, 64]
    # 31,030,658 = the commonly quoted parameter count of the original U-Net (1 -> 2 classes).
    assert sum(p.numel() for p in net.parameters()) == 31_030_658


def test_three_d_variant_shape() -> None:
    net = UNet(depth=2, base_channels=2, dims=3)
    out = net(torch.zeros(1, 1, 20, 20, 20))
    assert tuple(out.shape) == (1, 2, 4, 4, 4)
    assert sum(isinstance(m, nn.Conv3d) for m in net.modules()) == 7  # 4 down, 2 up, 1x1x1 head


def test_forward_rejects_invalid_input() -> None:
    net = UNet(depth=2, base_channels=2)
    with pytest.raises(ValueError, match="nearest valid sizes: 42 and 44"):
        net(torch.zeros(1, 1, 43, 44))
    with pytest.raises(ValueError, match="4-d tensor"):
        net(torch.zeros(1, 44, 44))


def test_overlap_tile_equivariance() -> None:
    """Valid convolutions: a sub-tile at an offset that is a multiple of 2**(depth-1)
    gives exactly the same logits as the corresponding window of the big tile."""
    torch.manual_seed(0)
    net = UNet(depth=3, base_channels=3).eval().double()
    x = torch.rand(1, 1, 60, 76, dtype=torch.float64)
    with torch.no_grad():
        full = net(x)  # 60 -> 20, 76 -> 36
        tile = net(x[:, :, 8:52, 16:60])  # 44 x 44 -> 4 x 4, offsets 8, 16 = multiples of 4
    assert tuple(full.shape) == (1, 2, 20, 36)
    torch.testing.assert_close(tile, full[:, :, 8:12, 16:20], rtol=0, atol=1e-12)


def test_skip_connection_is_centre_cropped() -> None:
    """With all weights fixed by hand, depth 2, one channel: the output is computable
    on paper. Convs = identity-at-centre kernels, up-conv = nearest upsampling."""
    net = UNet(in_channels=1, n_classes=1, depth=2, base_channels=1, dropout=0.0).double().eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.zero_()
                m.bias.zero_()
        for block in list(net.down) + list(net.up):
            for conv in (block[0], block[2]):
                conv.weight[:, :, 1, 1] = 0.0
                conv.weight[0, 0, 1, 1] = 1.0  # centre tap of the FIRST input channel
        net.up[0][0].weight[0, :, 1, 1] = torch.tensor([0.0, 1.0])  # keep the up-sampled path
        net.upconvs[0].weight.fill_(1.0)  # 2x nearest up-sampling
        net.head.weight.fill_(1.0)
        x = torch.arange(18 * 18, dtype=torch.float64).reshape(1, 1, 18, 18)
        out = net(x)
    # Up path: centre crop (18 -> 14), 2x2 max-pool, centre crop (7 -> 3), nearest-upsample (6), crop (6 -> 2).
    pooled = torch.nn.functional.max_pool2d(x[:, :, 2:16, 2:16], 2)[:, :, 2:5, 2:5]
    expected_up = pooled.repeat_interleave(2, 2).repeat_interleave(2, 3)[:, :, 2:4, 2:4]
    torch.testing.assert_close(out, expected_up, rtol=0, atol=0)
    # Skip path instead: the encoder map (14 x 14, centre of x) is cropped to the centre 6 x 6.
    with torch.no_grad():
        net.up[0][0].weight[0, :, 1, 1] = torch.tensor([1.0, 0.0])
        out = net(x)
    torch.testing.assert_close(out, x[:, :, 8:10, 8:10], rtol=0, atol=0)


def test_he_normal_init() -> None:
    torch.manual_seed(0)
    net = UNet(depth=3, base_channels=32)
    conv = net.down[2][2]  # 128 -> 128, N = 128 * 9
    std = conv.weight.std().item()
    assert std == pytest.approx(math.sqrt(2 / (128 * 9)), rel=0.02)
    up = net.upconvs[0]  # 128 -> 64 up-conv; each output unit sees 128 inputs
    assert up.weight.std().item() == pytest.approx(math.sqrt(2 / 128), rel=0.03)
    assert all(float(m.bias.detach().abs().max()) == 0.0 for m in net.modules() if hasattr(m, "bias") and m.bias is not None)


def test_same_seed_same_weights() -> None:
    torch.manual_seed(7)
    a = UNet(depth=2, base_channels=4)
    torch.manual_seed(7)
    b = UNet(depth=2, base_channels=4)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


# ----------------------------------------------------------------- checkpoints

def _tiny() -> UNet:
    torch.manual_seed(0)
    return UNet(depth=2, base_channels=4, dropout=0.0)


def test_checkpoint_round_trip(tmp_path) -> None:
    net = _tiny()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.99)
    x = torch.rand(1, 1, 44, 44)
    net(x).sum().backward()
    opt.step()
    rng = np.random.default_rng(3)
    path = save_checkpoint(
        tmp_path / "m" / "ckpt.pt", net, opt, step=5, config={"train": {"tile": 44}, "t": (1, 2)},
        extra={"numpy_rng": rng.bit_generator.state, "a": np.float32(1.5)},
    )
    # no temporary left behind (.unet-pipe holds the record that the checkpoint is ours)
    assert sorted(os.listdir(tmp_path / "m")) == [".unet-pipe", "ckpt.pt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any output, not 0600
    data = load_checkpoint(path)
    assert data["format"] == "unet-pipe-checkpoint" and data["version"] == 1
    assert data["step"] == 5 and data["config"] == {"train": {"tile": 44}, "t": [1, 2]}
    assert data["arch"] == net.arch
    restored_rng = np.random.default_rng()
    restored_rng.bit_generator.state = data["extra"]["numpy_rng"]
    assert restored_rng.integers(0, 2**62) == rng.integers(0, 2**62)
    assert data["extra"]["a"] == 1.5
    assert torch.equal(data["torch_rng_state"], torch.get_rng_state())
    model, _ = model_from_checkpoint(path)
    assert not model.training
    with torch.no_grad():
        torch.testing.assert_close(model(x), net.eval()(x), rtol=0, atol=0)
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.99)
    opt2.load_state_dict(data["optimizer_state"])
    buf = opt.state[next(iter(net.parameters()))]["momentum_buffer"]
    assert torch.equal(opt2.state[next(iter(model.parameters()))]["momentum_buffer"], buf)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless stand-in for os.system


def test_malicious_pickle_is_refused(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "unet-pipe-checkpoint", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not a unet-pipe checkpoint: refused to unpickle"):
        load_checkpoint(path)
    raw = tmp_path / "evil.pkl"
    raw.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match="not a unet-pipe checkpoint"):
        load_checkpoint(raw)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"hello, this is text", "not a unet-pipe checkpoint"),
        ({"state_dict": {}}, "no 'format: unet-pipe-checkpoint'"),
        ({"format": "unet-pipe-checkpoint", "version": 1}, "missing keys"),
        ({"format": "unet-pipe-checkpoint", "version": 9, "arch": {}, "model_state": {}}, "version 9"),
    ],
)
def test_foreign_files_are_refused(tmp_path, content, match) -> None:
    path = tmp_path / "x.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


def test_architecture_mismatch(tmp_path) -> None:
    path = save_checkpoint(tmp_path / "c.pt", _tiny())
    data = torch.load(path, weights_only=True)
    data["arch"]["base_channels"] = 8
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="do not match the recorded architecture"):
        model_from_checkpoint(path)
    data["arch"]["depth"] = -1
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="invalid architecture"):
        model_from_checkpoint(path)
