"""The one list of image file extensions of the project (as timm's ``img_extensions.py``).

Every place that recognises an image by its name imports it from here: :mod:`trainer.data.image_source` (which
files of a folder are images) and :mod:`trainer.data.stream` (which field of a WebDataset sample holds
the encoded image). The decoders read more formats than this (any PIL format, see
:mod:`trainer.data.decode`); the list says which names count as images when nothing else does.
"""

from __future__ import annotations

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm",
                                     ".pgm")
"""Image file name suffixes, lower case with the dot (compare with ``os.path.splitext(name)[1].lower()``)."""

IMAGE_FIELDS: tuple[str, ...] = tuple(e[1:] for e in IMAGE_EXTENSIONS) + ("image", "img")
"""WebDataset sample fields looked up, in this order, for the encoded image: the extensions without the dot,
then the generic ``image`` / ``img``."""
