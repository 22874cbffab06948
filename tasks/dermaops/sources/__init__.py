"""Where `ingest` reads the official HAM10000 release from.

Four kinds of source offer the same files under the same names (`HAM10000_metadata.csv` or
Dataverse's tab-separated `HAM10000_metadata.tab`, `HAM10000_images_part_1.zip`, `_part_2.zip`, and
optionally the lesion masks, `HAM10000_segmentations_lesion.zip` or, as the Dataverse release names
them, `HAM10000_segmentations_lesion_tschandl.zip`):

    https://host/path                 a plain base URL: <base>/<file name>
    https://host/dataset.xhtml?persistentId=doi:...  or  doi:...   a Dataverse dataset (native API)
    s3://bucket/prefix                an S3 prefix: <prefix>/<file name>
    /a/local/directory                a directory (file:// URLs too)
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from dermaops.errors import StageError
from dermaops.sources.base import (
    DEFAULT_DATAVERSE_URL,
    HAM10000_DOI,
    HOST_ENV,
    MASKS_NAMES,
    METADATA_NAMES,
    TOKEN_ENV,
    USER_ENV,
    Source,
    SourceCredentials,
    SourceFile,
    release_files,
)
from dermaops.sources.transfer import TransferSettings

__all__ = [
    "DEFAULT_DATAVERSE_URL", "HAM10000_DOI", "HOST_ENV", "MASKS_NAMES", "METADATA_NAMES", "TOKEN_ENV", "USER_ENV",
    "Source", "SourceCredentials", "SourceFile", "open_source", "release_files",
]  # fmt: skip

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def open_source(
    spec: str,
    settings: TransferSettings,
    dataverse_url: str = DEFAULT_DATAVERSE_URL,
    credentials: SourceCredentials | None = None,
) -> Source:
    """Parse `--source` into a Source, or fail with one line listing what is accepted. `credentials` go to
    http(s) and Dataverse sources (an s3:// source uses the artifact store's)."""
    from dermaops.sources.dataverse import DataverseSource
    from dermaops.sources.http import HttpSource
    from dermaops.sources.local import LocalSource
    from dermaops.sources.s3 import S3Source

    spec = spec.strip()
    if spec.lower().startswith("doi:"):
        return DataverseSource(dataverse_url, spec, settings, credentials)
    match = _SCHEME.match(spec)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("http", "https"):
        parts = urlsplit(spec)
        persistent_id = parse_qs(parts.query).get("persistentId")
        if persistent_id:
            return DataverseSource(f"{parts.scheme}://{parts.netloc}", persistent_id[0], settings, credentials)
        return HttpSource(spec, settings, credentials)
    if scheme == "s3":
        return S3Source(spec, settings)
    if scheme == "file":
        return LocalSource(Path(urlsplit(spec).path), settings)
    if scheme or not spec:
        raise StageError(
            f"unsupported --source {spec!r}: expected an http(s):// base URL, a Dataverse dataset URL or doi:..., "
            "an s3://bucket/prefix or a local directory"
        )
    return LocalSource(Path(spec), settings)
