"""A Harvard Dataverse dataset (HAM10000: doi:10.7910/DVN/DBW86T) through the native API.

Listing:  GET {server}/api/datasets/:persistentId/?persistentId=<doi>
          -> data.latestVersion.files[].dataFile {id, filename, filesize, md5 | checksum{type,value},
             originalFileName, originalFileFormat, originalFileSize}
Download: GET {server}/api/access/datafile/<id>   (`?format=original` for an ingested tabular file)

Dataverse "ingests" an uploaded CSV into a tab-separated `.tab` file, but the checksum it publishes
is the one of the ORIGINAL upload. So for the metadata we download the original CSV (verifiable,
byte-identical to the release) rather than the derived `.tab`; a `.tab` that was uploaded as such is
taken as it is and converted by ingest.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from dermaops.errors import StageError
from dermaops.redaction import redact
from dermaops.safepath import local_path
from dermaops.sources.base import Source, SourceCredentials, SourceFile, release_files
from dermaops.sources.http import HttpClient, NotFound
from dermaops.sources.transfer import Checksum, Fetched, TransferSettings

# Dataverse's API token header (its `?key=` query parameter would put the token into URLs and logs).
TOKEN_HEADER = "X-Dataverse-key"
HASHLIB_NAMES = {"MD5": "md5", "SHA-1": "sha1", "SHA-256": "sha256", "SHA-512": "sha512"}


class DataverseSource(Source):
    kind = "dataverse"

    def __init__(
        self, server: str, persistent_id: str, settings: TransferSettings, credentials: SourceCredentials | None = None
    ):
        if not server.lower().startswith(("http://", "https://")):
            raise StageError(f"--dataverse-url must be an http(s):// URL, got {server!r}")
        self.server = server.rstrip("/")
        self.persistent_id = persistent_id.strip()
        # A token is only needed for restricted or draft files.
        self.http = HttpClient(settings, credentials, TOKEN_HEADER)

    @property
    def identity(self) -> str:
        return f"dataverse:{self.server}/{self.persistent_id}"

    @property
    def location(self) -> str:
        return redact(f"Dataverse dataset {self.persistent_id} at {self.server}")

    def files(self) -> list[SourceFile]:
        url = f"{self.server}/api/datasets/:persistentId/?persistentId={quote(self.persistent_id, safe=':/')}"
        try:
            listing = self.http.get_json(url)
        except NotFound as exc:
            raise StageError(f"Dataverse dataset {self.persistent_id} not found (HTTP 404): {url}") from exc
        try:
            entries = listing["data"]["latestVersion"]["files"]
        except (KeyError, TypeError) as exc:
            raise StageError(f"unexpected Dataverse response from {url}: no data.latestVersion.files") from exc
        by_name = {}
        for entry in entries:
            file = self._release_file(entry.get("dataFile") or {})
            by_name[file.name] = file
        where = f"Dataverse dataset {self.persistent_id} (it has {', '.join(sorted(by_name))})"
        return release_files(by_name.get, lambda name: f"{name} in {where}")

    def _release_file(self, data_file: dict) -> SourceFile:
        file_id = data_file["id"]
        access = f"{self.server}/api/access/datafile/{file_id}"
        original = data_file.get("originalFileName") or ""
        checksum = _checksum(data_file)
        if original.lower().endswith(".csv"):
            # An ingested CSV: fetch the original upload, which is what the checksum covers.
            name, url, size = original, f"{access}?format=original", data_file.get("originalFileSize")
        else:
            name, url, size = data_file["filename"], access, data_file.get("filesize")
            if original:
                checksum = None  # the checksum covers the original upload, not the derived .tab we fetch
        # A Dataverse file id never changes content (a replaced file gets a new id), so id + checksum
        # is a strong change token without downloading.
        return SourceFile(name, url, size, checksum, stamp=f"id:{file_id};{checksum}")

    def fetch(self, file: SourceFile, workdir: Path) -> Fetched:
        return self.http.download(
            file.name, file.location, local_path(workdir, file.name, "source file"), file.checksum
        )


def _checksum(data_file: dict) -> Checksum | None:
    published = data_file.get("checksum") or {}
    algorithm = HASHLIB_NAMES.get(str(published.get("type", "")).upper())
    if algorithm and published.get("value"):
        return Checksum(algorithm, published["value"])
    if data_file.get("md5"):
        return Checksum("md5", data_file["md5"])
    return None
