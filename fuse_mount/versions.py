"""`.versions` in every directory: its files' kept versions, read-only (docs/mount.md,
"Versions and snapshots"; the history itself is docs/coordinator.md, "Version history").

    D/.versions/            one directory per regular file of D, named as the file
    D/.versions/NAME/       one file per version of D/NAME (the kept ones and the current one)
    D/.versions/NAME/3      version 3's bytes, size and mtime; mode without write bits

Three node kinds (virtual.py), one per level. A FileVersions node is per (D, NAME, inode), so a
hard link's other name is another directory (the kernel allows no second name for one) and a
name that now means another file gets a new node; a VersionFile is per (inode, version), whose
content never changes, so its pages may stay in the kernel's cache.
"""

from __future__ import annotations

from dfs.client.attr import Attr
from dfs.errors import Code, DfsError
from fuse_mount.virtual import (
    Node,
    Page,
    VirtualDir,
    VirtualFile,
    VirtualTree,
    dir_attr,
)

VERSIONS = b".versions"
#: The longest name of a version number looked up (2**64 has 20 digits).
NUMBER_DIGITS_MAX = 20


def version_number(name: bytes) -> int | None:
    """The version a name means: decimal digits, no sign and no leading zero, else None."""
    if not name.isdigit() or len(name) > NUMBER_DIGITS_MAX or (name[:1] == b"0" and name != b"0"):
        return None
    return int(name)


async def history(tree: VirtualTree, ino: int) -> list[Attr]:
    """The file's versions, newest first, the current one included."""
    return await tree.remote.call(tree.client.history, ino)


class VersionsDir(VirtualDir):
    """D/.versions: a directory per regular file of D."""

    def __init__(self, directory: int) -> None:
        super().__init__(directory)
        self.directory = directory

    async def fetch(self, tree: VirtualTree) -> Attr:
        real = await tree.remote.call(tree.client.getattr, self.directory)
        return self.remember(dir_attr(real, self.ino))

    def _file(self, tree: VirtualTree, name: bytes, attr: Attr) -> FileVersions:
        node = tree.node(("versions-of", self.directory, name, attr.ino),
                         lambda: FileVersions(self.ino, attr.ino))
        node.remember(dir_attr(attr, node.ino))
        return node

    async def child(self, tree: VirtualTree, name: bytes) -> Node | None:
        try:
            attr = await tree.remote.call(tree.client.lookup, self.directory, name)
        except DfsError as e:
            if e.code is Code.ENOENT:
                return None
            raise
        return self._file(tree, name, attr) if attr.is_file() else None

    async def page(self, tree: VirtualTree, after: int, limit: int) -> Page:
        batch = await tree.remote.call(tree.client.readdir, self.directory, after, limit)
        entries: list[tuple[bytes, int, Node]] = [
            (name, cookie, self._file(tree, name, attr))
            for name, cookie, attr in batch if attr.is_file()
        ]
        return Page(entries, batch[-1][1] if batch else after, len(batch) < limit)


class FileVersions(VirtualDir):
    """D/.versions/NAME: a file per version of D/NAME, named by its number; the cookie of
    version v is v + 1, so a listing in pages skips nothing while versions come and go."""

    def __init__(self, parent: int, file: int) -> None:
        super().__init__(parent)
        self.file = file

    async def fetch(self, tree: VirtualTree) -> Attr:
        real = await tree.remote.call(tree.client.getattr, self.file)
        if not real.is_file():  # cannot happen: inode numbers are never reused
            raise DfsError(Code.ENOENT, f"inode {self.file} is no regular file")
        return self.remember(dir_attr(real, self.ino))

    def _version(self, tree: VirtualTree, content: Attr) -> VersionFile:
        node = tree.node(("version", self.file, content.version),
                         lambda: VersionFile(self.ino, self.file, content.version))
        node.shows(content)
        return node

    async def child(self, tree: VirtualTree, name: bytes) -> Node | None:
        number = version_number(name)
        if number is None:
            return None
        try:
            content = await tree.remote.call(tree.client.version, self.file, number)
        except DfsError as e:
            if e.code is Code.ENOENT:
                return None
            raise
        return self._version(tree, content)

    async def page(self, tree: VirtualTree, after: int, limit: int) -> Page:
        versions = sorted(await history(tree, self.file), key=lambda a: a.version)
        entries: list[tuple[bytes, int, Node]] = [
            (str(a.version).encode(), a.version + 1, self._version(tree, a))
            for a in versions if a.version + 1 > after
        ][:limit]
        last = entries[-1][1] if entries else after
        return Page(entries, last, len(entries) < limit or last == versions[-1].version + 1)


class VersionFile(VirtualFile):
    """D/.versions/NAME/N: version N of the file, read-only."""

    def __init__(self, parent: int, file: int, version: int) -> None:
        super().__init__(parent)
        self.file = file
        self.version = version

    async def fetch(self, tree: VirtualTree) -> Attr:
        return self.shows(await tree.remote.call(tree.client.version, self.file, self.version))
