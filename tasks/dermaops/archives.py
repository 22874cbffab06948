"""Reading zip archives we did not write (the release's image zips, a batch to predict): size limits first.

A zip's central directory declares each member's uncompressed size, and deflate reaches ratios over
1000:1, so a 0.7 MB zip can hold a 512 MiB member that a reader would take into memory whole. Every
member is checked against its declared size and compression ratio BEFORE any of it is read
(`check_member`, `check_archive`), and read through `read_member`, which never returns more than the
declared size (zipfile stops there and checks the CRC). A refusal is one line naming the archive, the
member and the limit (a StageError, exit 2).

The limits are far above the release: HAM10000's JPEGs are under 0.5 MB and barely compress (ratio
about 1.0), its lesion masks are small PNGs.
"""

from __future__ import annotations

import zipfile

from dermaops.errors import StageError

MAX_MEMBER_BYTES = 64 * 2**20  # one image file; a 50-megapixel JPEG (dermaops.imagefile's limit) fits
MAX_RATIO = 100  # uncompressed / compressed, for members (and whole archives) over RATIO_FROM_BYTES
RATIO_FROM_BYTES = 2**20  # smaller members may compress as they like: they cannot add up to much


class ArchiveTooLarge(StageError):
    """A zip member (or a whole zip) that declares more than the limits allow."""


def check_member(info: zipfile.ZipInfo, archive: str) -> None:
    """StageError when the member declares more than MAX_MEMBER_BYTES or compresses more than MAX_RATIO."""
    where = f"{archive}: member {info.filename}"
    if info.file_size > MAX_MEMBER_BYTES:
        raise ArchiveTooLarge(
            f"{where} declares {info.file_size:,} bytes uncompressed, over the limit of {MAX_MEMBER_BYTES // 2**20} "
            "MiB for one file (a zip bomb, or not an image): refusing to read it"
        )
    if info.file_size > RATIO_FROM_BYTES and info.file_size > MAX_RATIO * max(info.compress_size, 1):
        raise ArchiveTooLarge(
            f"{where} declares {info.file_size:,} bytes from {info.compress_size:,} compressed, a ratio over the "
            f"limit of {MAX_RATIO}:1 (a zip bomb; images barely compress): refusing to read it"
        )


def check_archive(zf: zipfile.ZipFile, archive: str, archive_bytes: int) -> None:
    """Every member checked, and their total: many small members of zeros are a bomb too."""
    total = 0
    for info in zf.infolist():
        if not info.is_dir():
            check_member(info, archive)
            total += info.file_size
    if total > RATIO_FROM_BYTES and total > MAX_RATIO * max(archive_bytes, 1):
        raise ArchiveTooLarge(
            f"{archive} declares {total:,} bytes uncompressed in all from {archive_bytes:,}, a ratio over the limit "
            f"of {MAX_RATIO}:1 (a zip bomb): refusing to read it"
        )


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, archive: str) -> bytes:
    """The member's bytes, after `check_member`; zipfile stops at the declared size (and checks the CRC), so
    no more than MAX_MEMBER_BYTES is ever held."""
    check_member(info, archive)
    with zf.open(info) as member:
        return member.read(MAX_MEMBER_BYTES + 1)
