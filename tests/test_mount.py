"""The mount driven by real programs: cp -a, tar, git, rsync, mv, and a Python program
(docs/design.md §10, layer 4). Every result is compared with the same work on a local directory."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster import Cluster
from mount_harness import Mount, mounted, require_fuse, run, tree_listing

from dfs.chunks import CHUNK_SIZE

pytestmark = pytest.mark.mount
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fuse_ok() -> None:
    require_fuse()


@pytest.fixture(scope="module")
def mnt(fuse_ok: None, shared_cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
        ) -> Iterator[Mount]:
    with mounted(shared_cluster, tmp_path_factory.mktemp("mnt")) as m:
        yield m


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source tree with what trips file systems up: a multi-chunk file, an empty file and
    directory, symlinks (one dangling), odd modes, foreign owners, old mtimes."""
    src = tmp_path_factory.mktemp("src") / "tree"
    shutil.copytree(REPO / "dfs", src / "dfs", ignore=shutil.ignore_patterns("__pycache__"))
    (src / "bin").mkdir()
    (src / "bin" / "big.dat").write_bytes(os.urandom(3 * CHUNK_SIZE + 12345))
    (src / "bin" / "run.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(src / "bin" / "run.sh", 0o755)
    os.chmod(src / "bin" / "big.dat", 0o640)
    (src / "empty").write_bytes(b"")
    (src / "emptydir").mkdir()
    (src / "private").mkdir(mode=0o700)
    (src / "private" / "key").write_text("k")
    os.chmod(src / "private" / "key", 0o600)
    os.symlink("dfs/errors.py", src / "link")
    os.symlink("nowhere/at/all", src / "dangling")
    if os.geteuid() == 0:
        os.chown(src / "bin" / "run.sh", 1234, 5678)
    os.utime(src / "empty", (1_000_000_000, 1_000_000_000))
    return src


def test_cp_a_then_diff(mnt: Mount, source_tree: Path) -> None:
    run("cp", "-a", source_tree, mnt / "cp")
    run("diff", "-r", "--no-dereference", source_tree, mnt / "cp")
    assert tree_listing(mnt / "cp") == tree_listing(source_tree)


def test_tar_create_and_extract_inside(mnt: Mount, source_tree: Path, tmp_path: Path) -> None:
    archive = tmp_path / "src.tar"
    run("tar", "cf", archive, "-C", source_tree, ".")
    (mnt / "tar").mkdir()
    run("tar", "xpf", archive, "-C", mnt / "tar")
    run("diff", "-r", "--no-dereference", source_tree, mnt / "tar")
    assert tree_listing(mnt / "tar") == tree_listing(source_tree)
    # An archive made inside the mount, of the mount, extracts to the same tree.
    run("tar", "cf", mnt / "again.tar", "-C", mnt / "tar", ".")
    out = tmp_path / "out"
    out.mkdir()
    run("tar", "xpf", mnt / "again.tar", "-C", out)
    run("diff", "-r", "--no-dereference", source_tree, out)
    assert tree_listing(out) == tree_listing(source_tree)


def test_git_init_add_commit_log_status(mnt: Mount, source_tree: Path) -> None:
    repo = mnt / "git"
    repo.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(repo)}

    def git(*args: str) -> str:
        return run("git", *args, cwd=repo, env=env).stdout

    git("init", "-q", "-b", "main")
    shutil.copytree(source_tree / "dfs", repo / "dfs")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    (repo / "dfs" / "errors.py").write_text("# changed\n")
    assert git("status", "--porcelain").split() == ["M", "dfs/errors.py"]
    git("commit", "-q", "-am", "second")
    assert git("status", "--porcelain") == ""
    assert git("log", "--format=%s").split() == ["second", "first"]
    git("fsck", "--strict")
    git("gc", "-q")  # packs: mmap, rename, fsync of pack files
    assert git("log", "--format=%s").split() == ["second", "first"]
    assert git("show", "HEAD~1:dfs/errors.py") == (source_tree / "dfs" / "errors.py").read_text()


def test_rsync_archive_and_update(mnt: Mount, source_tree: Path, tmp_path: Path) -> None:
    local = tmp_path / "tree"
    shutil.copytree(source_tree, local, symlinks=True)
    run("rsync", "-a", f"{local}/", mnt / "rsync")
    run("diff", "-r", "--no-dereference", local, mnt / "rsync")
    assert tree_listing(mnt / "rsync") == tree_listing(local)
    # Nothing changed: a second run transfers nothing.
    again = run("rsync", "-a", "--itemize-changes", f"{local}/", mnt / "rsync").stdout
    assert again.strip() == ""
    # A changed file (rsync writes a temp file and renames it over the old one).
    (local / "dfs" / "errors.py").write_text("new content\n")
    run("rsync", "-a", "--delete", f"{local}/", mnt / "rsync")
    assert (mnt / "rsync" / "dfs" / "errors.py").read_text() == "new content\n"
    # And back out of the mount.
    back = tmp_path / "back"
    run("rsync", "-a", f"{mnt / 'rsync'}/", back)
    run("diff", "-r", "--no-dereference", local, back)


def python_program(root: Path) -> dict[str, object]:
    """open/seek/write/truncate/rename/fsync, as an editor or a database would."""
    seen: dict[str, object] = {}
    path = root / "prog.dat"
    with open(path, "w+b") as f:
        f.write(b"0123456789" * 1000)
        f.seek(5)
        f.write(b"HELLO")
        f.seek(20_000)
        f.write(b"tail")  # a hole from 10000 to 20000
        f.flush()
        seen["size_after_writes"] = os.fstat(f.fileno()).st_size
        f.truncate(15_000)
        f.seek(0)
        seen["head"] = f.read(12)
        os.fsync(f.fileno())
        seen["end"] = f.seek(0, os.SEEK_END)
    tmp = root / "prog.tmp"
    with open(tmp, "wb") as f:
        f.write(open(path, "rb").read()[::-1])
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)  # the atomic-replace idiom
    data = path.read_bytes()
    seen["final_len"] = len(data)
    seen["final_tail"] = data[-12:]
    seen["zeros"] = data.count(0)
    with open(path, "r+b") as f:  # update in place, without O_TRUNC
        f.seek(1)
        f.write(b"X")
    seen["in_place"] = path.read_bytes()[:4]
    seen["listing"] = sorted(os.listdir(root))
    return seen


def test_python_program_matches_local_disk(mnt: Mount, tmp_path: Path) -> None:
    (mnt / "prog").mkdir()
    assert python_program(mnt / "prog") == python_program(tmp_path)


def test_mv_across_directories(mnt: Mount, tmp_path: Path) -> None:
    a, b = mnt / "mv-a", mnt / "mv-b"
    (a / "sub").mkdir(parents=True)
    b.mkdir()
    (a / "f").write_bytes(b"file")
    (a / "sub" / "g").write_bytes(b"in sub")
    run("mv", a / "f", b / "f2")
    run("mv", a / "sub", b)
    assert sorted(os.listdir(a)) == []
    assert (b / "f2").read_bytes() == b"file"
    assert (b / "sub" / "g").read_bytes() == b"in sub"
    # Across file systems both ways: mv copies and unlinks.
    (tmp_path / "local").write_bytes(b"from local")
    run("mv", tmp_path / "local", b / "local")
    assert (b / "local").read_bytes() == b"from local"
    run("mv", b / "sub", tmp_path / "sub")
    assert (tmp_path / "sub" / "g").read_bytes() == b"in sub"
    assert not (b / "sub").exists()
