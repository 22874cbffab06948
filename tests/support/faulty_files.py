"""Hostile files made from the real data: a JPEG whose header declares another size than its data holds
(30000x30000: a decompression bomb; 600x900 on 600x450 data: a header that lies), zips with a member of
zeros that deflates over 1000:1, a release pack with one image swapped for such a file."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

from dermaops.dataset import ARCHIVES

SOF_MARKERS = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive


def jpeg_declaring(data: bytes, width: int, height: int) -> bytes:
    """The JPEG `data` with its frame header (SOF) declaring width x height; the image data is unchanged."""
    out, i = bytearray(data), 2
    while i + 9 <= len(out):
        marker, length = out[i + 1], int.from_bytes(out[i + 2 : i + 4], "big")
        if marker in SOF_MARKERS:
            out[i + 5 : i + 7] = height.to_bytes(2, "big")
            out[i + 7 : i + 9] = width.to_bytes(2, "big")
            return bytes(out)
        i += 2 + length
    raise ValueError("no frame header found")


def first_jpeg(pack: Path) -> tuple[str, bytes]:
    with zipfile.ZipFile(pack / ARCHIVES[0]) as zf:
        name = sorted(zf.namelist())[0]
        return name, zf.read(name)


def add_zeros_member(archive: Path, name: str, size: int) -> None:
    """Append a deflated member of `size` zero bytes, written in 1 MiB pieces (nothing big in memory)."""
    chunk = bytes(2**20)
    with zipfile.ZipFile(archive, "a", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open(name, "w", force_zip64=True) as member:
            for _ in range(size // len(chunk)):
                member.write(chunk)


def pack_with_image(pack: Path, dest: Path, member: str, data: bytes) -> Path:
    """A copy of the release pack `pack` whose image `member` (in the first archive) has the bytes `data`."""
    dest.mkdir(parents=True)
    for name in ("HAM10000_metadata.csv", *ARCHIVES[1:]):
        shutil.copy(pack / name, dest / name)
    with zipfile.ZipFile(pack / ARCHIVES[0]) as src, zipfile.ZipFile(dest / ARCHIVES[0], "w") as out:
        for info in src.infolist():
            out.writestr(info, data if info.filename == member else src.read(info))
    return dest
