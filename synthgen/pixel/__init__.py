"""The pixel generator kind: a taxonomy-conditioned UNet that draws whole chips (`synthgen.pixel.generator`)."""

from synthgen.pixel.generator import PixelGenerator

__all__ = ["PixelGenerator"]
