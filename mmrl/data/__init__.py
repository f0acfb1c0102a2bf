"""Data: image-text records, shard building and checking (img2dataset's webdataset layout),
and the training loader (:mod:`mmrl.data.loader`)."""
from .images import EncodedImage, ImageError, encode_image, to_rgb
from .records import ImageTextRecord

__all__ = ["ImageTextRecord", "EncodedImage", "ImageError", "encode_image", "to_rgb",
           "LoaderConfig", "TrainLoader", "make_train_loader", "LoaderStallError"]


def __getattr__(name):  # the loader pulls in torch; shard building does not need it
    if name in ("LoaderConfig", "TrainLoader", "make_train_loader"):
        from . import loader

        return getattr(loader, name)
    if name == "LoaderStallError":
        from .wds_stages import LoaderStallError

        return LoaderStallError
    raise AttributeError(f"module 'mmrl.data' has no attribute {name!r}")
