"""Data: image-text records, shard building and checking (img2dataset's webdataset layout),
and the training loader."""
from .images import EncodedImage, ImageError, encode_image, to_rgb
from .records import ImageTextRecord

__all__ = ["ImageTextRecord", "EncodedImage", "ImageError", "encode_image", "to_rgb"]
