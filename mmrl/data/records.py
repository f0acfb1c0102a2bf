"""The unit every input format is turned into before sharding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImageTextRecord:
    """One image with its caption(s).

    ``image`` is a local file path (absolute, or resolved by the reader). ``captions`` holds
    every caption of the image (COCO and Karpathy have five); the first one becomes the
    sample's ``.txt`` and all of them go to its ``.json``. ``source`` names where the record
    came from (e.g. ``"csv:train.tsv"``) and ``meta`` carries extra JSON-serialisable fields
    (source ids, split, category) copied into the sample's ``.json``.
    """

    image: str
    captions: list[str]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def caption(self) -> str:
        return self.captions[0] if self.captions else ""
