"""blipserve: serve BLIP and BLIP-2 image-to-text models."""

__version__ = "0.1.0"
