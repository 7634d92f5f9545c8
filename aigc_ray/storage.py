"""Storage: the one module that reads, writes, lists and publishes files at a storage location.

    aigc-ray train --storage s3://my-bucket/gans ...        # or gs://..., an NFS mount, a local folder

A storage location is a URI: `s3://bucket/prefix`, `gs://bucket/prefix` (any pyarrow filesystem URI), or a
plain path (a local folder or a shared mount). Everything goes through pyarrow's filesystems, as Ray
Train's own storage layer does, and `ray_storage` hands Ray Train/Tune the same filesystem object, so
runs, checkpoints, searches, reports, caches and served models all live at one place that every node of
a cluster can reach. S3 credentials and endpoint come from the usual environment (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL for an S3-compatible server, an instance profile on EC2).

Publishing is atomic for a reader, locally and on object stores: a file is written under a temporary
name and renamed (locally) or appears whole with its single PUT (object stores), and `publish_dir`
writes a folder's files first and its marker file (a checkpoint's meta.json) last.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from .config import ConfigError


class StorageError(ConfigError):
    """A storage location cannot be used (missing bucket, no access, unreachable, not found); one line."""


@dataclass(frozen=True)
class Entry:
    uri: str  # the file's full URI (or local path)
    name: str  # its path relative to the listed folder, '/'-separated
    size: int
    mtime_ns: int
    is_dir: bool


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def root(cfg) -> str:
    """Where a config's runs, searches and caches live: its run.storage, normalized. The storage travels in the
    config (never beside it) and becomes a location here, once, for every command and module alike."""
    return normalize(cfg.run.storage)


def normalize(uri: str | os.PathLike) -> str:
    """A canonical form: absolute local paths (~ expanded), remote URIs without a trailing '/'."""
    uri = str(uri)
    if "\x00" in uri:
        raise StorageError(f"storage: {uri!r} holds a NUL byte; no file system takes that")
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError:
        raise StorageError(f"storage: {uri.encode('utf-8', 'backslashreplace').decode()!r} is not valid UTF-8") from None
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.strip('/')}"
    return str(Path(uri).expanduser().absolute())


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_remote(uri):
        return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(Path(uri, *parts))


def name(uri: str) -> str:
    """The last component of a URI or path."""
    return str(uri).rstrip("/").rsplit("/", 1)[-1]


def parent(uri: str) -> str:
    uri = str(uri).rstrip("/")
    return uri.rsplit("/", 1)[0] if is_remote(uri) else str(Path(uri).parent)


@lru_cache(maxsize=None)
def _s3() -> pafs.S3FileSystem:
    # Short timeouts and few retries: a wrong endpoint fails in seconds, not after minutes of backoff.
    return pafs.S3FileSystem(endpoint_override=os.environ.get("AWS_ENDPOINT_URL") or None,
                             region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or None,
                             connect_timeout=5, request_timeout=120,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a URI or local path."""
    uri = normalize(uri)
    if uri.startswith("s3://"):
        return _s3(), uri[len("s3://"):]
    if is_remote(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except (OSError, ValueError) as e:
            raise StorageError(f"storage: cannot use {uri}: {_first_line(e)}") from None
    return pafs.LocalFileSystem(), uri


def ray_storage(uri: str) -> dict:
    """storage_path and storage_filesystem for ray.train.RunConfig / ray.tune.RunConfig."""
    fs, path = filesystem(uri)
    if not is_remote(uri):
        return {"storage_path": path}
    return {"storage_path": path, "storage_filesystem": fs}


def from_fs_path(path: str, like: str) -> str:
    """A path inside `like`'s filesystem (as Ray reports checkpoint paths) as a URI of the same kind."""
    if not is_remote(like) or is_remote(path):
        return normalize(path)
    return f"{normalize(like).split('://', 1)[0]}://{path.strip('/')}"


# ----------------------------------------------------------------------------------------------------
# Errors: pyarrow's AWS/GCS messages turned into one line a user can act on.


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _explain(e: BaseException, uri: str) -> StorageError:
    msg = str(e)
    if "NO_SUCH_BUCKET" in msg or "bucket does not exist" in msg.lower():
        bucket = normalize(uri).split("://", 1)[-1].split("/", 1)[0]
        return StorageError(f"storage: bucket {bucket!r} does not exist ({uri})")
    if any(k in msg for k in ("INVALID_ACCESS_KEY_ID", "ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "Forbidden",
                              "EXPIRED_TOKEN", "InvalidAccessKeyId", "AccessDenied")):
        return StorageError(f"storage: access to {uri} denied: check the credentials (AWS_ACCESS_KEY_ID/"
                            "AWS_SECRET_ACCESS_KEY, an instance profile) and their permissions")
    if "NETWORK_CONNECTION" in msg or "Could not connect" in msg or "resolve host" in msg.lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL") or "the object store"
        return StorageError(f"storage: cannot reach {endpoint} for {uri} (is AWS_ENDPOINT_URL right, "
                            "the server up?)")
    if isinstance(e, FileNotFoundError):
        return StorageError(f"storage: {uri} does not exist")
    return StorageError(f"storage: {uri}: {_first_line(e)}")


@contextlib.contextmanager
def _errors(uri: str):
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise _explain(e, uri) from None


# ----------------------------------------------------------------------------------------------------
# Reading, writing, listing.


def info(uri: str) -> Entry | None:
    """The file or folder at uri, or None when nothing is there."""
    fs, path = filesystem(uri)
    with _errors(uri):
        fi = fs.get_file_info(path)
    if fi.type == pafs.FileType.NotFound:
        return None
    return Entry(uri, name(uri), fi.size or 0, fi.mtime_ns or 0, fi.type == pafs.FileType.Directory)


def exists(uri: str) -> bool:
    return info(uri) is not None


def is_dir(uri: str) -> bool:
    e = info(uri)
    return e is not None and e.is_dir


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with _errors(uri):
        with fs.open_input_stream(path) as f:
            return f.read()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode()


def write_bytes(uri: str, data: bytes) -> str:
    """Write a file whole: a reader sees the old content or the new, never a part."""
    fs, path = filesystem(uri)
    with _errors(uri):
        if not is_remote(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:  # an object appears whole when its upload completes
            with fs.open_output_stream(path) as f:
                f.write(data)
    return uri


def write_text(uri: str, text: str) -> str:
    return write_bytes(uri, text.encode())


def mkdir(uri: str) -> None:
    fs, path = filesystem(uri)
    with _errors(uri):
        fs.create_dir(path, recursive=True)


def list_dir(uri: str, recursive: bool = False) -> list[Entry]:
    """Entries under a folder (sorted by name); [] when the folder does not exist."""
    fs, path = filesystem(uri)
    with _errors(uri):
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
    base = path.rstrip("/") + "/"
    out = [Entry(join(uri, fi.path[len(base):]), fi.path[len(base):], fi.size or 0, fi.mtime_ns or 0,
                 fi.type == pafs.FileType.Directory) for fi in infos if fi.path.startswith(base)]
    return sorted(out, key=lambda e: e.name)


def delete(uri: str) -> None:
    """Remove a file or a folder tree; nothing there is fine."""
    fs, path = filesystem(uri)
    e = info(uri)
    if e is None:
        return
    with _errors(uri):
        if e.is_dir:
            fs.delete_dir(path)
        else:
            fs.delete_file(path)


def publish_dir(local: str | Path, uri: str, last: str | None = None, skip: tuple[str, ...] = ()) -> str:
    """Copy a local folder's files to uri, `last` (a marker such as meta.json) after all the others."""
    local = Path(local)
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.name not in skip)
    for p in sorted(files, key=lambda p: p.name == last):
        write_bytes(join(uri, p.relative_to(local).as_posix()), p.read_bytes())
    return uri


def copy_dir(src: str, dst: str, last: str | None = None) -> str:
    """Copy every file under src to dst (any two storage locations), `last` after all the others."""
    files = [e for e in list_dir(src, recursive=True) if not e.is_dir]
    for e in sorted(files, key=lambda e: e.name.rsplit("/", 1)[-1] == last):
        write_bytes(join(dst, e.name), read_bytes(e.uri))
    return dst


def download_dir(uri: str, local: str | Path) -> Path:
    local = Path(local)
    for e in list_dir(uri, recursive=True):
        if not e.is_dir:
            dest = local / e.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(read_bytes(e.uri))
    return local


@contextlib.contextmanager
def local_dir(uri: str) -> Iterator[Path]:
    """A local folder holding uri's files: the folder itself when local, else a temporary download."""
    if not is_remote(uri):
        yield Path(normalize(uri))
        return
    tmp = Path(tempfile.mkdtemp(prefix="aigc_storage_"))
    try:
        yield download_dir(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check(uri: str) -> str:
    """Fail now, with one line, if uri cannot be written (missing bucket, bad credentials, unreachable)."""
    uri = normalize(uri)
    if not is_remote(uri):
        p = Path(uri)
        while not p.exists():
            p = p.parent
        if not p.is_dir() or not os.access(p, os.W_OK):
            raise StorageError(f"storage: cannot write under {uri} ({p} is not a writable folder)")
        return uri
    fs, path = filesystem(uri)
    probe = f"{path}/.aigc_ray_probe-{uuid.uuid4().hex[:8]}"
    with _errors(uri):  # the message names the location the user gave, not the probe
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    return uri
