"""Videos: open-loop predictions (truth | model | error) and eval episodes, encoded with imageio.

TensorBoard's add_video needs moviepy; instead frames are encoded as a GIF here and written as an
image summary, which TensorBoard animates. The same frames are saved as .gif/.mp4 in the run dir.
"""
from __future__ import annotations

import io
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from torch import Tensor


def open_loop_grid(truth: Tensor, model: Tensor) -> np.ndarray:
    """truth, model: uint8 (N, T, 3, H, W) -> frames (T, N*H, 3*W, 3): truth | model | error per row."""
    error = (truth.float() - model.float()).abs().clamp(0, 255).to(torch.uint8)
    rows = torch.cat([truth, model, error], dim=-1)  # (N, T, 3, H, 3W)
    grid = torch.cat(list(rows), dim=-2)  # (T, 3, N*H, 3W)
    return grid.permute(0, 2, 3, 1).cpu().numpy()


def rgb(frames: np.ndarray) -> np.ndarray:
    """(T, H, W, C) frames with 3 channels: one gray channel is repeated."""
    return np.repeat(frames, 3, -1) if frames.shape[-1] == 1 else frames


def encode_gif(frames: np.ndarray, fps: int = 10) -> bytes:
    buf = io.BytesIO()
    iio.imwrite(buf, rgb(frames), extension=".gif", duration=1000 / fps, loop=0)
    return buf.getvalue()


def add_gif(writer, tag: str, frames: np.ndarray, step: int, fps: int = 10) -> None:
    """Write frames (T, H, W, 3 or 1) uint8 as an animated image summary."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    T, H, W, _ = frames.shape
    image = Summary.Image(height=H, width=W, colorspace=3, encoded_image_string=encode_gif(frames, fps))
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)


def save_video(path: Path, frames: np.ndarray, fps: int = 20) -> Path:
    """Save (T, H, W, 3 or 1) uint8 frames as a GIF (always readable, no ffmpeg needed)."""
    path = Path(path).with_suffix(".gif")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_gif(frames, fps))
    return path
