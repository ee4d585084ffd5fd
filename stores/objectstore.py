"""One bucket prefix (s3://bucket/prefix, gs://bucket/prefix) as a flat key space, through obstore.

obstore was chosen by measurement (README, "Object-store workspaces"): against the same local S3 server it reads
and writes as fast as boto3, and it gives S3 and GCS one API with the two conditional writes the lease needs
(create if absent: If-None-Match; replace if unchanged: If-Match). Credentials come from the usual environment
(AWS_* variables and AWS_ENDPOINT_URL, GOOGLE_* for GCS); failures become one-line UserErrors.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

from stores.errors import UserError

SCHEMES = ("s3", "gs")
MULTIPART_BYTES = 64 << 20


def is_url(text: object) -> bool:
    return isinstance(text, str) and text.split("://", 1)[0] in SCHEMES and "://" in text


@dataclass(frozen=True)
class ObjectInfo:
    key: str          # relative to the store's prefix
    size: int
    etag: str


class LostRace(Exception):
    """A conditional write found the object created or changed by someone else."""


class ObjectStore:
    """Whole-object PUT (atomic: readers see all of an object or nothing), GET, HEAD, LIST, DELETE under a prefix."""

    def __init__(self, url: str):
        if not is_url(url):
            raise UserError(f"{url!r} is not an object-store URL; use s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
        scheme, rest = url.split("://", 1)
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise UserError(f"{url!r} names no bucket; use {scheme}://BUCKET/PREFIX")
        self.url = f"{scheme}://{bucket}/{prefix.strip('/')}".rstrip("/")
        self.scheme, self.bucket, self.prefix = scheme, bucket, prefix.strip("/")
        self._store = _make_store(scheme, bucket)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def check_reachable(self) -> None:
        """One LIST of at most a page: a missing bucket, bad credentials or an unreachable endpoint is named now,
        before anything is written."""
        import obstore
        try:
            next(iter(obstore.list(self._store, prefix=self._key("") or None, chunk_size=1)), None)
        except Exception as exc:
            raise UserError(f"cannot use {self.url}: {describe_failure(exc)}") from None

    def put(self, key: str, data: bytes | memoryview, create_only: bool = False, if_etag: str | None = None) -> str:
        """Upload whole; returns the new etag. `create_only` / `if_etag` make it conditional (LostRace if not)."""
        import obstore
        mode = "create" if create_only else ({"e_tag": if_etag} if if_etag else "overwrite")
        try:
            return obstore.put(self._store, self._key(key), data, mode=mode)["e_tag"]
        except (obstore.exceptions.AlreadyExistsError, obstore.exceptions.PreconditionError):
            raise LostRace(key) from None
        except Exception as exc:
            raise _store_error(self, key, exc) from None

    def put_file(self, key: str, path: os.PathLike) -> str:
        """One PUT up to MULTIPART_BYTES (faster for shard-sized files: README, object-store workspaces), multipart
        above (parallel parts; S3 refuses single PUTs over 5 GB). Either is visible only once complete."""
        import obstore
        big = os.path.getsize(path) > MULTIPART_BYTES
        try:
            return obstore.put(self._store, self._key(key), os.fspath(path), use_multipart=big)["e_tag"]
        except Exception as exc:
            raise _store_error(self, key, exc) from None

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError when it is absent."""
        import obstore
        try:
            return obstore.get(self._store, self._key(key)).bytes().to_bytes()
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise _store_error(self, key, exc) from None

    def get_into(self, key: str, f, block: int = 8 << 20) -> float:
        """Stream the object into an open binary file; returns its modification time (seconds since the epoch)."""
        import obstore
        try:
            result = obstore.get(self._store, self._key(key))
            for chunk in result.stream(min_chunk_size=block):
                f.write(chunk)
            return result.meta["last_modified"].timestamp()
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise _store_error(self, key, exc) from None

    def head(self, key: str) -> ObjectInfo | None:
        import obstore
        try:
            meta = obstore.head(self._store, self._key(key))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise _store_error(self, key, exc) from None
        return ObjectInfo(key, meta["size"], meta["e_tag"] or "")

    def list(self, under: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `under` (a folder: give it with a trailing '/')."""
        import obstore
        cut = len(self.prefix) + 1 if self.prefix else 0
        prefix = self._key(under.rstrip("/")) if under else (self.prefix or None)
        try:
            return [ObjectInfo(m["path"][cut:], m["size"], m["e_tag"] or "")
                    for page in obstore.list(self._store, prefix=prefix) for m in page]
        except Exception as exc:
            raise _store_error(self, under, exc) from None

    def delete(self, keys: list[str]) -> None:
        import obstore
        if not keys:
            return
        try:
            obstore.delete(self._store, [self._key(k) for k in keys])
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise _store_error(self, keys[0], exc) from None


def _make_store(scheme: str, bucket: str):
    """A client with short timeouts and few retries: an unreachable endpoint is reported in seconds, not minutes."""
    from obstore.store import from_url
    retry = {"max_retries": int(os.environ.get("DRA_PIPE_STORE_RETRIES", "3")),
             "retry_timeout": timedelta(seconds=float(os.environ.get("DRA_PIPE_STORE_RETRY_SECONDS", "20"))),
             "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                         "base": 2}}
    options = {"connect_timeout": "5s", "timeout": "300s"}
    if os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        options["allow_http"] = True
    try:
        return from_url(f"{scheme}://{bucket}", client_options=options, retry_config=retry, **_profile(scheme))
    except Exception as exc:
        raise UserError(f"cannot use {scheme}://{bucket}: {describe_failure(exc)}") from None


def _profile(scheme: str) -> dict:
    """An AWS profile (AWS_PROFILE, ~/.aws/config and credentials: SSO, assume-role, credential_process) through
    boto3's resolver, when no keys are in the environment; otherwise obstore's own chain (keys in AWS_*, then the
    instance role)."""
    if scheme != "s3" or os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    files = [os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config")]
    if not os.environ.get("AWS_PROFILE") and not any(os.path.exists(os.path.expanduser(f)) for f in files):
        return {}
    import boto3
    from obstore.auth.boto3 import Boto3CredentialProvider
    return {"credential_provider": Boto3CredentialProvider(boto3.Session())}


def describe_failure(exc: Exception) -> str:
    """The server's reason in a few words, and what to check."""
    text = str(exc)
    for code, meaning in (("token request", "no credentials found (the instance metadata service gave no token); "
                                            "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or "
                                            "GOOGLE_APPLICATION_CREDENTIALS"),
                          ("reading pem file", "the service-account key (GOOGLE_APPLICATION_CREDENTIALS) holds no "
                                               "readable private key"),
                          ("NoSuchBucket", "the bucket does not exist; create it or fix the URL"),
                          ("InvalidAccessKeyId", "the access key is not known; check AWS_ACCESS_KEY_ID or the profile"),
                          ("SignatureDoesNotMatch", "the secret key is wrong; check AWS_SECRET_ACCESS_KEY"),
                          ("AccessDenied", "access denied; check the credentials' permissions on the bucket"),
                          ("403 Forbidden", "access denied (403); check the credentials"),
                          ("404 Not Found", "not found (404): does the bucket exist?"),
                          ("Connection refused", "connection refused; is the endpoint (AWS_ENDPOINT_URL) up?"),
                          ("error sending request", "cannot reach the endpoint; check AWS_ENDPOINT_URL, network"),
                          ("dns error", "the endpoint's host name does not resolve; check AWS_ENDPOINT_URL"),
                          ("timed out", "the endpoint did not answer in time; check AWS_ENDPOINT_URL and the network"),
                          ("credential", "no usable credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a "
                                         "profile, or GOOGLE_APPLICATION_CREDENTIALS")):
        if code.lower() in text.lower():
            return meaning
    return " ".join(text.split())[:200]


def _store_error(store: ObjectStore, key: str, exc: Exception) -> UserError:
    return UserError(f"object store {store.url}, {key}: {describe_failure(exc)}")
