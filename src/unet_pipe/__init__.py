"""unet-pipe: the U-Net of Ronneberger et al. (2015) as a reproducible EM segmentation pipeline."""
from __future__ import annotations

__version__ = "0.1.0"
