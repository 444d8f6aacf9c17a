"""The U-Net of Ronneberger et al. (2015), its valid-size algebra and checkpoints.

Architecture (paper, Fig. 1): every level has two unpadded ("valid") 3×3
convolutions with ReLU; the contracting path halves the size with 2×2 max-pool
stride 2 and doubles the channels; the expansive path doubles the size with a
2×2 up-convolution (transposed convolution, stride 2) that halves the
channels, concatenates the centre-cropped feature map of the same level and
applies two 3×3 convolutions; a 1×1 convolution maps to ``n_classes`` logits.
Dropout sits at the end of the contracting path (on the bottom level's
output).  Weights are He-normal, std √(2/N) with N the number of inputs of one
output unit; biases start at zero.

``dims=3`` gives the 3D U-Net variant (Çiçek et al. 2016 without batch norm):
the same network with 3×3×3 kernels and 2×2×2 pooling, for isotropic voxels.

Sizes.  With ``L = depth - 1`` poolings and ``b`` the edge at the bottom level,

    input  = 2**L * (b + 8) - 4
    output = 2**L * (b - 4) + 4
    margin = (input - output) / 2 = 6 * 2**L - 4      (92 for depth 5)

so a size is a valid input iff ``(input + 4) % 2**L == 0`` and every
intermediate size stays positive; a valid output satisfies
``(output - 4) % 2**L == 0``.  The paper's 572 × 572 tile gives 388 × 388.
"""
from __future__ import annotations

import math
import os
import pickle
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# This module is the architecture source of exported bioimage.io packages
# (unet_pipe.bioimageio_export), loaded there without unet-pipe installed: its
# top level imports only torch and numpy; the checkpoint functions import the
# project's modules when called.

CHECKPOINT_FORMAT = "unet-pipe-checkpoint"
CHECKPOINT_VERSION = 1
_REQUIRED_KEYS = ("format", "version", "arch", "model_state")
# The paper's network in float32 with SGD momentum is ~250 MB; 8 GiB leaves room for far bigger nets.
MAX_CHECKPOINT_BYTES = 8 * 2**30


# ---------------------------------------------------------------------------
# Valid-size algebra (per axis; the same for every spatial axis and for 3D)
# ---------------------------------------------------------------------------

def _check_depth(depth: int) -> int:
    if not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")
    return int(depth)


def _level_sizes(input_size: int, depth: int) -> list[int] | None:
    """Sizes after each step of the network, or None if some step is impossible."""
    size = int(input_size)
    sizes = []
    for level in range(depth):
        size -= 4                      # two valid 3×3 convolutions
        sizes.append(size)
        if size < 1:
            return None
        if level < depth - 1:
            if size % 2:               # 2×2 pooling needs an even size
                return None
            size //= 2
    for _ in range(depth - 1):
        size = 2 * size - 4            # up-convolution, then two valid convolutions
        sizes.append(size)
        if size < 1:
            return None
    return sizes


def valid_output_size(input_size: int, depth: int) -> int:
    """Output edge (pixels) of a U-Net of ``depth`` levels for an input edge ``input_size``.

    Raises ``ValueError`` naming the nearest valid sizes when ``input_size``
    would make a pooling odd or a feature map empty.
    """
    depth = _check_depth(depth)
    sizes = _level_sizes(input_size, depth)
    if sizes is None:
        lower = _nearest_valid_or_none(int(input_size), depth)
        upper = _next_valid_input(int(input_size), depth)
        hint = f"nearest valid sizes: {lower} and {upper}" if lower else f"smallest valid size: {upper}"
        raise ValueError(
            f"input size {input_size} is not valid for a U-Net of depth {depth} "
            f"(every 2x2 pooling needs an even size and no feature map may be empty); {hint}"
        )
    return sizes[-1]


def valid_input_size(output_size: int, depth: int) -> int:
    """Input edge that gives exactly ``output_size`` output pixels.

    ``output_size - 4`` must be a multiple of ``2**(depth-1)`` (e.g. 388 for
    depth 5: 388 - 4 = 24 * 16) and large enough that no feature map is empty.
    """
    depth = _check_depth(depth)
    factor = 2 ** (depth - 1)
    if (int(output_size) - 4) % factor:
        raise ValueError(
            f"output size {output_size} is not reachable with depth {depth}: "
            f"output - 4 must be a multiple of {factor}"
        )
    bottom = (int(output_size) - 4) // factor + 4
    size = factor * (bottom + 8) - 4
    if _level_sizes(size, depth) is None or output_size < 1:
        raise ValueError(
            f"output size {output_size} is too small for depth {depth}; the smallest is "
            f"{valid_output_size(_next_valid_input(0, depth), depth)}"
        )
    return size


def _nearest_valid_or_none(size: int, depth: int) -> int | None:
    factor = 2 ** (depth - 1)
    candidate = ((size + 4) // factor) * factor - 4
    while candidate >= 1:
        if _level_sizes(candidate, depth) is not None:
            return candidate
        candidate -= factor
    return None


def _next_valid_input(size: int, depth: int) -> int:
    factor = 2 ** (depth - 1)
    candidate = max(-(-(size + 4) // factor) * factor - 4, factor - 4)
    while _level_sizes(candidate, depth) is None:
        candidate += factor
    return candidate


def nearest_valid_input_size(size: int, depth: int) -> int:
    """Largest valid input edge ``<= size`` (ValueError if there is none)."""
    depth = _check_depth(depth)
    found = _nearest_valid_or_none(int(size), depth)
    if found is None:
        raise ValueError(
            f"no valid input size <= {size} for depth {depth}; "
            f"the smallest is {_next_valid_input(0, depth)}"
        )
    return found


def margin(depth: int) -> int:
    """Context (pixels) lost per side: ``(input - output) / 2`` = 6·2**(depth-1) - 4."""
    return 6 * 2 ** (_check_depth(depth) - 1) - 4


# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------

def _layers(dims: int) -> tuple[type, type, type, type]:
    if dims == 2:
        return nn.Conv2d, nn.MaxPool2d, nn.ConvTranspose2d, nn.Dropout2d
    if dims == 3:
        return nn.Conv3d, nn.MaxPool3d, nn.ConvTranspose3d, nn.Dropout3d
    raise ValueError(f"dims must be 2 or 3, got {dims!r}")


#: oneDNN's convolution with a fused pointwise post-op (the kernel torch.compile's CPU
#: backend emits for convolution + ReLU), or None where this torch build lacks it.
_CONV_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_convolution_pointwise", None)


def fused_conv_relu_available(x: torch.Tensor) -> bool:
    """True where :meth:`UNet.forward_inference` fuses each convolution with its ReLU for ``x``.

    Only bfloat16 on the CPU: there the separate ReLU pass over every feature map cost
    19 % of a paper-network forward (profiled on an AMX Xeon) and the fused call is
    bit-identical (ReLU commutes with rounding to bfloat16).  float32 keeps the plain
    forward: no measurable gain, and 3D float32 convolutions differ by reassociation.
    """
    return _CONV_POINTWISE is not None and x.device.type == "cpu" and x.dtype == torch.bfloat16


class _DoubleConv(nn.Sequential):
    def __init__(self, conv: type, in_channels: int, out_channels: int) -> None:
        super().__init__(
            conv(in_channels, out_channels, 3),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3),
            nn.ReLU(inplace=True),
        )

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` with each (valid, stride-1) convolution and its ReLU as one oneDNN call."""
        for conv in (self[0], self[2]):
            ones = [1] * (x.ndim - 2)
            x = _CONV_POINTWISE(x, _packed_weight(conv, x), conv.bias, [0] * len(ones), ones, ones, 1, "relu", [], "")
        return x


#: oneDNN's weight reorder into the blocked layout its kernels read for one input shape (what
#: torch.compile's freezing pass does); None where this torch build lacks it.
_REORDER = {2: getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None),
            3: getattr(torch._C._nn, "mkldnn_reorder_conv3d_weight", None)}
_PACKED_SHAPES = 4  # input shapes whose packed weights a convolution keeps (full and last batches, tiles)
_PACKED_LOCK = threading.Lock()


def _packed_weight(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv.weight`` reordered once per input shape, as oneDNN's kernels read it, instead of on every
    call.  Bit-identical results (tested); measured on an AMX Xeon, bfloat16, batches of four 572^2
    tiles of the paper network: 1145 -> 830 ms over its 3x3 convolutions, most of it on the
    1-channel first layer (347 -> 56 ms).  Repacked when the weights change (their version counter)."""
    reorder = _REORDER.get(x.ndim - 2)
    if reorder is None:
        return conv.weight
    key = (tuple(x.shape), x.dtype, conv.weight.dtype, conv.weight.data_ptr(), conv.weight._version)
    cache = conv.__dict__.setdefault("_unet_pipe_packed", {})
    packed = cache.get(key)
    if packed is None:
        ones = [1] * (x.ndim - 2)
        packed = reorder(conv.weight.detach().to_mkldnn(), [0] * len(ones), ones, ones, 1, list(x.shape))
        with _PACKED_LOCK:  # predict's worker threads may share a model
            while len(cache) >= _PACKED_SHAPES:
                cache.pop(next(iter(cache)))
            cache[key] = packed
    return packed


def _max_pool_2x(x: torch.Tensor) -> torch.Tensor:
    """2x max-pooling of every spatial axis as the maximum of its 4 (2D) or 8 (3D) strided views:
    the same values as ``max_pool2d/3d`` bit for bit, without the index map torch's CPU kernel
    writes and throws away (8 bytes per output voxel).  Measured on an AMX Xeon, bfloat16 channels-last
    batches of four paper-network maps: 27 -> 17 ms at 128 x 280^2, 9.9 -> 3.6 ms at 256 x 136^2,
    equal at 64 x 568^2."""
    views = [x]
    for axis in range(2, x.ndim):
        size = x.shape[axis] // 2 * 2
        views = [v.narrow(axis, 0, size) for v in views]
        views = [part for v in views for part in (v[(slice(None),) * axis + (slice(0, None, 2),)],
                                                  v[(slice(None),) * axis + (slice(1, None, 2),)])]
    while len(views) > 1:
        views = [torch.maximum(a, b) for a, b in zip(views[::2], views[1::2])]
    return views[0]


def _center_crop(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Crop the trailing spatial axes of ``x`` to ``shape`` around the centre."""
    slices = [slice(None), slice(None)]
    for have, want in zip(x.shape[2:], shape):
        start = (have - want) // 2
        slices.append(slice(start, start + want))
    return x[tuple(slices)]


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (1) of the network's output, in float32 whatever precision
    computed the logits: the one place predict, validation and the exported test output get them."""
    return torch.softmax(logits.float(), dim=1)


class UNet(nn.Module):
    """U-Net; ``UNet()`` is the paper's network (1 input channel, 2 classes, depth 5, base 64).

    Forward maps ``(N, C, H, W)`` (3D: ``(N, C, D, H, W)``) to logits
    ``(N, n_classes, H - 2*margin, W - 2*margin)``; each spatial size must be a
    valid input size (:func:`valid_output_size`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        n_classes: int = 2,
        depth: int = 5,
        base_channels: int = 64,
        dims: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check_depth(depth)
        if in_channels < 1 or n_classes < 1 or base_channels < 1:
            raise ValueError("in_channels, n_classes and base_channels must be >= 1")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must lie in [0, 1], got {dropout}")
        conv, pool, upconv, drop = _layers(dims)
        self.arch: dict[str, Any] = {
            "in_channels": int(in_channels),
            "n_classes": int(n_classes),
            "depth": int(depth),
            "base_channels": int(base_channels),
            "dims": int(dims),
            "dropout": float(dropout),
        }
        self.depth = int(depth)
        self.dims = int(dims)
        self.margin = margin(depth)
        channels = [base_channels * 2**level for level in range(depth)]

        self.down = nn.ModuleList()
        previous = in_channels
        for ch in channels:
            self.down.append(_DoubleConv(conv, previous, ch))
            previous = ch
        self.pool = pool(2, stride=2)
        self.dropout = drop(dropout)
        self.upconvs = nn.ModuleList()
        self.up = nn.ModuleList()
        for ch in reversed(channels[:-1]):
            self.upconvs.append(upconv(2 * ch, ch, 2, stride=2))
            self.up.append(_DoubleConv(conv, 2 * ch, ch))
        self.head = conv(channels[0], n_classes, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal init, std √(2/N), N = inputs of one output unit; zero biases.

        For a convolution N = in_channels · kernel volume.  For the 2×2
        stride-2 up-convolution each output unit sees exactly one kernel tap per
        input channel, so N = in_channels (torch's ``kaiming_normal_`` would use
        out_channels · 4 for transposed weights, which is not the paper's N).
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                fan_in = module.in_channels * math.prod(module.kernel_size)
            elif isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
                fan_in = module.in_channels
            else:
                continue
            nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_in))
            nn.init.zeros_(module.bias)

    def output_size(self, input_size: int) -> int:
        """Valid output edge for ``input_size`` (see :func:`valid_output_size`)."""
        return valid_output_size(input_size, self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.dims + 2:
            raise ValueError(
                f"expected a {self.dims + 2}-d tensor (N, C, {'D, ' if self.dims == 3 else ''}H, W), "
                f"got shape {tuple(x.shape)}"
            )
        for size in x.shape[2:]:
            valid_output_size(size, self.depth)  # raises a helpful ValueError
        return self._forward(x, fused=False)

    def forward_inference(self, x: torch.Tensor) -> torch.Tensor:
        """``self(x)`` without autograd, with fused convolution + ReLU where that is faster.

        Equal bit for bit to ``self(x)`` in eval mode (tested): on the CPU in bfloat16
        (:func:`fused_conv_relu_available`) each 3x3 convolution and its ReLU run as one
        oneDNN call; elsewhere this is ``self(x)``.
        """
        if self.training or torch.is_grad_enabled() or not fused_conv_relu_available(x):
            return self(x)
        for size in x.shape[2:]:
            valid_output_size(size, self.depth)
        return self._forward(x, fused=True)

    def _forward(self, x: torch.Tensor, fused: bool) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.down):
            x = block.fused(x) if fused else block(x)
            if level < self.depth - 1:
                skips.append(x)
                x = _max_pool_2x(x) if fused else self.pool(x)
        x = self.dropout(x)
        for upconv, block, skip in zip(self.upconvs, self.up, reversed(skips)):
            x = upconv(x)
            x = torch.cat([_center_crop(skip, tuple(x.shape[2:])), x], dim=1)
            x = block.fused(x) if fused else block(x)
        return self.head(x)


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    """Convert numpy scalars/arrays and tuples to plain types for weights_only loading."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def save_checkpoint(
    path: str | Path,
    model: UNet,
    optimizer: torch.optim.Optimizer | None = None,
    step: int = 0,
    config: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (temporary file in the same folder, then ``os.replace``).

    Content is tensors and plain types only, so :func:`load_checkpoint` can use
    ``torch.load(weights_only=True)``.  ``extra`` holds e.g. RNG states (the
    caller converts numpy states with plain types; big ints are stored as str).
    """
    import unet_pipe
    from unet_pipe.atomic import atomic_output
    from unet_pipe.errors import OutputError
    from unet_pipe.provenance import git_commit

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": dict(model.arch),
        # contiguous: a plain state dict whatever layout the model trained in (channels-last bf16 on CPUs)
        "model_state": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "optimizer_state": None if optimizer is None else optimizer.state_dict(),
        "step": int(step),
        "torch_rng_state": torch.get_rng_state(),
        "config": _plain(config) if config is not None else None,
        "package_version": unet_pipe.__version__,
        "git_commit": git_commit(),
        "extra": _plain(extra) if extra is not None else {},
    }
    # The project's one writer: a temporary file opened normally (not mkstemp, which makes
    # the file 0600, so the checkpoint gets the user's umask permissions), then renamed over
    # ``path`` only when that is a file we wrote.
    try:
        with atomic_output(path, recognise=_is_checkpoint) as tmp:
            with open(tmp, "xb") as fh:
                torch.save(payload, fh)
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as exc:  # a full disk (ENOSPC) or a folder gone read-only mid-run
        raise OutputError(path, f"could not be written ({exc.strerror or exc}); an earlier {path.name} is unchanged") from None
    return path


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint of ours (our format key inside), e.g. one copied here or written by an older
    release: replaceable like one with an ownership record."""
    from unet_pipe.errors import UnetPipeError

    try:
        load_checkpoint(path)
    except UnetPipeError:
        return False
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint with ``torch.load(weights_only=True)``.

    Raises :class:`CheckpointError` for a missing file, a pickle that needs
    arbitrary code (possibly malicious), a foreign file, or missing keys.
    """
    from unet_pipe.errors import CheckpointError

    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, "checkpoint file not found")
    if not path.is_file():  # a folder, or a device such as /dev/zero (endless, size 0)
        raise CheckpointError(path, "is not a regular file, so not a checkpoint")
    size = path.stat().st_size
    if size > MAX_CHECKPOINT_BYTES:
        raise CheckpointError(
            path, f"{size / 2**30:.1f} GiB is far larger than any U-Net checkpoint (limit "
            f"{MAX_CHECKPOINT_BYTES / 2**30:.0f} GiB); refusing to load it"
        )
    try:
        with warnings.catch_warnings():
            # Foreign pickles warn about their protocol before being refused; the error says enough.
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            path, f"not a unet-pipe checkpoint: refused to unpickle (weights_only): {first}"
        ) from None
    except Exception as exc:  # torch.load raises many types for foreign bytes (KeyError, RuntimeError, ...)
        raise CheckpointError(path, f"not a unet-pipe checkpoint: cannot read it ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(path, "not a unet-pipe checkpoint: no 'format: unet-pipe-checkpoint' entry")
    missing = [key for key in _REQUIRED_KEYS if key not in data]
    if missing:
        raise CheckpointError(path, f"not a unet-pipe checkpoint: missing keys {missing}")
    if data["version"] != CHECKPOINT_VERSION:
        raise CheckpointError(
            path, f"checkpoint format version {data['version']} is not supported (expected {CHECKPOINT_VERSION})"
        )
    state = data["model_state"]
    if not isinstance(state, dict) or not isinstance(data["arch"], dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(path, "not a unet-pipe checkpoint: 'arch' or 'model_state' has the wrong structure")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(path, f"non-finite weights (NaN or inf) in {len(bad)} tensors, e.g. {bad[0]!r}")
    return data


def model_from_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[UNet, dict]:
    """Build the recorded architecture and load its weights; returns ``(model, checkpoint)``.

    The model is in eval mode.  Raises :class:`CheckpointError` if the
    recorded architecture is unusable or does not match the stored weights.
    """
    from unet_pipe.errors import CheckpointError

    data = load_checkpoint(path, map_location=map_location)
    arch = data["arch"]
    try:
        # Built on the meta device, then given uninitialised storage: the He init (0.26 s for
        # the paper's net) would be overwritten by the stored weights anyway.  The copy into
        # that storage keeps load_state_dict's semantics (float32, contiguous, no aliasing).
        with torch.device("meta"):
            model = UNet(**arch)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(path, f"invalid architecture {arch}: {exc}") from None
    model.to_empty(device=map_location)
    try:
        model.load_state_dict(data["model_state"], strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "")
        raise CheckpointError(
            path, f"weights do not match the recorded architecture {arch}: {detail[:300]}"
        ) from None
    model.to(map_location)
    model.eval()
    return model, data


# Entries of ``UNet.arch`` that do not shape the weights: a fine-tuning run may change them.
_ARCH_FREE = ("dropout",)


def init_weights_from(model: UNet, path: str | Path) -> dict:
    """Copy the model weights of checkpoint ``path`` into ``model`` (fine-tuning); return its record.

    Only the weights are taken (``load_checkpoint``: ``weights_only`` loading),
    never the optimiser state, step or generator states.  The checkpoint's
    architecture must equal ``model.arch`` but for :data:`_ARCH_FREE`; a
    difference raises :class:`CheckpointError` naming it.  The record,
    ``{"path", "sha256"}``, identifies the source for provenance.
    """
    from unet_pipe.errors import CheckpointError
    from unet_pipe.provenance import file_sha256

    path = Path(path)
    data = load_checkpoint(path)
    differing = [
        f"{key} {data['arch'].get(key)!r} (config: {value!r})"
        for key, value in model.arch.items()
        if key not in _ARCH_FREE and data["arch"].get(key) != value
    ]
    if differing:
        raise CheckpointError(
            path, f"train.init_from: architecture differs from the config's model section: {', '.join(differing)}"
        )
    try:
        model.load_state_dict(data["model_state"], strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise CheckpointError(path, f"train.init_from: weights do not fit the model: {lines[-1][:300]}") from None
    return {"path": str(path), "sha256": file_sha256(path)}
