"""Data: image-text records, shard building and checking (img2dataset's webdataset layout),
the training loader (:mod:`mmrl.data.loader`) and its synthetic stand-in (:mod:`mmrl.data.synthetic`)."""
from .images import EncodedImage, ImageError, encode_image, to_rgb
from .records import ImageTextRecord

__all__ = ["ImageTextRecord", "EncodedImage", "ImageError", "encode_image", "to_rgb",
           "LoaderConfig", "TrainLoader", "make_train_loader", "LoaderStallError", "SyntheticLoader",
           "make_synthetic_loader"]


def __getattr__(name):  # the loader pulls in torch; shard building does not need it
    if name in ("LoaderConfig", "TrainLoader", "make_train_loader"):
        from . import loader

        return getattr(loader, name)
    if name == "LoaderStallError":
        from .wds_stages import LoaderStallError

        return LoaderStallError
    if name in ("SyntheticLoader", "make_synthetic_loader"):
        from . import synthetic

        return getattr(synthetic, name)
    raise AttributeError(f"module 'mmrl.data' has no attribute {name!r}")
