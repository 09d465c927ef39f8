"""Images into the LLM without a vision encoder: patch embedding, pixel shuffle, projector.

    pixels [N, 3, S, S] -> (uint8: ImageNet mean/std, fp32) -> Conv2d(14 px) -> + class/position embedding (class token dropped)
      -> [N, g, g, D] -> pixel shuffle (0.5) -> [N, g/2 * g/2, 4D] -> mlp1 -> [N, tokens, H]

Exactly InternVL's `InternVisionEmbeddings` + `extract_feature` for Mono-InternVL (whose
"vision model" is the embeddings only).

Input pixels: uint8 RGB tiles (what the data workers ship: 4x less shared memory and
host->device traffic than fp32) are normalised here, on the model's device, with InternVL's
ImageNet mean/std in fp32, then cast to the model dtype (`normalise_pixels`). A float input
is taken as already normalised and only cast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from evip.model.config import ModelConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)      # InternVL's build_transform (T.Normalize)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalise_pixels(pixel_values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, S, S] RGB -> (x / 255 - mean) / std, computed in fp32 on x's device as
    x * (1 / (255 std)) + (-mean / std), then cast to `dtype`. Any float input is already
    normalised: only cast. The one normalisation arithmetic of the project (data-side float
    tiles use it too), so the uint8 and float paths give the same values bit for bit."""
    if pixel_values.dtype != torch.uint8:
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values has dtype {pixel_values.dtype}: expected uint8 RGB tiles "
                            "(0..255) or already-normalised float tiles")
        return pixel_values.to(dtype)
    dev = pixel_values.device
    # made on the host and sent without waiting: torch.tensor(..., device=gpu) is a blocking copy (a sync)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).to(dev, non_blocking=True).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).to(dev, non_blocking=True).view(1, 3, 1, 1)
    x = pixel_values.to(torch.float32).mul_(1.0 / (255.0 * std)).add_(-mean / std)
    return x.to(dtype)


def pixel_shuffle(x: torch.Tensor, scale_factor: float = 0.5) -> torch.Tensor:
    """InternVL's "v2" pixel shuffle; x [n, w, h, c] -> [n, w*s, h*s, c/s^2]."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    x = x.permute(0, 2, 1, 3).contiguous()
    return x


class PatchEmbedding(nn.Module):
    """Conv patchify + class and (bicubically interpolated) position embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.vision_hidden_size
        self.grid = cfg.grid
        self.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.empty(1, 1, d))
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + cfg.grid * cfg.grid, d))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Class/position embeddings ~ normal(0, 0.02) (the conv initialises itself)."""
        nn.init.normal_(self.class_embedding, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.02)

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:, :]
        dtype = pos.dtype
        pos = pos.float().reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
        return pos.reshape(1, -1, h * w).permute(0, 2, 1).to(dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] (uint8 RGB, or float already normalised) -> [N, g*g, D] patch tokens
        (class token dropped after adding positions)."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(normalise_pixels(pixel_values, dtype))         # [N, D, gh, gw]
        n, _, gh, gw = patches.shape
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(n, 1, -1).to(dtype)
        emb = torch.cat([cls, patches], dim=1)
        pos = torch.cat([self.position_embedding[:, :1, :], self._pos_embed(gh, gw)], dim=1)
        emb = emb + pos.to(dtype)
        return emb[:, 1:, :]


def build_projector(cfg: ModelConfig) -> nn.Sequential:
    """`mlp1`: LayerNorm(4D) -> Linear(4D, H) -> GELU -> Linear(H, H) (for ratio 0.5)."""
    d_in = int(cfg.vision_hidden_size / (cfg.downsample_ratio ** 2))
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, cfg.hidden_size), nn.GELU(),
                         nn.Linear(cfg.hidden_size, cfg.hidden_size))


def shuffle_patches(patch_tokens: torch.Tensor, downsample_ratio: float) -> torch.Tensor:
    """[N, g*g, D] -> [N, (g*r)^2, D/r^2], InternVL's reshape -> pixel_shuffle -> reshape."""
    n, num, d = patch_tokens.shape
    g = int(round(num ** 0.5))
    x = pixel_shuffle(patch_tokens.reshape(n, g, g, d), scale_factor=downsample_ratio)
    return x.reshape(n, x.shape[1] * x.shape[2], x.shape[3])
