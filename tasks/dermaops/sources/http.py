"""Plain http(s): a base URL under which the release files sit, and the HTTP client that the
Dataverse source shares. Error policy: 404/410 and other 4xx are the user's to fix (one line naming
the URL); connection failures, timeouts, 408, 429 and 5xx are retried, then reported as transient."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import requests

from dermaops import __version__
from dermaops.errors import StageError
from dermaops.redaction import redact
from dermaops.safepath import local_path
from dermaops.sources.base import Source, SourceCredentials, SourceFile, release_files
from dermaops.sources.transfer import (
    Checksum,
    Fetched,
    RestartFromZero,
    Retryable,
    Stream,
    TransferSettings,
    fetch_resumable,
    with_retries,
)

RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}
# A chunk being read when the connection breaks is lost; smaller reads lose less and cost nothing here.
READ_SIZE = 256 * 1024
log = logging.getLogger(__name__)


class NotFound(StageError):
    pass


class _Session(requests.Session):
    """requests drops `Authorization` when a redirect leaves the host; a token in another header (Dataverse's
    X-Dataverse-key) would follow the redirect to, e.g., the storage a download is sent to. Not here."""

    token_header = "Authorization"

    def rebuild_auth(self, prepared_request, response) -> None:
        super().rebuild_auth(prepared_request, response)
        if self.should_strip_auth(response.request.url, prepared_request.url):
            prepared_request.headers.pop(self.token_header, None)


class HttpClient:
    def __init__(
        self,
        settings: TransferSettings,
        credentials: SourceCredentials | None = None,
        token_header: str = "Authorization",
    ):
        self.settings = settings
        self.credentials = credentials
        self.session = _Session()
        self.session.token_header = token_header
        # identity: byte counts must match Content-Length and ranges must address the stored bytes.
        self.session.headers.update({"User-Agent": f"dermaops/{__version__}", "Accept-Encoding": "identity"})

    def _send(self, method: str, url: str, **kwargs) -> requests.Response:
        if self.credentials is not None:
            auth = self.credentials.headers(url, self.session.token_header)
            kwargs["headers"] = {**auth, **kwargs.get("headers", {})}
        try:
            return self.session.request(method, url, timeout=self.settings.timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise Retryable(_describe(exc)) from exc

    def _check(self, resp: requests.Response, url: str) -> None:
        code = resp.status_code
        if code < 400:
            return
        resp.close()
        if code in (404, 410):
            raise NotFound(f"not found (HTTP {code}): {url}")
        if code in RETRYABLE_STATUS:
            raise Retryable(f"HTTP {code} {resp.reason}", _retry_after(resp))
        if code in (401, 403):
            raise StageError(f"access denied (HTTP {code}) to {url}; check the credentials or the dataset's terms")
        raise StageError(f"HTTP {code} {resp.reason} for {url}")

    def head(self, url: str) -> requests.Response | None:
        """Headers of `url` (None when it does not exist). Falls back to a GET whose body is never read
        for servers that refuse HEAD."""

        def call() -> requests.Response | None:
            resp = self._send("HEAD", url, allow_redirects=True)
            if resp.status_code in (405, 501):
                resp = self._send("GET", url, stream=True)
                resp.close()
            try:
                self._check(resp, url)
            except NotFound:
                return None
            return resp

        return with_retries(url, call, self.settings)

    def get_json(self, url: str) -> dict:
        def call() -> dict:
            resp = self._send("GET", url, headers={"Accept": "application/json"})
            self._check(resp, url)
            try:
                return resp.json()
            except ValueError as exc:
                raise StageError(f"not a JSON response from {url}") from exc

        return with_retries(url, call, self.settings)

    def download(self, name: str, url: str, dest: Path, expected: Checksum | None = None) -> Fetched:
        validator: str | None = None  # ETag or Last-Modified of the first response, sent back as If-Range

        @contextmanager
        def open_at(offset: int) -> Iterator[Stream]:
            nonlocal validator
            headers = {}
            if offset:
                headers["Range"] = f"bytes={offset}-"
                if validator:
                    # If the file changed since the partial download, the server answers 200 (whole new file).
                    headers["If-Range"] = validator
            resp = self._send("GET", url, headers=headers, stream=True)
            with resp:
                if resp.status_code == 416:
                    raise RestartFromZero("range not satisfiable")
                self._check(resp, url)
                etag = resp.headers.get("ETag")
                validator = etag if etag and not etag.startswith("W/") else resp.headers.get("Last-Modified")
                start, total = _extent(resp)
                yield Stream(_chunks(resp), start, total)

        return fetch_resumable(name, url, open_at, dest, self.settings, expected)


class HttpSource(Source):
    kind = "http"

    def __init__(self, base_url: str, settings: TransferSettings, credentials: SourceCredentials | None = None):
        self.base_url = base_url.rstrip("/")
        self.http = HttpClient(settings, credentials)

    @property
    def identity(self) -> str:
        return f"http:{redact(self.base_url)}"

    @property
    def location(self) -> str:
        return redact(self.base_url)

    def url(self, name: str) -> str:
        """<base>/<name>, the query string (if any) kept after the path."""
        parts = urlsplit(self.base_url)
        return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))

    def files(self) -> list[SourceFile]:
        return release_files(self._lookup, self.url, " (HTTP 404)")

    def _lookup(self, name: str) -> SourceFile | None:
        url = self.url(name)
        resp = self.http.head(url)
        if resp is None:
            return None
        length = resp.headers.get("Content-Length")
        return SourceFile(name, url, int(length) if length else None, stamp=_stamp(resp))

    def fetch(self, file: SourceFile, workdir: Path) -> Fetched:
        return self.http.download(file.name, file.location, local_path(workdir, file.name, "source file"))


def _stamp(resp: requests.Response) -> str | None:
    """A strong ETag, else Last-Modified with the length; None when the server gives neither
    (then every run downloads and the content decides)."""
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return f"etag:{etag}"
    modified = resp.headers.get("Last-Modified")
    if modified:
        return f"modified:{modified};length:{resp.headers.get('Content-Length')}"
    return None


def _extent(resp: requests.Response) -> tuple[int, int | None]:
    """(first byte served, full size) from a 200 or 206 response."""
    length = resp.headers.get("Content-Length")
    if resp.status_code == 206:
        # Content-Range: bytes <first>-<last>/<size or *>
        spec = resp.headers.get("Content-Range", "")
        try:
            first_last, _, size = spec.removeprefix("bytes ").partition("/")
            first, last = (int(v) for v in first_last.split("-"))
        except ValueError as exc:
            raise RestartFromZero(f"unreadable Content-Range {spec!r}") from exc
        return first, int(size) if size.isdigit() else last + 1
    return 0, int(length) if length and length.isdigit() else None


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    try:
        yield from resp.iter_content(READ_SIZE)
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        raise Retryable(_describe(exc)) from exc


def _retry_after(resp: requests.Response) -> float | None:
    value = resp.headers.get("Retry-After", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None


def _describe(exc: Exception) -> str:
    # requests nests the root cause several levels deep; its last line is what a reader needs.
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
