"""Any gymnasium observation space as what the world model reads: an image and/or a vector.

`ModelObservations` is a gymnasium wrapper that maps the env's observation space, whatever it is, to

- "pixels": uint8 (S, S, C), from the one image among the observation's parts: any Box of uint8 with
  2 dims (H, W: grayscale) or 3 (H, W, C or C, H, W; an alpha channel is dropped), resized to the
  model's image size S (bilinear), optionally converted to grayscale (C = 1);
- "observation": float32 (D,), every other part flattened and concatenated: Box of any rank (and of
  any float or int dtype), Discrete and MultiDiscrete one-hot, MultiBinary as 0/1.

Dict and Tuple observations are walked part by part (nested ones too). Parts that cannot be modelled
(Text, Graph, Sequence, ...) are dropped with one notice naming them; a space with nothing left, or
with several images, is an EnvError that says what to do. The result is a Box (vector only) or a
Dict with "pixels" and/or "observation", which TorchRL turns into those keys.
"""
from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
from gymnasium import spaces

CHANNELS = (1, 3, 4)  # gray, RGB, RGBA


class ObservationError(ValueError):
    """An observation space that cannot be modelled; one line that says why and what to do."""


def _flat(space: spaces.Space, prefix: str = "") -> list[tuple[str, spaces.Space]]:
    """(key path, leaf space) for every leaf of a Dict / Tuple space, in order."""
    if isinstance(space, spaces.Dict):
        return [leaf for k, s in space.spaces.items() for leaf in _flat(s, f"{prefix}{k}.")]
    if isinstance(space, spaces.Tuple):
        return [leaf for i, s in enumerate(space.spaces) for leaf in _flat(s, f"{prefix}{i}.")]
    return [(prefix.rstrip(".") or "observation", space)]


def _get(obs, path: str):
    if path == "observation" and not isinstance(obs, (dict, tuple)):
        return obs
    for part in path.split("."):
        obs = obs[int(part)] if isinstance(obs, tuple) else obs[part]
    return obs


def image_layout(space: spaces.Space) -> str | None:
    """'hwc', 'chw' or 'hw' for a uint8 Box that is an image, else None."""
    if not isinstance(space, spaces.Box) or space.dtype != np.uint8:
        return None
    shape = space.shape
    if len(shape) == 2 and min(shape) > 1:
        return "hw"
    if len(shape) == 3:
        if shape[-1] in CHANNELS:
            return "hwc"
        if shape[0] in CHANNELS:
            return "chw"
    return None


def vector_size(space: spaces.Space) -> int | None:
    """Entries of the flattened float vector a part becomes, or None if it cannot be modelled."""
    if isinstance(space, spaces.Box):
        return int(np.prod(space.shape))
    if isinstance(space, spaces.Discrete):
        return int(space.n)
    if isinstance(space, spaces.MultiDiscrete):
        return int(np.sum(space.nvec))
    if isinstance(space, spaces.MultiBinary):
        return int(np.prod(space.shape))
    return None


def _to_vector(space: spaces.Space, x) -> np.ndarray:
    if isinstance(space, spaces.Discrete):
        out = np.zeros(space.n, np.float32)
        out[int(x) - int(space.start)] = 1.0
        return out
    if isinstance(space, spaces.MultiDiscrete):
        flat_n, flat_x = np.asarray(space.nvec).reshape(-1), np.asarray(x).reshape(-1) - np.asarray(space.start).reshape(-1)
        return np.concatenate([np.eye(int(n), dtype=np.float32)[int(v)] for n, v in zip(flat_n, flat_x)])
    return np.asarray(x, np.float32).reshape(-1)


def auto_size(h: int, w: int) -> int:
    """The model's image side when none is set: the env's own where it is square and a power of two
    from 8 up (the memory suite's 16 x 16 stays 16 x 16), else 64 (DreamerV3's)."""
    return h if h == w and h >= 8 and h & (h - 1) == 0 else 64


class ModelObservations(gym.ObservationWrapper):
    def __init__(self, env: gym.Env, image_size: int = 0, grayscale: bool = False):
        super().__init__(env)
        leaves = _flat(env.observation_space)
        images = [(k, s, image_layout(s)) for k, s in leaves if image_layout(s)]
        vectors = [(k, s) for k, s in leaves if not image_layout(s) and vector_size(s) is not None]
        dropped = [f"{k} ({type(s).__name__})" for k, s in leaves if not image_layout(s) and vector_size(s) is None]
        if dropped:
            warnings.warn(f"observation parts that cannot be modelled are dropped: {', '.join(dropped)}", stacklevel=2)
        if len(images) > 1:
            raise ObservationError(f"several image observations ({', '.join(k for k, *_ in images)}); "
                                   "keep one with a gymnasium wrapper (e.g. FilterObservation) before longdream sees the env")
        if not images and not vectors:
            raise ObservationError(f"nothing to model in the observation space {env.observation_space}")
        self.image = images[0] if images else None
        self.vectors = vectors
        out = {}
        if self.image is not None:
            key, space, layout = self.image
            h, w = (space.shape[:2] if layout in ("hwc", "hw") else space.shape[1:])
            c = 1 if layout == "hw" or grayscale else (space.shape[-1] if layout == "hwc" else space.shape[0])
            self.size = image_size or auto_size(h, w)
            self.channels = 1 if grayscale else min(c, 3)
            self.grayscale = grayscale
            out["pixels"] = spaces.Box(0, 255, (self.size, self.size, self.channels), np.uint8)
        if vectors:
            out["observation"] = spaces.Box(-np.inf, np.inf, (sum(vector_size(s) for _, s in vectors),), np.float32)
        self.observation_space = out["observation"] if list(out) == ["observation"] else spaces.Dict(out)

    def _image(self, x: np.ndarray) -> np.ndarray:
        from PIL import Image

        _, _, layout = self.image
        x = np.asarray(x, np.uint8)
        if layout == "chw":
            x = x.transpose(1, 2, 0)
        if layout == "hw":
            x = x[..., None]
        x = x[..., :3]  # drop alpha
        img = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
        if self.grayscale and x.shape[-1] == 3:
            img = img.convert("L")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        out = np.array(img, np.uint8)  # a writable copy
        return out[..., None] if out.ndim == 2 else out

    def observation(self, obs):
        out = {}
        if self.image is not None:
            out["pixels"] = self._image(_get(obs, self.image[0]))
        if self.vectors:
            out["observation"] = np.concatenate([_to_vector(s, _get(obs, k)) for k, s in self.vectors])
        return out["observation"] if isinstance(self.observation_space, spaces.Box) else out
