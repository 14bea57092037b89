"""The SPINEPS instance network (3D residual U-Net), model-folder loading and batched sparse cutout prediction.

Architecture (as in spineps' ``Unet3D``; parameter names match so a SPINEPS Lightning checkpoint's ``network.*``
state dict loads with ``strict=True``): a 7^3 stem conv; per level two residual blocks (3^3 conv + GroupNorm +
LeakyReLU, twice, plus a 1^3 projection where the width changes) and a stride-2 4^3 conv down (none on the last
level); two residual blocks in the middle; per level up: skip averaged in as ``0.5 * (x + skip)``, two residual
blocks, a stride-2 4^3 transposed conv up (none on the last); a residual block on ``[x, stem]``; a 1^3 conv out.
At inference on a CPU the stem convolution runs through the FFT (:func:`fft_conv3d`, ``Unet3D.stem_algorithm``) and
the element-wise steps run in place; the weights and the outputs (to float rounding) are the same.
Published SPINEPS instance models use ``dim=16, dim_mults=(1, 2, 4, 8), channels=10, out_dim=4``; the sizes are read
from the state dict, so other widths (e.g. spineps' newer ``dim=8``) load as well.
"""

from __future__ import annotations

import argparse
import pathlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from spineps_like.instance.cutouts import SPINEPS_INPUT_MAPPING, Cutouts, SparsePrediction, sparse_prediction
from spineps_like.models.folders import read_instance_folder
from spineps_like.models.manifest import ModelError, verify_manifest

#: spineps' legacy single-channel models read the mapped label divided by this.
LEGACY_LABEL_NORMALIZATION = 9.0


# ---------------------------------------------------------------- architecture
def _fft_size(n: int) -> int:
    """The smallest n' >= n with no prime factor above 5 (fast FFT lengths)."""
    while True:
        m = n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        if m == 1:
            return n
        n += 1


def fft_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int,
               kernel_spectrum: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv3d(x, weight, bias, padding=padding)`` (stride 1, zero padding, same output size) by the FFT.

    The convolution is a circular one on a grid padded by ``padding`` voxels per axis (rounded up to a fast FFT
    length, :func:`fft_grid`): what wraps around there lands outside the output region, which is all that is kept.
    Costs O(N log N) per channel instead of O(N k^3) per channel pair: for SPINEPS' 7^3 stem on 10 one-hot channels
    about 3.5x as fast on a 2-core CPU (31 -> ~9 ms per 48 x 56 x 32 cutout in batches of 3, after a one-off ~45 ms
    for the kernel spectrum per grid); equal to the direct convolution up to float32 rounding (~1e-6 relative).
    ``kernel_spectrum`` is :func:`fft_kernel_spectrum`'s result for this grid, if cached.
    """
    k = weight.shape[-1]
    if tuple(weight.shape[-3:]) != (k, k, k) or 2 * padding != k - 1:
        raise ValueError(f"fft_conv3d needs a cubic odd kernel with 'same' padding, got {tuple(weight.shape)} "
                         f"and padding {padding}")
    size = x.shape[-3:]
    grid = fft_grid(size, padding)
    if kernel_spectrum is None:
        kernel_spectrum = fft_kernel_spectrum(weight, grid)
    spectrum = torch.fft.rfftn(x, s=grid, dim=(-3, -2, -1))  # (B, Cin, ...)
    out = spectrum[:, :1] * kernel_spectrum[0]  # (B, Cout, ...), one input channel at a time: no (B, Cout, Cin, ...)
    for c in range(1, spectrum.shape[1]):
        out.addcmul_(spectrum[:, c:c + 1], kernel_spectrum[c])
    y = torch.fft.irfftn(out, s=grid, dim=(-3, -2, -1), norm="forward")  # 1/N is in the kernel spectrum
    o = k - 1 - padding  # output voxel i sits at i + k - 1 - padding of the circular convolution
    y = y[..., o:o + size[0], o:o + size[1], o:o + size[2]]
    # in the input's memory format, as conv3d returns it (the one-hot input is channels-last, and the layers after the
    # stem run about 1.5x faster on CPU in that layout)
    fmt = torch.channels_last_3d if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) \
        and not x.is_contiguous() else torch.contiguous_format
    result = torch.empty((*y.shape[:2], *size), dtype=y.dtype, device=y.device, memory_format=fmt)
    if bias is None:
        return result.copy_(y)
    return torch.add(y, bias.view(1, -1, 1, 1, 1), out=result)


def fft_grid(size: Sequence[int], padding: int) -> tuple[int, ...]:
    """The FFT grid :func:`fft_conv3d` uses for inputs of ``size`` and a 'same' padding of ``padding`` voxels.

    ``n + padding`` per axis suffices: output voxel ``i`` reads the circular correlation at ``i + padding``, whose
    kernel offsets ``i + padding - j`` (input voxel ``j``) run from ``padding - n + 1`` to ``n - 1 + padding``. Only
    the negative ones wrap around, to ``N + padding - n + 1`` or more, which is past the kernel's last tap
    (``2 * padding``) once ``N >= n + padding``; the largest, ``n - 1 + padding``, stays below ``N``. (A full linear
    convolution would need ``n + 2 * padding``.) Rounded up to lengths with no prime factor above 5.
    """
    return tuple(_fft_size(int(n) + padding) for n in size)


def fft_kernel_spectrum(weight: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """The spectrum of a (Cout, Cin, k, k, k) kernel on ``grid`` for :func:`fft_conv3d`, as (Cin, Cout, ...): flipped
    (a convolution layer cross-correlates) and scaled by 1/N, so that the inverse transform needs no scaling pass."""
    spectrum = torch.fft.rfftn(torch.flip(weight, dims=(-3, -2, -1)), s=tuple(grid), dim=(-3, -2, -1), norm="forward")
    return spectrum.transpose(0, 1).contiguous()


class Block3D(nn.Module):
    """3^3 conv, GroupNorm, LeakyReLU."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.proj = nn.Conv3d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)
        self.act = nn.LeakyReLU(inplace=True)  # on the norm's fresh output: same values, one buffer less

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.proj(x)))


class ResnetBlock3D(nn.Module):
    """Two :class:`Block3D` plus a residual connection (1^3 projection where the width changes)."""

    def __init__(self, dim: int, dim_out: int, groups: int = 8):
        super().__init__()
        self.block1 = Block3D(dim, dim_out, groups)
        self.block2 = Block3D(dim_out, dim_out, groups)
        self.res_conv: nn.Module = nn.Conv3d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block2(self.block1(x))
        # in place where autograd does not need the activation (inference): same sum, no new buffer
        return h + self.res_conv(x) if torch.is_grad_enabled() else h.add_(self.res_conv(x))


class Unet3D(nn.Module):
    """SPINEPS' instance U-Net: residual blocks, averaged (not concatenated) skips, 4 output classes.

    Parameters
    ----------
    dim : int
        Base width; level widths are ``dim * m`` for ``m`` in ``dim_mults``.
    dim_mults : tuple of int
        Width multipliers per level; ``len(dim_mults) - 1`` down-samplings, so input sizes must be divisible by
        ``2 ** (len(dim_mults) - 1)``.
    channels : int
        Input channels (10: one-hot of background + 9 mapped labels).
    out_dim : int
        Output classes (4: background, above, centre, below).
    init_dim : int, optional
        Stem width (default ``dim``).
    groups : int
        GroupNorm groups.
    """

    def __init__(self, dim: int = 16, dim_mults: Sequence[int] = (1, 2, 4, 8), channels: int = 10, out_dim: int = 4,
                 init_dim: int | None = None, groups: int = 8):
        super().__init__()
        self.channels = int(channels)
        self.out_dim = int(out_dim)
        self.dim_mults = tuple(int(m) for m in dim_mults)
        init_dim = dim if init_dim is None else init_dim
        self.init_conv = nn.Conv3d(channels, init_dim, 7, padding=3)
        dims = [init_dim, *(int(dim * m) for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        n = len(in_out)
        self.downs = nn.ModuleList(
            nn.ModuleList([ResnetBlock3D(a, b, groups), ResnetBlock3D(b, b, groups),
                           nn.Conv3d(b, b, 4, 2, 1) if i < n - 1 else nn.Identity()])
            for i, (a, b) in enumerate(in_out)
        )
        self.mid_block1 = ResnetBlock3D(dims[-1], dims[-1], groups)
        self.mid_block2 = ResnetBlock3D(dims[-1], dims[-1], groups)
        self.ups = nn.ModuleList(
            nn.ModuleList([ResnetBlock3D(b, a, groups), ResnetBlock3D(a, a, groups),
                           nn.ConvTranspose3d(a, a, 4, 2, 1) if i < n - 1 else nn.Identity()])
            for i, (a, b) in enumerate(reversed(in_out))
        )
        self.final_res_block = ResnetBlock3D(2 * init_dim, dim, groups)
        self.final_conv = nn.Conv3d(dim, out_dim, 1)
        #: How the 7^3 stem convolution runs: 'fft' (:func:`fft_conv3d`), 'direct' (``nn.Conv3d``), or 'auto': the
        #: FFT on a CPU at inference (there the stem is ~40% of the forward pass and the FFT halves it), direct where
        #: gradients are needed (training) or on a GPU (cuDNN picks its own algorithm).
        self.stem_algorithm = "auto"
        self._stem_spectrum: tuple[tuple, torch.Tensor] | None = None

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** (len(self.downs) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = [s for s in x.shape[-3:] if s % self.divisor]
        if bad:
            raise ValueError(f"Unet3D input size {tuple(x.shape[-3:])} is not divisible by {self.divisor}")
        x = self._stem(x)
        stem = x
        skips = []
        for block1, block2, down in self.downs:
            x = block2(block1(x))
            skips.append(x)
            x = down(x)
        x = self.mid_block2(self.mid_block1(x))
        for block1, block2, up in self.ups:
            x = 0.5 * (x + skips.pop()) if torch.is_grad_enabled() else x.add_(skips.pop()).mul_(0.5)
            x = up(block2(block1(x)))
        x = self.final_res_block(torch.cat((x, stem), dim=1))
        return self.final_conv(x)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.init_conv
        algorithm = self.stem_algorithm
        if algorithm not in ("auto", "fft", "direct"):
            raise ValueError(f"stem_algorithm must be 'auto', 'fft' or 'direct', got {algorithm!r}")
        if algorithm == "auto":
            algorithm = "fft" if x.device.type == "cpu" and not torch.is_grad_enabled() else "direct"
        if algorithm == "direct" or torch.is_grad_enabled():
            return conv(x)
        w = conv.weight
        pad = conv.padding[0]
        grid = fft_grid(x.shape[-3:], pad)
        # the kernel spectrum per grid, recomputed when the weights change (training, load_state_dict: new version)
        key = (grid, w.device, w.dtype, w.data_ptr(), w._version)
        if self._stem_spectrum is None or self._stem_spectrum[0] != key:
            self._stem_spectrum = (key, fft_kernel_spectrum(w.detach(), grid))
        return fft_conv3d(x, w, conv.bias, pad, self._stem_spectrum[1])

    def architecture(self) -> dict[str, Any]:
        """Constructor arguments (stored in checkpoints and model folders)."""
        return {"dim": int(self.final_conv.in_channels), "dim_mults": list(self.dim_mults), "channels": self.channels,
                "out_dim": self.out_dim, "init_dim": int(self.init_conv.out_channels),
                "groups": int(self.mid_block1.block1.norm.num_groups)}

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], groups: int = 8) -> "Unet3D":
        """Build the network whose sizes fit ``state_dict`` (SPINEPS parameter names, no prefix) and load it strictly.

        Every key must be used and every parameter present (``strict=True`` semantics); a mismatch raises ValueError.
        """
        try:
            w0 = state_dict["init_conv.weight"]
            init_dim, channels = int(w0.shape[0]), int(w0.shape[1])
            dim = int(state_dict["final_conv.weight"].shape[1])
            out_dim = int(state_dict["final_conv.weight"].shape[0])
            levels = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("downs."))
            widths = [int(state_dict[f"downs.{i}.0.block1.proj.weight"].shape[0]) for i in range(levels)]
        except (KeyError, ValueError, IndexError) as e:
            raise ValueError(f"state dict is not a SPINEPS Unet3D (missing or odd key {e})") from None
        if any(w % dim for w in widths):
            raise ValueError(f"state dict level widths {widths} are not multiples of the base width {dim}")
        net = cls(dim=dim, dim_mults=tuple(w // dim for w in widths), channels=channels, out_dim=out_dim,
                  init_dim=init_dim, groups=groups)
        try:
            res = net.load_state_dict(state_dict, strict=False)
        except RuntimeError as e:  # shape mismatches
            detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
            raise ValueError(f"state dict does not fit Unet3D: {detail}") from None
        if res.missing_keys or res.unexpected_keys:  # the strict check, as one readable line
            raise ValueError(f"state dict does not fit Unet3D: {len(res.missing_keys)} missing keys "
                             f"{res.missing_keys[:3]}, {len(res.unexpected_keys)} unexpected {res.unexpected_keys[:3]}")
        return net


# ---------------------------------------------------------------- checkpoints
def _inert_stand_in(qualname: str) -> type:
    """A do-nothing dict subclass standing in for an unknown pickled class (hyper-parameters we never use)."""
    module, _, name = qualname.rpartition(".")

    def _init(self: dict, *args: Any, **kwargs: Any) -> None:
        dict.__init__(self)

    def _setstate(self: dict, state: Any) -> None:
        self["__state__"] = state

    return type(name, (dict,), {"__module__": module, "__qualname__": name, "__init__": _init,
                                "__setstate__": _setstate})


def load_checkpoint_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The network state dict of a SPINEPS instance checkpoint (Lightning ``.ckpt``) or a plain ``.pt`` state dict.

    Always loads with ``torch.load(weights_only=True)``: pickled non-tensor objects a Lightning checkpoint carries
    (hyper-parameter namespaces, callback states) are replaced by inert stand-ins, so no code from the file runs.
    A Lightning state dict's ``network.`` prefix is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint file")
    stand_ins: list[Any] = [argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath]
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # not a zip checkpoint (old format) or unreadable
        raise ModelError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    known = {f"{c.__module__}.{c.__qualname__}" for c in stand_ins}
    stand_ins += [(_inert_stand_in(g), g) for g in unknown if g not in known]
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: cannot load checkpoint safely ({msg})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ModelError(f"{path}: holds no state dict")
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith("network.") for k in tensors):
        tensors = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
    if "init_conv.weight" not in tensors:
        raise ModelError(f"{path}: state dict has no Unet3D parameters (no 'network.init_conv.weight')")
    return tensors


def lightning_checkpoint(network: Unet3D, *, epoch: int = 0, global_step: int = 0,
                         hyper_parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Lightning-style checkpoint dict (``state_dict`` with the ``network.`` prefix SPINEPS' PLNet uses)."""
    return {
        "epoch": int(epoch),
        "global_step": int(global_step),
        "pytorch-lightning_version": "2.0.0",
        "state_dict": {f"network.{k}": v.detach().cpu().clone() for k, v in network.state_dict().items()},
        "hyper_parameters": {"architecture": network.architecture(), **(hyper_parameters or {})},
    }


# ---------------------------------------------------------------- model folders
@dataclass
class InstanceModel:
    """A loaded instance model: the network plus what its folder's ``inference_config.json`` says."""

    network: Unet3D
    config: dict[str, Any]
    folder: Path | None = None
    mapping: dict[int, int] = field(default_factory=lambda: dict(SPINEPS_INPUT_MAPPING))
    verified: bool = False  # True when the folder's MANIFEST.sha256 covered and matched config and weights

    @property
    def cutout_size(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.config.get("cutout_size", (248, 304, 64)))  # type: ignore[return-value]

    @property
    def resolution_range(self) -> Any:
        return self.config.get("resolution_range")

    @property
    def orientation(self) -> str:
        return "".join(self.config.get("model_expected_orientation", ["P", "I", "R"]))


def load_instance_model(folder: str | Path, *, device: str | torch.device = "cpu", verify: bool = True) -> InstanceModel:
    """Load a SPINEPS-layout instance model folder: ``inference_config.json`` + one ``*.ckpt`` (or ``*.pt``).

    Parameters
    ----------
    folder : path
        The model folder.
    device : str or torch.device
        Where the network lives.
    verify : bool
        Check ``MANIFEST.sha256`` when the folder has one (a mismatch raises ``ModelError``); a folder without one
        (e.g. downloaded SPINEPS weights) loads with ``verified=False`` and a warning.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder}: instance model folder not found")
    cfg_path, config, weights = read_instance_folder(folder)
    verified = bool(verify and verify_manifest(folder, required=[cfg_path, weights]))
    if verify and not verified:
        import warnings

        from spineps_like.models.manifest import MANIFEST_NAME

        warnings.warn(f"{folder}: no {MANIFEST_NAME}; loading unverified model files", stacklevel=2)
    try:
        network = Unet3D.from_state_dict(load_checkpoint_state_dict(weights))
    except (ValueError, RuntimeError) as e:  # RuntimeError: strict load found missing/unexpected/mis-shaped keys
        msg = str(e).strip().splitlines()[0]
        raise ModelError(msg if str(weights) in msg else f"{weights}: {msg}") from None
    network.eval().to(device)
    mapping = {int(k): int(v) for k, v in config["mapping"].items()} if config.get("mapping") else dict(SPINEPS_INPUT_MAPPING)
    model = InstanceModel(network, config, folder, mapping, verified)
    size = model.cutout_size
    if any(s % network.divisor for s in size):
        raise ModelError(f"{cfg_path}: cutout_size {size} is not divisible by {network.divisor}")
    return model


# ---------------------------------------------------------------- prediction
def _network_input(labels: torch.Tensor, channels: int) -> torch.Tensor:
    if channels == 1:  # spineps' legacy single-channel models
        return (labels.float() / LEGACY_LABEL_NORMALIZATION).unsqueeze(1)
    labels = torch.where(labels < channels, labels, torch.zeros_like(labels))
    # F.one_hot(labels, channels).permute(0, 4, 1, 2, 3).float(), without its int64 volume: the same channels-last
    # float layout (the convolutions' results depend on the input's memory layout, so it is kept)
    one_hot = torch.zeros((*labels.shape, channels), dtype=torch.float32, device=labels.device)
    return one_hot.scatter_(-1, labels.unsqueeze(-1), 1.0).permute(0, 4, 1, 2, 3)


def predict_cutouts(model: InstanceModel | Unet3D, batch: Cutouts, *, batch_size: int = 4,
                    device: str | torch.device = "cpu", amp: bool = False,
                    restrict_to_input: bool = True) -> list[SparsePrediction]:
    """Run the instance network on all cutouts and return one sparse prediction per cutout.

    Cutouts are one-hot encoded and forwarded under ``torch.inference_mode`` in ``ceil(n / batch_size)`` batches of
    near-equal size (9 cutouts: 3 + 3 + 3, not 4 + 4 + 1); the class
    of each voxel is the argmax over background/above/centre/below (softmax is monotonic, so the argmax of the
    logits is the argmax of SPINEPS' softmax). Each class is stored as a :class:`SparseMask` in volume coordinates
    (bounding box + boolean mask); nothing volume-sized is allocated.

    Parameters
    ----------
    model : InstanceModel or Unet3D
    batch : Cutouts
        From :func:`~spineps_like.instance.cutouts.extract_cutouts`.
    batch_size : int
        Most cutouts per forward pass.
    device : str or torch.device
        Where to run (the network is moved there).
    amp : bool
        Autocast (bfloat16 on CPU, float16 on CUDA).
    restrict_to_input : bool
        Keep predicted vertebra voxels only where the input holds a vertebra label (SPINEPS zeroes them later in
        post-processing; doing it here keeps the sparse masks tight and the fusion Dice clean).
    """
    net = model.network if isinstance(model, InstanceModel) else model
    if not isinstance(batch, Cutouts):
        raise ValueError("predict_cutouts needs a Cutouts batch from extract_cutouts (labels + offsets)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if any(s % net.divisor for s in batch.size):
        raise ValueError(f"cutout size {batch.size} is not divisible by {net.divisor} (the network's down-sampling)")
    device = torch.device(device)
    if next(net.parameters()).device != device:  # moving (or re-evaluating) every module costs ~5 ms per call
        net = net.to(device)
    if net.training:
        net.eval()
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    out: list[SparsePrediction] = []
    labels_all = batch.labels
    # ceil(n / batch_size) batches of near-equal size: a trailing batch of one cutout would run at about half the
    # per-cutout speed of a full one on the CPU
    n = len(labels_all)
    n_batches = -(-n // batch_size)
    bounds = [b * n // n_batches for b in range(n_batches + 1)] if n else [0]
    with torch.inference_mode():
        for b0, b1 in zip(bounds[:-1], bounds[1:]):
            lab = torch.from_numpy(np.ascontiguousarray(labels_all[b0:b1])).to(device).long()
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                logits = net(_network_input(lab, net.channels))
            cls = logits.float().argmax(dim=1).to(torch.uint8)
            if restrict_to_input:
                cls[lab == 0] = 0
            cls_np = cls.cpu().numpy()
            for j in range(cls_np.shape[0]):
                k = b0 + j
                out.append(sparse_prediction(cls_np[j], k, batch))
    return out
