"""Declared paths that are URLs: object stores and other fsspec filesystems.

Owns: telling a URL from a local path, the one normal form of a URL (edges
match on it), a URL's identity from the store's own metadata (ETag, checksum
or generation, and size; never a download), whether a URL can be reached
(with the cause in words: cannot connect, no such bucket, permission denied,
not there), and the `storage:` options of nbflow.yaml per protocol. fsspec and
the store's package (s3fs, gcsfs, adlfs) are imported only when a URL is used.
Credentials are never read here: they come from the environment or the
store's own config files, through the store's package.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from typing import Any, Mapping

from .errors import PipelineError, Problem

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# what to install for a protocol fsspec knows but cannot import
EXTRAS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "abfs": "adlfs", "az": "adlfs",
          "abfss": "adlfs", "adl": "adlfs", "http": "aiohttp", "https": "aiohttp"}
# metadata keys that change whenever an object's content does, in order of preference (S3, GCS, Azure, others)
_IDENTITY_KEYS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "checksum", "content_md5")


def is_url(declared: str) -> bool:
    """A URL of another filesystem than the local one (`file://` is a local path)."""
    found = _SCHEME.match(declared)
    return found is not None and found.group(1).lower() != "file"


def local_path_of(declared: str) -> str:
    """`file:///data/x.csv` -> `/data/x.csv`; anything else unchanged."""
    return declared[len("file://"):] if declared.lower().startswith("file://") else declared


def protocol_of(url: str) -> str:
    found = _SCHEME.match(url)
    assert found is not None, url
    return found.group(1).lower()


def normalise(url: str) -> str:
    """`S3://bucket//a/../b.csv/` -> `s3://bucket/b.csv`: the form edges and the ledger use.

    The scheme is lower case, the path normalised like a posix path, and without
    a trailing slash (a folder is said by the declared path, as for local
    paths). http(s) URLs keep their path and query as written.
    """
    protocol = protocol_of(url)
    rest = url[len(protocol) + 3:]
    if protocol in ("http", "https"):
        host, _, path = rest.partition("/")
        return f"{protocol}://{host.lower()}/{path}".rstrip("/")
    path = posixpath.normpath(rest.strip("/")) if rest.strip("/") else ""
    return f"{protocol}://{'' if path == '.' else path}"


def parents(url: str) -> list[str]:
    """`s3://b/x/y.csv` -> [`s3://b/x`, `s3://b`]: the folders a URL lies in (like Path.parents)."""
    protocol = protocol_of(url)
    parts = url[len(protocol) + 3:].split("/")
    return [f"{protocol}://" + "/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]


def inside(url: str, folder: str) -> bool:
    return url.startswith(folder.rstrip("/") + "/")


# Option names that hold a credential in fsspec's filesystems, beyond what the parameters' rule says
# (params.is_secret_name: a last word token, password, secret, credentials; api/access/secret/private key): s3fs's
# `key` (the access key id) and its alias `username`, botocore's `aws_access_key_id`, adlfs's `account_key`,
# `credential` and `connection_string` (it holds the account key), an HTTP `Authorization` header.
_CREDENTIAL_OPTIONS = frozenset({"key", "username", "aws_access_key_id", "account_key", "credential",
                                 "connection_string", "authorization"})
# gcsfs's `token` may name a way to sign in instead of holding a credential
_TOKEN_METHODS = frozenset({"anon", "google_default", "cache", "cloud", "browser"})


def credential_options(options: Mapping[str, Any]) -> list[tuple[str, ...]]:
    """The options (a path of keys into nested ones: client_kwargs, headers) that hold a credential.

    By name, word by word (`sse_kms_key_id` or `SSEKMSKeyId` is a key's id, not a key; `aws_secret_access_key`,
    `sas_token`, `client_secret` are credentials), never by a substring.
    """
    from .params import is_secret_name  # noqa: PLC0415 - params imports what imports this module

    found: list[tuple[str, ...]] = []
    for key, value in options.items():
        name = str(key)
        if name.lower() in _CREDENTIAL_OPTIONS or is_secret_name(name):
            if not (name == "token" and isinstance(value, str) and value in _TOKEN_METHODS):
                found.append((name,))
        elif isinstance(value, Mapping):
            found += [(name, *inner) for inner in credential_options(value)]
    return found


def fsspec_env(storage: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """`storage:` as fsspec's own configuration variables, so that a step's pandas or fsspec uses it too."""
    return {f"FSSPEC_{protocol.upper()}": json.dumps(dict(options)) for protocol, options in storage.items()}


def filesystem(url: str, storage: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[Any, str]:
    """(the fsspec filesystem of `url` with its `storage:` options, the path within it).

    Raises PipelineError naming what to install when the filesystem's package is missing.
    """
    protocol = protocol_of(url)
    try:
        import fsspec  # noqa: PLC0415
        from fsspec.core import url_to_fs  # noqa: PLC0415
    except ImportError:
        raise PipelineError(Problem(f"{url}: reading URLs needs fsspec: pip install fsspec")) from None
    del fsspec
    options = dict((storage or {}).get(protocol, {}))
    try:
        return url_to_fs(url, **options)
    except ImportError:
        package = EXTRAS.get(protocol, f"the fsspec filesystem for {protocol}://")
        extra = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure"}.get(package)
        also = f" (or pip install 'nbflow[{extra}]')" if extra else ""
        raise PipelineError(Problem(f"{url}: the {protocol}:// filesystem needs {package}: "
                                    f"pip install {package}{also}")) from None
    except ValueError as e:  # "Protocol not known"
        raise PipelineError(Problem(f"{url}: {e}")) from None


def identity(url: str, storage: Mapping[str, Mapping[str, Any]] | None = None) -> tuple[str, int] | None:
    """(identity, size) of an object or of everything below a folder URL, from metadata; None when absent.

    The identity is `etag:...` (or `md5Hash:`, `generation:`, ...) for an
    object and `tree:<sha256 of names and identities>` for a folder. Never
    downloads anything. Raises PipelineError when the store cannot be asked
    (see `problem`), so that "cannot connect" is never taken for "missing".
    """
    return describe(url, storage)[0]


def describe(url: str, storage: Mapping[str, Mapping[str, Any]] | None = None
             ) -> tuple[tuple[str, int] | None, dict[str, tuple[str, int]] | None]:
    """`identity` and, for a folder, its objects (as `tree` gives them), from one listing."""
    fs, path = filesystem(url, storage)
    try:
        fs.invalidate_cache(path)  # a listing cached earlier in this process may predate the write of a step
        try:
            info = fs.info(path)
        except FileNotFoundError:
            _bucket_must_exist(fs, url, path)
            return None, None
        if info.get("type") == "directory":
            files = _listing(fs, path, fs.find(path, detail=True))
            return tree_identity(files), files
        return (_object_identity(fs, info), int(info.get("size") or 0)), None
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - every other failure of the store is said with its cause
        raise PipelineError(Problem(problem(url, e))) from None


def tree(url: str, storage: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, tuple[str, int]]:
    """Every object below a folder URL (relative name -> (identity, size)), from one listing."""
    fs, path = filesystem(url, storage)
    try:
        fs.invalidate_cache(path)
        found = fs.find(path, detail=True)
    except Exception as e:  # noqa: BLE001
        raise PipelineError(Problem(problem(url, e))) from None
    return _listing(fs, path, found)


def _listing(fs: Any, path: str, found: dict[str, dict[str, Any]]) -> dict[str, tuple[str, int]]:
    return dict(sorted((posixpath.relpath(name, path), (_object_identity(fs, entry), int(entry.get("size") or 0)))
                       for name, entry in found.items()))


def tree_identity(files: Mapping[str, tuple[str, int]]) -> tuple[str, int]:
    """The identity of a folder, local or in a store: `tree:` and the sha256 of its names and file identities."""
    digest = hashlib.sha256("".join(f"{rel}\0{ident}\n" for rel, (ident, _) in files.items()).encode())
    return "tree:" + digest.hexdigest(), sum(size for _, size in files.values())


def _object_identity(fs: Any, info: dict[str, Any]) -> str:
    for key in _IDENTITY_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key.lower()}:{str(value).strip(chr(34))}"
    # a filesystem without a content tag: fsspec's key of its metadata (changes with size and mtime)
    return "ukey:" + hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()


def _bucket_must_exist(fs: Any, url: str, path: str) -> None:
    """An object that is not there is missing only if its bucket is there (else the truth is the bucket)."""
    bucket = path.split("/", 1)[0]
    if bucket == path or not bucket:
        raise FileNotFoundError(f"bucket {bucket} does not exist")
    try:
        fs.invalidate_cache(bucket)
        if not fs.exists(bucket):
            raise PipelineError(Problem(f"{url}: the bucket {bucket} does not exist (or is not visible with these "
                                        "credentials)"))
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001
        raise PipelineError(Problem(problem(url, e))) from None


def problem(url: str, error: BaseException) -> str:
    """Why `url` cannot be asked, in words a user can act on (never "does not exist" for "cannot connect")."""
    text = f"{type(error).__name__}: {error}"
    lowered = text.lower()
    if isinstance(error, PermissionError) or "accessdenied" in lowered or "forbidden" in lowered or "403" in text:
        return (f"{url}: permission denied ({text}); check the credentials in the environment or the store's "
                "config")
    if "nosuchbucket" in lowered or "bucket does not exist" in lowered or "bucket " in lowered and "not exist" \
            in lowered:
        return f"{url}: the bucket does not exist ({text})"
    if isinstance(error, FileNotFoundError):
        return f"{url}: not found ({text})"
    if any(word in lowered for word in ("connect", "endpoint", "timeout", "timed out", "name or service",
                                        "nodename", "unreachable", "refused")) or isinstance(error, OSError):
        return (f"{url}: cannot connect to the store ({text}); check the network, the endpoint "
                "(AWS_ENDPOINT_URL, `storage:` in nbflow.yaml) and that the service runs")
    return f"{url}: the store cannot be asked ({text})"
