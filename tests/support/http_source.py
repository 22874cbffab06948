"""A loopback HTTP server that serves HAM10000 packs the way the real sources do, with fault injection.

Layouts (pack = a name given to `add_pack`; "28px" and "sample" are the real packs in ../shared/data):

    /plain/<pack>/<file>                 plain base URL: the pack's files as they are
    /plain-tab/<pack>/<file>             same, but the metadata only as Dataverse's .tab export
    /api/datasets/:persistentId/?persistentId=doi:10.5072/FK2/<PACK>     Dataverse native API listing
    /api/access/datafile/<id>[?format=original]                          Dataverse file access

As on Dataverse, the metadata is an "ingested" tabular file: served as .tab, with `?format=original`
giving the original CSV, and the listing's md5 is the one of the original.

Every response supports `Range: bytes=N-` (206) and `If-Range`, and carries a strong ETag and
Last-Modified. Faults (`server.fail`, `server.reset`, `server.truncate`, `server.corrupt`) apply to
requests whose path contains a given fragment; `server.requests` logs every request with its headers.
"""

from __future__ import annotations

import csv
import email.utils
import hashlib
import io
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

METADATA_CSV = "HAM10000_metadata.csv"
METADATA_TAB = "HAM10000_metadata.tab"
DOI_PREFIX = "doi:10.5072/FK2/"


def tab_export(csv_bytes: bytes) -> bytes:
    """Dataverse's archival format for an ingested CSV: tab-separated, strings double-quoted,
    numbers and missing values bare."""
    rows = list(csv.reader(io.StringIO(csv_bytes.decode(), newline="")))
    lines = ["\t".join(rows[0])]
    for row in rows[1:]:
        cells = [v if v == "" or re.fullmatch(r"-?\d+(\.\d+)?", v) else f'"{v}"' for v in row]
        lines.append("\t".join(cells))
    return ("\n".join(lines) + "\n").encode()


@dataclass
class Served:
    """One servable file: bytes on disk (streamed) or in memory."""

    path: Path | None = None
    data: bytes | None = None

    @property
    def size(self) -> int:
        return len(self.data) if self.data is not None else self.path.stat().st_size

    @property
    def etag(self) -> str:
        if self.data is not None:
            return '"' + hashlib.sha256(self.data).hexdigest()[:16] + '"'
        st = self.path.stat()
        return f'"{st.st_size:x}-{st.st_mtime_ns:x}"'

    def read(self, start: int, end: int) -> bytes:
        if self.data is not None:
            return self.data[start:end]
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


@dataclass
class Fault:
    kind: str  # "status" | "reset" | "truncate" | "corrupt"
    path_part: str
    times: int | None  # None = every matching request
    status: int = 503
    after_bytes: int = 0  # reset/truncate: bytes of body sent first; corrupt: offset of the flipped byte
    hits: int = 0

    def take(self, path: str) -> bool:
        if self.path_part not in path or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class PackServer:
    packs: dict[str, Path] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    ranges: bool = True  # False: ignore Range headers, like servers that always send the whole file
    lock: threading.Lock = field(default_factory=threading.Lock)
    _httpd: ThreadingHTTPServer | None = None

    # -- set-up --------------------------------------------------------------------------------
    def add_pack(self, name: str, directory: Path) -> None:
        self.packs[name] = Path(directory)

    def base_url(self, pack: str, tab: bool = False) -> str:
        return f"{self.url}/{'plain-tab' if tab else 'plain'}/{pack}"

    def dataverse_doi(self, pack: str) -> str:
        return DOI_PREFIX + pack.upper()

    def dataverse_url(self, pack: str) -> str:
        return f"{self.url}/dataset.xhtml?persistentId={self.dataverse_doi(pack)}"

    def dataverse_file_id(self, pack: str, name: str) -> int:
        """The Dataverse file id under which the listing serves `name` of `pack`."""
        return next(file_id for file_id, served in self._file_ids(pack).items() if served == name)

    def fail(self, path_part: str, times: int, status: int = 503) -> None:
        self.faults.append(Fault("status", path_part, times, status=status))

    def reset(self, path_part: str, after_bytes: int, times: int = 1) -> None:
        """Send headers and `after_bytes` of body, then reset the connection (TCP RST)."""
        self.faults.append(Fault("reset", path_part, times, after_bytes=after_bytes))

    def truncate(self, path_part: str, after_bytes: int, times: int = 1) -> None:
        """Advertise the full Content-Length, send `after_bytes`, then close cleanly."""
        self.faults.append(Fault("truncate", path_part, times, after_bytes=after_bytes))

    def corrupt(self, path_part: str, offset: int, times: int | None = None) -> None:
        """Flip one byte of the body at file offset `offset` (every time unless `times`)."""
        self.faults.append(Fault("corrupt", path_part, times, after_bytes=offset))

    def logged(self, path_part: str) -> list[Request]:
        with self.lock:
            return [r for r in self.requests if path_part in r.path]

    # -- routing -------------------------------------------------------------------------------
    def _pack_files(self, pack: str) -> dict[str, Served]:
        directory = self.packs[pack]
        files = {p.name: Served(path=p) for p in directory.iterdir() if p.is_file()}
        if METADATA_CSV in files:
            files[METADATA_TAB] = Served(data=tab_export(files[METADATA_CSV].read(0, files[METADATA_CSV].size)))
        return files

    def _file_ids(self, pack: str) -> dict[int, str]:
        index = sorted(self.packs).index(pack)
        names = sorted(n for n in self._pack_files(pack) if n != METADATA_CSV)
        return {1000 * (index + 1) + i: name for i, name in enumerate(names)}

    def resolve(self, raw_path: str) -> tuple[int, Served | dict | None]:
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query)
        segments = [s for s in parts.path.split("/") if s]
        if len(segments) == 3 and segments[0] in ("plain", "plain-tab") and segments[1] in self.packs:
            files = self._pack_files(segments[1])
            if segments[0] == "plain-tab":
                files.pop(METADATA_CSV, None)
            served = files.get(segments[2])
            return (200, served) if served else (404, None)
        if parts.path.rstrip("/") == "/api/datasets/:persistentId":
            doi = query.get("persistentId", [""])[0]
            pack = next((p for p in self.packs if self.dataverse_doi(p) == doi), None)
            return (200, self._listing(pack)) if pack else (404, {"status": "ERROR", "message": "not found"})
        if len(segments) == 4 and segments[:3] == ["api", "access", "datafile"] and segments[3].isdigit():
            for pack in self.packs:
                name = self._file_ids(pack).get(int(segments[3]))
                if name:
                    files = self._pack_files(pack)
                    if name == METADATA_TAB and query.get("format") == ["original"]:
                        name = METADATA_CSV
                    return 200, files[name]
            return 404, None
        return 404, None

    def _listing(self, pack: str) -> dict:
        files = self._pack_files(pack)
        entries = []
        for file_id, name in self._file_ids(pack).items():
            # For the ingested metadata, size and md5 describe the original upload, as on Dataverse.
            source = files[METADATA_CSV] if name == METADATA_TAB else files[name]
            md5 = hashlib.md5(source.read(0, source.size)).hexdigest()
            data_file = {"id": file_id, "filename": name, "filesize": files[name].size, "md5": md5}
            data_file["checksum"] = {"type": "MD5", "value": md5}
            if name == METADATA_TAB:
                data_file |= {
                    "originalFileName": METADATA_CSV,
                    "originalFileFormat": "text/csv",
                    "originalFileSize": source.size,
                    "contentType": "text/tab-separated-values",
                }
            entries.append({"label": name, "restricted": False, "dataFile": data_file})
        return {"status": "OK", "data": {"latestVersion": {"versionState": "RELEASED", "files": entries}}}

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> PackServer:
        server = self

        class Handler(_Handler):
            pack_server = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.handle_error = lambda *_: None  # injected resets make handler threads fail on purpose
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    pack_server: PackServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output quiet; the request log has it all
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        srv = self.pack_server
        request = Request(self.command, self.path, dict(self.headers.items()))
        with srv.lock:
            srv.requests.append(request)
            # Body faults only make sense for a body: a HEAD must not use them up.
            faults = [f for f in srv.faults if (f.kind == "status" or self.command == "GET") and f.take(self.path)]
        status_fault = next((f for f in faults if f.kind == "status"), None)
        if status_fault:
            request.status = status_fault.status
            return self._send_simple(status_fault.status, b"injected failure\n", {"Retry-After": "0"})
        status, served = srv.resolve(self.path)
        request.status = status
        if isinstance(served, dict) or served is None:
            return self._send_simple(status, json.dumps(served or {"error": "not found"}).encode())
        self._send_file(served, body, request, faults)

    def _send_simple(self, status: int, payload: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _send_file(self, served: Served, body: bool, request: Request, faults: list[Fault]) -> None:
        size, etag = served.size, served.etag
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if match and self.pack_server.ranges and (if_range is None or if_range == etag):
            start = int(match.group(1))
            if start >= size:
                request.status = 416
                return self._send_simple(416, b"", {"Content-Range": f"bytes */{size}"})
        request.status = 206 if start else 200
        self.send_response(request.status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes" if self.pack_server.ranges else "none")
        self.send_header("ETag", etag)
        self.send_header("Last-Modified", email.utils.formatdate(0, usegmt=True))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        self.end_headers()
        if not body:
            return
        cut = next((f for f in faults if f.kind in ("reset", "truncate")), None)
        end = min(size, start + cut.after_bytes) if cut else size
        position = start
        while position < end:
            chunk = bytearray(served.read(position, min(end, position + 64 * 1024)))
            for fault in faults:
                if fault.kind == "corrupt" and position <= fault.after_bytes < position + len(chunk):
                    chunk[fault.after_bytes - position] ^= 0xFF
            self.wfile.write(chunk)
            position += len(chunk)
        if cut:
            self.wfile.flush()
            if cut.kind == "reset":
                # SO_LINGER 0: close() sends RST, the client sees "connection reset by peer".
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()
            self.close_connection = True


@pytest.fixture
def http_source(pack_28px, pack_sample):
    """A fresh PackServer (faults and request log per test) serving "28px" and "sample"."""
    server = PackServer()
    for name, directory in (("28px", pack_28px), ("sample", pack_sample)):
        server.add_pack(name, directory)
    server.start()
    yield server
    server.stop()
