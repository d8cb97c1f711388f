"""Foreground masks from torchvision's Mask R-CNN (optional helper for FAF / BAF).

Das & Huddar measure the foreground attention fraction against Mask R-CNN masks
when no ground-truth segmentation exists. :func:`load_maskrcnn` builds torchvision's
``maskrcnn_resnet50_fpn`` and loads weights only from a local file (or torch hub's
cache): nothing is downloaded. :func:`foreground_masks` turns its detections into one
boolean foreground mask per image, ready for
:func:`captum_vit.metrics.foreground_fraction`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["foreground_masks", "load_maskrcnn"]


def load_maskrcnn(
    weights: str | os.PathLike[str] | None = None,
    *,
    num_classes: int = 91,
    **kwargs: Any,
) -> nn.Module:
    """torchvision's Mask R-CNN (ResNet-50 FPN) in eval mode, from local weights.

    Args:
        weights (str or PathLike, optional): a state-dict file. ``None`` looks for
            torchvision's COCO checkpoint (``MaskRCNN_ResNet50_FPN_Weights.DEFAULT``)
            in torch hub's cache. Default: None
        num_classes (int, optional): classes of the box / mask heads (COCO: 91).
            Default: 91
        **kwargs: passed to ``torchvision.models.detection.maskrcnn_resnet50_fpn``
            (e.g. ``min_size``, ``max_size``).

    Returns:
        nn.Module: the detector, eval mode.

    Raises:
        FileNotFoundError: when no weights file is found (nothing is downloaded).

    Example::

        >>> detector = load_maskrcnn("maskrcnn_resnet50_fpn_coco.pth")
        >>> fg = foreground_masks(detector, images01)
    """
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn

    if weights is None:
        url = MaskRCNN_ResNet50_FPN_Weights.DEFAULT.url
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    else:
        path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(
            f"Mask R-CNN weights not found at {path}; download torchvision's "
            "maskrcnn_resnet50_fpn COCO checkpoint there (or pass weights=<file>), or use "
            "ground-truth masks instead"
        )
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def foreground_masks(
    detector: nn.Module,
    images: Tensor | Sequence[Tensor],
    *,
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    labels: Sequence[int] | None = None,
) -> Tensor:
    """Union of the detected instance masks of each image.

    Pixel ``x`` of image ``i`` is foreground when some detection with score
    ``>= score_threshold`` (and, when ``labels`` is given, a label in ``labels``) has
    mask probability ``>= mask_threshold`` at ``x``.

    Args:
        detector (nn.Module): a torchvision Mask R-CNN in eval mode
            (:func:`load_maskrcnn`).
        images (Tensor or Sequence[Tensor]): ``(B, 3, H, W)`` or a list of
            ``(3, H, W)`` float images in ``[0, 1]`` (not normalised: the detector
            normalises itself). Use the images the explained model sees (after its
            resize / crop) so that the masks line up.
        score_threshold (float, optional): minimum detection score. Default: 0.5
        mask_threshold (float, optional): minimum mask probability. Default: 0.5
        labels (Sequence[int], optional): keep only these detector classes.
            Default: None (every class)

    Returns:
        Tensor: bool ``(B, H, W)`` when the images share a size; otherwise a
        stacked tensor is impossible and ``ValueError`` is raised (pass equally sized
        images).

    Example::

        >>> fg = foreground_masks(detector, images01, labels=[17, 18])   # cats, dogs
        >>> faf, baf = foreground_fraction(grid, fg)
    """
    if not 0.0 <= score_threshold <= 1.0 or not 0.0 <= mask_threshold <= 1.0:
        raise ValueError("score_threshold and mask_threshold must be in [0, 1]")
    batch = list(images.unbind(0)) if isinstance(images, Tensor) else list(images)
    if not batch:
        raise ValueError("images is empty")
    for im in batch:
        if not isinstance(im, Tensor) or im.ndim != 3 or im.shape[0] != 3 or not im.is_floating_point():
            raise ValueError("images must be float (3, H, W) tensors in [0, 1]")
    sizes = {tuple(im.shape[-2:]) for im in batch}
    if len(sizes) != 1:
        raise ValueError(f"images have different sizes {sorted(sizes)}; pass equally sized images")
    if detector.training:
        raise ValueError("the detector must be in eval mode (detector.eval())")
    with torch.no_grad():
        outputs = detector(batch)
    masks = []
    for im, out in zip(batch, outputs, strict=True):
        keep = out["scores"] >= score_threshold
        if labels is not None:
            keep &= torch.isin(out["labels"], torch.as_tensor(list(labels), device=out["labels"].device))
        inst = out["masks"][keep]  # (K, 1, H, W) probabilities
        if inst.numel() == 0:
            masks.append(torch.zeros(im.shape[-2:], dtype=torch.bool, device=im.device))
        else:
            masks.append((inst[:, 0] >= mask_threshold).any(dim=0))
    return torch.stack(masks)
