"""The perceptual loss network: VGG16 features with LPIPS's linear heads, from a weight file the user supplies.

Nothing is downloaded. ``vae_loss.perceptual_weights`` names ONE ``.safetensors`` or ``.npz`` file of float
tensors named as in torchvision's VGG16 ``features`` module and in the ``lpips`` package's VGG heads:

    features.{i}.weight  [O, I, 3, 3]   features.{i}.bias [O]   the convs, i = 0 2 5 7 10 12 14 17 19 21 24 26 28
    lin{k}.model.1.weight [1, C_k, 1, 1]                          optional: LPIPS's head of tap k, k = 0 .. 4

i.e. the keys of torchvision's ImageNet VGG16 state dict that start with ``features.`` plus those of the
lpips package's ``vgg.pth``, merged into one file (e.g. ``safetensors.numpy.save_file`` or ``numpy.savez`` of
the two state dicts' arrays, done once on any machine that has them). Other keys are ignored. Without the
``lin`` heads every channel weighs 1 (a plain distance of unit-normalised VGG features).

The conv stack is read from the indices present: convs 2 apart (conv, ReLU) are one stage, a gap of 3 (conv,
ReLU, 2x2 max-pool) starts the next one after the pool; each stage's last ReLU output is a tap. For VGG16
these are LPIPS's five taps relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3. Inputs in [-1, 1] are first
shifted and scaled as LPIPS does (its constants are the ImageNet mean and std rewritten for [-1, 1] inputs).
"""

from __future__ import annotations

from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax.training.vae_losses import lpips_distance

INPUT_SHIFT = (-0.030, -0.088, -0.188)
INPUT_SCALE = (0.458, 0.448, 0.450)
SUFFIXES = (".safetensors", ".npz")


class PerceptualWeightsError(ValueError):
    """A perceptual weight file that is missing or does not hold a usable VGG stack; names file and key."""


@flax.struct.dataclass
class PerceptualNet:
    kernels: tuple  # HWIO float32, in stack order
    biases: tuple
    lin: tuple | None  # [C_k] per tap, or None
    stage_sizes: tuple = flax.struct.field(pytree_node=False, default=())  # convs per stage


def features(net: PerceptualNet, images: jax.Array) -> list[jax.Array]:
    """Images [N, H, W, 3] in [-1, 1] -> the taps, NHWC float32."""
    h = (images.astype(jnp.float32) - jnp.asarray(INPUT_SHIFT)) / jnp.asarray(INPUT_SCALE)
    taps, conv = [], 0
    for stage, size in enumerate(net.stage_sizes):
        if stage:
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        for _ in range(size):
            h = jax.lax.conv_general_dilated(h, net.kernels[conv], (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + net.biases[conv])
            conv += 1
        taps.append(h)
    return taps


def perceptual_loss(net: PerceptualNet, reconstruction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean LPIPS distance of the batch (the target's features carry no gradient)."""
    target_feats = [jax.lax.stop_gradient(f) for f in features(net, target)]
    return jnp.mean(lpips_distance(features(net, reconstruction), target_feats, net.lin))


def _read(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files if k.startswith(("features.", "lin"))}
        except (OSError, ValueError) as e:
            raise PerceptualWeightsError(f"{path}: not a readable .npz file ({e})") from None
    from nextstep_jax.checkpoint.errors import CheckpointError
    from nextstep_jax.checkpoint.release.safetensors import SafetensorsReader

    try:
        with SafetensorsReader(path) as reader:
            return {k: reader.read(k) for k in reader.keys() if k.startswith(("features.", "lin"))}
    except CheckpointError as e:
        raise PerceptualWeightsError(str(e)) from None


def load_perceptual_weights(path: str | Path) -> PerceptualNet:
    """The network of a weight file in the format above; every inconsistency is one error naming the key."""
    path = Path(path)
    if path.suffix not in SUFFIXES or not path.is_file():
        raise PerceptualWeightsError(f"vae_loss.perceptual_weights={str(path)!r}: expected an existing "
                                     f"{' or '.join(SUFFIXES)} file")
    tensors = _read(path)
    indices = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("features.")
                      and k.split(".")[1].isdigit()})
    if not indices:
        raise PerceptualWeightsError(f"{path}: no 'features.<i>.weight' tensors (VGG16 convs)")
    kernels, biases, stage_sizes, channels, taps = [], [], [], 3, []
    for n, i in enumerate(indices):
        w, b = tensors.get(f"features.{i}.weight"), tensors.get(f"features.{i}.bias")
        if w is None or b is None:
            raise PerceptualWeightsError(f"{path}: features.{i} needs both .weight and .bias")
        if w.ndim != 4 or w.shape[1] != channels or w.shape[2:] != (3, 3) or b.shape != (w.shape[0],):
            raise PerceptualWeightsError(f"{path}: features.{i}.weight {tuple(w.shape)} / .bias {tuple(b.shape)}: "
                                         f"expected [O, {channels}, 3, 3] and [O]")
        gap = i - indices[n - 1] if n else None
        if gap not in (None, 2, 3):
            raise PerceptualWeightsError(f"{path}: features.{indices[n - 1]} -> features.{i}: VGG layers follow "
                                         "each other 2 (conv, ReLU) or 3 (conv, ReLU, max-pool) indices apart")
        if gap in (None, 3):
            stage_sizes.append(0)
            if gap == 3:
                taps.append(channels)
        stage_sizes[-1] += 1
        kernels.append(jnp.asarray(np.asarray(w, np.float32).transpose(2, 3, 1, 0)))
        biases.append(jnp.asarray(np.asarray(b, np.float32)))
        channels = w.shape[0]
    taps.append(channels)
    lin_keys = sorted(k for k in tensors if k.startswith("lin"))
    lin = None
    if lin_keys:
        lin = []
        for k, c in enumerate(taps):
            w = tensors.get(f"lin{k}.model.1.weight")
            if w is None or tuple(w.shape) != (1, c, 1, 1):
                got = "missing" if w is None else f"shape {tuple(w.shape)}"
                raise PerceptualWeightsError(f"{path}: lin{k}.model.1.weight is {got}; tap {k} has {c} channels, "
                                             f"expected [1, {c}, 1, 1] for every tap 0..{len(taps) - 1}")
            lin.append(jnp.asarray(np.asarray(w, np.float32).reshape(c)))
        lin = tuple(lin)
    return PerceptualNet(tuple(kernels), tuple(biases), lin, tuple(stage_sizes))
