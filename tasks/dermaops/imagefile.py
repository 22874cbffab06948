"""Opening an image file's bytes for decoding: the one place that does it, so one pixel limit holds for
every decode (the image cache that train and train_baseline read, validate's image facts, predict).

A JPEG or PNG header declares its size in a few bytes; decoding then allocates width x height x 3 bytes
whatever the file's own size: a 30000x30000 image in a small file asks for 2.7 GB. `open_image` reads the
header only (PIL opens lazily), and refuses an image over MAX_PIXELS before a single pixel is decoded, with
one line naming the image and its declared size (a StageError: exit 2, not a crash that is retried). PIL's
own guard (Image.MAX_IMAGE_PIXELS, a process-wide setting) stays as it is: it fires only far above this
limit, and is turned into the same error.
"""

from __future__ import annotations

import io

from dermaops.errors import StageError

# HAM10000's originals are 600x450 (0.27 MP); dermatoscopes and phone cameras stay well under 50 MP. 50 MP
# decodes to 150 MB of RGB, which every stage can hold while it resizes the image away.
MAX_PIXELS = 50_000_000


class ImageTooLarge(StageError):
    """An image declares more pixels than MAX_PIXELS (a decompression bomb, or not a dermatoscopic photo)."""


def _refusal(name: str, size: str) -> ImageTooLarge:
    return ImageTooLarge(
        f"{name} declares {size}, over the limit of {MAX_PIXELS / 1e6:g} megapixels for any image "
        "(a decompression bomb, or not a dermatoscopic photograph): remove it or downscale it"
    )


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's or PNG's header without PIL's guard, for the message about an image that
    PIL refused to open; None for other formats."""
    from PIL import JpegImagePlugin, PngImagePlugin

    for image_class in (JpegImagePlugin.JpegImageFile, PngImagePlugin.PngImageFile):
        try:
            with image_class(io.BytesIO(data)) as image:  # parses the header only
                return image.size
        except Exception:  # noqa: BLE001 - not this format
            continue
    return None


def open_image(data: bytes, name: str):
    """PIL.Image of `data`, opened lazily (nothing decoded yet) and checked against MAX_PIXELS; use it as a
    context manager. `name` says which image this is in messages (e.g. "image ISIC_0024306")."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        size = declared_size(data)
        raise _refusal(name, f"{size[0]}x{size[1]} pixels" if size else "more pixels than PIL allows") from None
    width, height = image.size
    if width * height > MAX_PIXELS:
        image.close()
        raise _refusal(name, f"{width}x{height} pixels")
    return image


# -- JPEG data that does not fit its header ------------------------------------------------------------
# libjpeg decodes such a file without an error (PIL drops its warnings): a header that declares more rows
# than the data holds gets them filled with the last block's colour, one that declares fewer leaves the rest
# of the data unread. Both are found by decoding at the smallest DCT scale (cheap): how far into the scan
# the decoder read, and whether junk placed before the end marker changes the pixels (it only can when the
# decoder ran out of data).
_READ_BLOCKS = 256  # PIL hands the decoder the file in this many pieces: where it stopped is known to 1/256
_JUNK = bytes(range(1, 255)) * 4  # entropy-coded-looking bytes: no 0xFF, so no marker


def _scan_end(data: bytes) -> int | None:
    """Offset of the EOI marker that ends the image's (last) scan, walking the marker segments to the first
    scan; None when the file is not laid out like a JPEG (PIL then says what is wrong when it decodes)."""
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        if data[i + 1] == 0xFF:  # fill byte
            i += 1
            continue
        if data[i + 1] == 0xDA:  # start of scan: entropy-coded data, where 0xFF 0xD9 only ever means EOI
            end = data.find(b"\xff\xd9", i)
            return end if end > 0 else None
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def _smallest_decode(data: bytes) -> tuple[bytes, int]:
    """(pixels at the smallest DCT scale, how many bytes the decoder was handed)."""
    stream = io.BytesIO(data)
    with open_image(data, "image") as probe:
        size = probe.size
    from PIL import Image

    with Image.open(stream) as image:
        image.draft(image.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
        image.decodermaxblock = max(16, len(data) // _READ_BLOCKS)
        image.load()
        return image.tobytes(), stream.tell()


def jpeg_mismatch(data: bytes) -> str | None:
    """What is wrong when a JPEG's image data does not fit the width x height its header declares, else None
    (also for what is not a JPEG, or is too broken to decode: the decode that follows reports those)."""
    end = _scan_end(data) if data.startswith(b"\xff\xd8") else None
    if end is None:
        return None
    try:
        pixels, handed = _smallest_decode(data)
        padded, _ = _smallest_decode(data[:end] + _JUNK + data[end:])
        with open_image(data, "image") as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError, StageError):
        return None
    if padded != pixels:
        return f"its header declares {width}x{height} pixels but its image data ends before them"
    if handed < end:  # it stopped before the end of the data, whatever PIL had handed it
        return f"its header declares {width}x{height} pixels but {end - handed:,} bytes of image data follow them"
    return None
