"""The training set held on the device: decoded once into a uint8 tensor (imagenette train,
9,469 x 3 x 64 x 64, is 116 MB), batches drawn by a permutation per epoch on the device. On a GPU
this removes the JPEG decode and the host-to-device copy from every step, which otherwise cap a
fast accelerator far below its speed; on a CPU it saves the decoding workers."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch
from phisearch.indexer.sources.loader import first_samples

log = logging.getLogger(__name__)


class ResidentData:
    def __init__(self, urls: list[str], device: torch.device, seed: int) -> None:
        images = np.stack([s.image for s in first_samples(urls, None)])   # (N, 64, 64, 3)
        self.x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
        self.device = device
        self.g = torch.Generator(device=device).manual_seed(seed)
        log.info("%d training images resident on %s (%.0f MB)", len(self.x), device,
                 self.x.numel() / 2**20)

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """(B, 3, 64, 64) float in [0, 1] on the device, forever; every image once per epoch."""
        n = len(self.x)
        while True:
            perm = torch.randperm(n, generator=self.g, device=self.device)
            for i in range(0, n - batch_size + 1, batch_size):
                yield self.x[perm[i:i + batch_size]].float().div_(255.0)
