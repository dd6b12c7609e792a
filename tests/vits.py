"""Tiny vision transformers (issue 31, item 3): timm's ViT and Swin and torchvision's, small enough that a trace,
the statistics and an ONNX export take about a second each, with seeded weights."""

from __future__ import annotations

import torch
from torch import nn


def timm_vit(seed: int = 0, **kw: object) -> nn.Module:
    """timm's ViT: 32x32 images, 4x4 patches (65 tokens with the class token), 2 blocks, 48 wide, 4 heads of 12."""
    import timm

    torch.manual_seed(seed)
    args = {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 4, "num_classes": 10}
    return timm.create_model("vit_tiny_patch16_224", **{**args, **kw}).eval()


def timm_swin(seed: int = 0) -> nn.Module:
    """timm's Swin: 32x32 images, 2x2 patches, windows of 4x4 (shifted in every second block), 2 stages of 2
    blocks (32 wide, 2 heads of 16; then 64 wide, 4 heads of 16)."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=32, patch_size=2, window_size=4, embed_dim=32,
                             depths=(2, 2), num_heads=(2, 4), num_classes=10).eval()


def timm_mobilevit(seed: int = 0) -> nn.Module:
    """timm's MobileViT-XXS (convolutions, then transformers of 4 heads over unfolded patches), random weights."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model("mobilevit_xxs", num_classes=10).eval()


def tv_vit(seed: int = 0) -> nn.Module:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(image_size=32, patch_size=4, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=10).eval()


def tv_swin(seed: int = 0) -> nn.Module:
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(seed)
    return SwinTransformer(patch_size=[2, 2], embed_dim=24, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4],
                           num_classes=10).eval()


def images(n: int, seed: int) -> torch.Tensor:
    """Smooth random images (a 8x8 field upsampled, plus a little noise): tokens that correlate, as real ones do."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 3, 8, 8, generator=g)
    return nn.functional.interpolate(coarse, size=32, mode="bilinear") + 0.1 * torch.randn(n, 3, 32, 32, generator=g)
