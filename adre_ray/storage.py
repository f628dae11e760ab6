"""Local paths and storage URIs (``s3://``, ``gs://``, ``file://``, ...) through pyarrow's filesystems.

``resolve(path)`` gives ``(filesystem, path inside it)``: a local path -> ``LocalFileSystem`` and the
absolute path; a URI -> ``pyarrow.fs.FileSystem.from_uri``. For ``s3://`` the endpoint comes from the
URI's ``endpoint_override`` query, else ``$AWS_ENDPOINT_URL_S3``, else ``$AWS_ENDPOINT_URL`` (the AWS
SDKs' variables; S3-compatible stores such as MinIO or a local test server), credentials and region from
the usual ``AWS_*`` variables. No Ray, no hand-written clients.

Object stores have no atomic rename, but an object becomes visible whole or not at all: a single PUT,
and a multipart upload too, which S3 and GCS show only once it is completed. ``write_bytes_atomic``
therefore writes a local file through a hidden temporary file + ``os.replace``, and an object from the
finished bytes in one ``write`` to pyarrow's S3 output stream. pyarrow sends them as a multipart upload
(pyarrow 25 starts one when the stream opens, for any size; large objects are cut into parts of 5-10 MB)
and completes it when the stream is closed; older versions may use a single PUT for small objects.
Readers never see a partial object either way. A failed write raises ``OSError`` whose ``filename`` is
the object's URI (without its query string).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import pyarrow.fs as pafs

TMP_SUFFIX = ".tmp"


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for a plain local path."""
    text = str(path)
    scheme = urlsplit(text).scheme
    return "://" in text and len(scheme) > 1


def is_remote(path: str | os.PathLike[str]) -> bool:
    """A URI other than ``file://`` (object storage or another remote filesystem)."""
    return is_uri(path) and urlsplit(str(path)).scheme != "file"


def local_path(path: str | os.PathLike[str]) -> Path:
    """The canonical local path of a plain path or a ``file://`` URI: ``~`` expanded, made absolute,
    symlinks and ``..`` resolved, no trailing slash. Two spellings of one folder give one path.
    ``ValueError`` for a remote URI (it has no local path)."""
    text = str(path)
    if is_remote(text):
        raise ValueError(f"path={text!r}: a remote URI has no local path")
    if is_uri(text):
        parts = urlsplit(text)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"path={text!r}: a file:// URI of another host ({parts.netloc!r})")
        text = unquote(parts.path)
    return Path(text).expanduser().resolve()


def endpoint_override() -> str | None:
    """The S3 endpoint from ``$AWS_ENDPOINT_URL_S3`` or ``$AWS_ENDPOINT_URL`` (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _with_endpoint(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme not in ("s3", "s3a"):
        return uri
    query = dict(parse_qsl(parts.query))
    endpoint = endpoint_override()
    if endpoint and "endpoint_override" not in query:
        query["endpoint_override"] = endpoint
        if endpoint.startswith("http://"):
            query.setdefault("scheme", "http")
    return urlunsplit(("s3", parts.netloc, parts.path, urlencode(query), parts.fragment))


def resolve(path: str | os.PathLike[str]) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path inside it)`` for a local path or a URI; ``ValueError`` naming a bad URI."""
    text = str(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    parts = urlsplit(text)
    if parts.username or parts.password:  # the URI is recorded (run.json, rows, MLflow) and shipped to Ray
        shown = urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))
        raise ValueError(f"path={shown!r}: credentials in a storage URI are refused (they would be written "
                         "to run.json, MLflow and Ray's logs); give them to every node instead (AWS_* "
                         "variables, a credentials file, an instance role)")
    try:
        return pafs.FileSystem.from_uri(_with_endpoint(text))
    except (ValueError, OSError) as err:  # pyarrow.ArrowInvalid is a ValueError
        raise ValueError(f"path={text!r}: not a storage URI pyarrow can open ({err})") from err


def join(base: str | os.PathLike[str], name: str) -> str:
    """``base/name`` for a local path or a URI (a URI's query string is kept at the end)."""
    text = str(base)
    if not is_uri(text):
        return str(Path(text).expanduser() / name)
    parts = urlsplit(text)
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + "/" + name, parts.query, ""))


def identity(path: str | os.PathLike[str]) -> str:
    """How a path is recorded (manifests, rows, MLflow): a URI as given, a local path made absolute."""
    text = str(path)
    return text if is_uri(text) else str(Path(text).expanduser().resolve())


def file_type(path: str | os.PathLike[str]) -> pafs.FileType:
    fs, inner = resolve(path)
    return fs.get_file_info(inner).type


def list_files(folder: str | os.PathLike[str]) -> list[str]:
    """Base names of the files directly in ``folder`` ([] when it does not exist)."""
    fs, inner = resolve(folder)
    infos = fs.get_file_info(pafs.FileSelector(inner, allow_not_found=True))
    return sorted(info.base_name for info in infos if info.type == pafs.FileType.File)


def walk_files(folder: str | os.PathLike[str]) -> tuple[str, list[pafs.FileInfo]]:
    """``(root, infos)``: every file below ``folder`` at any depth ([] when it does not exist), as
    pyarrow ``FileInfo`` whose ``path`` is inside the filesystem of ``resolve(folder)`` (``root``: the
    folder's own path there, no trailing slash). ``OSError`` when the store refuses the listing."""
    fs, inner = resolve(folder)
    root = inner.rstrip("/")
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return root, [info for info in infos if info.type == pafs.FileType.File]


def as_uri_of(folder: str | os.PathLike[str], inner_path: str) -> str:
    """``inner_path`` (a path inside ``resolve(folder)``'s filesystem) written the way ``folder`` is: with
    the folder's scheme for a URI (``s3://bucket/key``), as it is for a local path."""
    text = str(folder)
    return f"{urlsplit(text).scheme}://{inner_path}" if is_remote(text) else inner_path


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    fs, inner = resolve(path)
    with fs.open_input_stream(inner) as stream:
        return stream.read()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Make ``path`` hold ``data``, whole or not at all (see the module docstring)."""
    if not is_remote(path):
        target = Path(urlsplit(str(path)).path if is_uri(path) else path).expanduser()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return
    fs, inner = resolve(path)
    try:
        with fs.open_output_stream(inner) as stream:  # all bytes at once: one PUT, or one multipart upload
            stream.write(data)
    except OSError as err:  # pyarrow's errors name no object: name it
        raise OSError(err.errno, err.strerror or str(err), display_uri(path)) from err


def display_uri(path: str | os.PathLike[str]) -> str:
    """``path`` fit for a message: a URI without its query string (which may carry keys)."""
    text = str(path)
    if not is_uri(text):
        return text
    parts = urlsplit(text)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def local_copy(path: str | os.PathLike[str]) -> Path:
    """A local file with ``path``'s bytes: ``path`` itself when local, else a download into a per-URI
    cache file under the temp folder (re-downloaded when the object's size or mtime changed)."""
    if not is_uri(path):
        return Path(path).expanduser()
    fs, inner = resolve(path)
    info = fs.get_file_info(inner)
    if info.type != pafs.FileType.File:
        raise ValueError(f"path={str(path)!r}: no such file")
    if isinstance(fs, pafs.LocalFileSystem):
        return Path(inner)
    key = hashlib.sha256(f"{path}|{info.size}|{info.mtime_ns}".encode()).hexdigest()[:24]
    target = Path(tempfile.gettempdir()) / "adre_ray_cache" / key / info.base_name
    if not (target.is_file() and target.stat().st_size == info.size):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            with fs.open_input_stream(inner) as stream, open(tmp, "wb") as handle:
                while chunk := stream.read(1 << 22):
                    handle.write(chunk)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return target


STORAGE_ENV_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
                    "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE",
                    "GOOGLE_APPLICATION_CREDENTIALS")
"""Variables that select an object store and where a node finds its credentials (endpoint, region,
profile, the paths of credential files); Ray jobs pass the driver's to their actors and workers. No key is
among them: a ``runtime_env`` is written to Ray's logs (``runtime_env_agent.log``, world-readable)."""

CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
"""Keys that are never handed to Ray: actors and workers read them from their node's own credential chain
(the environment their raylet started with, credential files, an instance role). A private cluster that
a job starts inherits the driver's environment, so they reach its workers without being passed."""


def storage_env() -> dict[str, str]:
    """The driver's ``STORAGE_ENV_VARS`` that are set (for a Ray ``runtime_env``; never a key)."""
    return {name: os.environ[name] for name in STORAGE_ENV_VARS if os.environ.get(name)}
