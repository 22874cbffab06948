"""What every source is: the Source interface, the files of the release, and the source's credentials.

A module of its own so that the concrete sources (http, dataverse, s3, local) import it, and the package
(`dermaops.sources.open_source`, which picks the concrete source) imports them, without a cycle.
"""

from __future__ import annotations

import base64
import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dermaops.config import DEFAULT_DATAVERSE_URL  # noqa: F401 (re-exported by dermaops.sources)
from dermaops.dataset import ARCHIVES, MASKS_ARCHIVE
from dermaops.errors import StageError
from dermaops.redaction import SOURCE_TOKEN_ENV
from dermaops.sources.transfer import Checksum, Fetched

METADATA_NAMES = ("HAM10000_metadata.csv", "HAM10000_metadata.tab")
# The lesion masks, in order of preference. Harvard Dataverse publishes them (Tschandl et al. 2020) as
# `HAM10000_segmentations_lesion_tschandl.zip`, its members in a folder of that name; ingest stores
# either under MASKS_ARCHIVE, so the same masks give the same dataset version from every source.
MASKS_NAMES = (MASKS_ARCHIVE, "HAM10000_segmentations_lesion_tschandl.zip")
HAM10000_DOI = "doi:10.7910/DVN/DBW86T"
# The source's credentials come from the environment, never from --source: a URL is stored in the DAG
# run's conf, rendered in the UI and shown in process lists. The runner fills these from the Airflow
# connection dermaops.config.SOURCE_CONNECTION (plugins/dermaops_runner/credentials.py): password ->
# token, login -> user, host -> host.
TOKEN_ENV = SOURCE_TOKEN_ENV
USER_ENV = "DERMAOPS_SOURCE_USER"
HOST_ENV = "DERMAOPS_SOURCE_HOST"


@dataclass(frozen=True)
class SourceCredentials:
    """What an http(s) or Dataverse source is sent: with a user, HTTP basic auth (user, token); without,
    the token alone, in the header the source reads it from (Dataverse: `X-Dataverse-key`; a plain base
    URL: `Authorization: Bearer`). With a host, only requests to that host get them (a run triggered with
    another source URL cannot collect the token), and a redirect to another host never carries them."""

    token: str
    user: str | None = None
    host: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SourceCredentials | None:
        environ = os.environ if environ is None else environ
        token = (environ.get(TOKEN_ENV) or "").strip()
        if not token:
            return None
        user, host = (environ.get(USER_ENV) or "").strip(), (environ.get(HOST_ENV) or "").strip().lower()
        return cls(token, user or None, host or None)

    def headers(self, url: str, token_header: str) -> dict[str, str]:
        if self.host and (urlsplit(url).hostname or "") != self.host:
            return {}
        if self.user:
            basic = base64.b64encode(f"{self.user}:{self.token}".encode()).decode()
            return {"Authorization": f"Basic {basic}"}
        return {token_header: f"Bearer {self.token}" if token_header == "Authorization" else self.token}


@dataclass(frozen=True)
class SourceFile:
    name: str  # the file's name in the release, and in the dataset version
    location: str  # URL, s3:// URI or path: what messages name
    size: int | None = None
    checksum: Checksum | None = None  # what the source promises (Dataverse md5), verified after fetching
    stamp: str | None = None  # a cheap change token (ETag, Last-Modified, size+mtime); None when unknown


class Source(ABC):
    kind: str

    @property
    @abstractmethod
    def identity(self) -> str:
        """A normalised description: the same source always gives the same string."""

    @abstractmethod
    def files(self) -> list[SourceFile]:
        """The metadata file first, then the archives, then the lesion masks when the source has them;
        a one-line StageError names a required file that is missing."""

    @abstractmethod
    def fetch(self, file: SourceFile, workdir: Path) -> Fetched:
        """Make the file available locally, verified against `file.checksum` when there is one."""

    @property
    @abstractmethod
    def location(self) -> str:
        """Where it is, for log lines and messages (credentials redacted)."""

    @property
    def key(self) -> str:
        return hashlib.sha256(self.identity.encode()).hexdigest()[:16]

    def fingerprint(self, files: list[SourceFile]) -> dict | None:
        """Change tokens of every file, or None when any is unknown (then only the content decides)."""
        if any(f.stamp is None for f in files):
            return None
        return {f.name: f.stamp for f in files}


def release_files(
    lookup: Callable[[str], SourceFile | None], locate: Callable[[str], str], why: str = ""
) -> list[SourceFile]:
    """Find the metadata (.csv preferred over .tab), the archives and the optional masks with
    `lookup(name)`; a missing required file fails with its location (`locate(name)`) and the reason
    the source gives (`why`). A source without masks gives exactly the files it gave before masks
    existed, so its fingerprint, and the dataset version, stay the same."""
    metadata = next((f for name in METADATA_NAMES if (f := lookup(name)) is not None), None)
    if metadata is None:
        raise StageError(f"no metadata file{why}: {' or '.join(locate(name) for name in METADATA_NAMES)}")
    archives = []
    for name in ARCHIVES:
        found = lookup(name)
        if found is None:
            raise StageError(f"not found{why}: {locate(name)}")
        archives.append(found)
    masks = next((f for name in MASKS_NAMES if (f := lookup(name)) is not None), None)
    return [metadata, *archives, *([masks] if masks else [])]
