"""A local directory holding the release files (e.g. ../shared/data/ham10000-28px)."""

from __future__ import annotations

from pathlib import Path

from dermaops.errors import StageError
from dermaops.sources.base import Source, SourceFile, release_files
from dermaops.sources.transfer import Fetched, TransferSettings, hash_in_place


class LocalSource(Source):
    kind = "local"

    def __init__(self, directory: Path, settings: TransferSettings):
        self.directory = directory.expanduser().resolve()
        self.settings = settings

    @property
    def identity(self) -> str:
        return f"local:{self.directory}"

    @property
    def location(self) -> str:
        return str(self.directory)

    def files(self) -> list[SourceFile]:
        if not self.directory.is_dir():
            raise StageError(f"--source directory does not exist: {self.directory}")
        return release_files(self._lookup, lambda name: str(self.directory / name))

    def _lookup(self, name: str) -> SourceFile | None:
        path = self.directory / name
        if not path.is_file():
            return None
        st = path.stat()
        # size + mtime is what rsync and make trust; a rewrite that keeps both is not worth a full read.
        return SourceFile(name, str(path), st.st_size, stamp=f"{st.st_size}:{st.st_mtime_ns}")

    def fetch(self, file: SourceFile, workdir: Path) -> Fetched:
        # Read in place: the directory may be read-only, and a copy would only cost time and disk.
        return hash_in_place(file.name, Path(file.location), file.location, self.settings)
