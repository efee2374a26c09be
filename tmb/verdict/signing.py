"""The daemon's Ed25519 verdict key: created on first start, permission-checked, signing and verification.

Key file: PKCS#8 PEM, unencrypted, mode 0600, written to a temporary file and hard-linked into place, so a
concurrent start can neither clobber it nor read it half-written.
A key file readable or writable by group or others is refused (:class:`KeyFileError`), as OpenSSH does.
A missing key file is never replaced silently where verdicts were already signed (:func:`load_verdict_key`):
a new key would leave every earlier verdict unverifiable against the keys the daemon publishes.
Key id: lowercase hex SHA-256 of the raw 32-byte public key.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from tmb.errors import InputError, Report, TmbError
from tmb.verdict.merkle import leaf_hash, merkle_tree, root_from_path
from tmb.verdict.model import BatchProof, Verdict, canonical_bytes


class KeyFileError(TmbError):
    """The verdict key file cannot be used (permissions, format, I/O)."""


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@dataclass(frozen=True)
class PublicKey:
    """A verdict public key as published at ``GET /v1/keys``."""

    raw: bytes  # 32 bytes

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_dict(self) -> dict[str, str]:
        pem = Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return {
            "key_id": self.key_id,
            "algorithm": "Ed25519",
            "public_key_hex": self.raw.hex(),
            "pem": pem.decode(),
        }


class Signer:
    """Holds the private key; signs verdicts."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = PublicKey(_raw(private.public_key()))
        self.key_id = self.public.key_id

    def sign_bytes(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def sign(self, verdict: Verdict) -> Verdict:
        """The verdict with ``key_id`` set and signed over its canonical encoding."""
        unsigned = verdict.evolve(key_id=self.key_id, signature="", batch=None)
        message = canonical_bytes(unsigned.to_dict(signed=False))
        return unsigned.signed_from(message, self.sign_bytes(message))

    def sign_batch(self, verdicts: Sequence[Verdict]) -> list[Verdict]:
        """Sign many verdicts with one Ed25519 signature over the root of a Merkle tree of them.

        A batch of one is signed on its own (no ``signature_batch``): at low load nothing changes. Each
        verdict of a larger batch carries the root's signature and its inclusion proof."""
        if len(verdicts) == 1:
            return [self.sign(verdicts[0])]
        kid = self.key_id
        unsigned = [  # the engine builds verdicts with our key id already: no copy needed then
            v
            if v.key_id == kid and not v.signature and v.batch is None
            else v.evolve(key_id=kid, signature="", batch=None)
            for v in verdicts
        ]
        messages = [canonical_bytes(v.to_dict(signed=False)) for v in unsigned]
        leaves = [leaf_hash(m) for m in messages]
        root, paths = merkle_tree(leaves)
        n = len(messages)
        signature = self.sign_bytes(batch_message(root, n))
        return [
            v.signed_from(m, signature, BatchProof(i, n, tuple(h.hex() for h in paths[i])), leaf=leaf)
            for i, (v, m, leaf) in enumerate(zip(unsigned, messages, leaves, strict=True))
        ]


class BatchSigner:
    """Signs the verdicts asked for within ``linger_s`` of each other together (:meth:`Signer.sign_batch`),
    at most ``max_batch`` per signature: one Ed25519 signature for a busy moment instead of one each. (A
    verdict is decided a second or more after its request ended; a few milliseconds more cost nothing.)"""

    def __init__(self, signer: Signer, max_batch: int = 256, linger_s: float = 0.005) -> None:
        self.signer = signer
        self.max_batch = max_batch
        self.linger_s = linger_s
        self._queue: list[tuple[Sequence[Verdict], asyncio.Future[list[Verdict]]]] = []
        self._queued = 0
        self._handle: asyncio.TimerHandle | None = None

    async def sign(self, verdict: Verdict) -> Verdict:
        return (await self.sign_many([verdict]))[0]

    def sign_many(self, verdicts: Sequence[Verdict]) -> asyncio.Future[list[Verdict]]:
        """The verdicts signed, in order (one future for the group)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Verdict]] = loop.create_future()
        self._queue.append((verdicts, fut))
        self._queued += len(verdicts)
        if self._queued >= self.max_batch:
            self._flush()
        elif self._handle is None:
            self._handle = loop.call_later(self.linger_s, self._flush)
        return fut

    def _flush(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        queued, self._queue, self._queued, self._handle = self._queue, [], 0, None
        flat = [v for group, _ in queued for v in group]
        signed: list[Verdict | BaseException] = []
        for start in range(0, len(flat), self.max_batch):
            part = flat[start : start + self.max_batch]
            try:
                signed += self.signer.sign_batch(part)
            except Exception:  # an unencodable verdict: sign the others one by one
                for verdict in part:
                    try:
                        signed.append(self.signer.sign(verdict))
                    except Exception as exc:
                        signed.append(exc)
        at = 0
        for group, fut in queued:
            mine, at = signed[at : at + len(group)], at + len(group)
            if fut.done():
                continue
            failed = next((r for r in mine if isinstance(r, BaseException)), None)
            if failed is not None:
                fut.set_exception(failed)
            else:
                fut.set_result([r for r in mine if isinstance(r, Verdict)])


BATCH_DOMAIN = b"tmb-verdict-batch/1"


def batch_message(root: bytes, size: int) -> bytes:
    """What a batch signature covers: ``tmb-verdict-batch/1`` ``:`` root (64 hex) ``:`` size (decimal)."""
    return b"%s:%s:%d" % (BATCH_DOMAIN, root.hex().encode(), size)


def check_permissions(path: Path) -> None:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError("verdict key is not a regular file", path=str(path))
    if st.st_mode & 0o077:
        raise KeyFileError(
            f"verdict key file is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o})",
            path=str(path),
            hint=f"chmod 600 {path}",
        )


def load_or_create_key(path: str | Path) -> Signer:
    """Load the key at ``path`` (checking permissions) or create it (0600) when absent."""
    path = Path(path)
    if not path.exists():
        created = _create_key(path)
        if created is not None:
            return Signer(created)
    try:
        check_permissions(path)
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read verdict key: {exc.strerror}", path=str(path)) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(
            "verdict key is not an unencrypted PKCS#8 PEM private key", path=str(path)
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError("verdict key is not an Ed25519 key", path=str(path), got=type(key).__name__)
    return Signer(key)


def load_verdict_key(
    path: str | Path, *, signed_by: Sequence[str], store: str, new_key: bool = False
) -> Signer:
    """The daemon's key for a store whose verdicts were signed by the key ids ``signed_by`` ([]: none yet).

    The key file is loaded when it exists; when it is missing a new key is created only if the store holds
    no verdicts, or with ``new_key`` (``tmb serve --new-key``: the operator knows the old key is gone).
    Otherwise a one-line :class:`KeyFileError` names the key file and the store (``store``: its path or
    redacted URL)."""
    path = Path(path)
    if not new_key and signed_by and not os.path.lexists(path):
        ids = ", ".join(k[:16] for k in signed_by)
        raise KeyFileError(
            f"verdict key file {path} is missing but store {store} holds verdicts signed by key {ids}: "
            "refusing to create a new key (restore the key file, or start once with `tmb serve --new-key` "
            "to sign with a new key from now on; the old public keys stay published at /v1/keys)"
        )
    return load_or_create_key(path)


def _new_key_file(path: Path) -> tuple[Ed25519PrivateKey, Path]:
    """A new private key written and fsynced (mode 0600) to a temporary file beside ``path``."""
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    return private, tmp


def _fsync_dir(path: Path) -> None:
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def _create_key(path: Path) -> Ed25519PrivateKey | None:
    """Write a new key to ``path`` atomically: a complete file appears there or none does, so a daemon
    starting beside another never reads a half-written key. None when another process created it first."""
    tmp: Path | None = None
    try:
        private, tmp = _new_key_file(path)
        try:
            os.link(tmp, path)  # atomic, and fails when the name exists: the first writer wins
        except FileExistsError:
            return None
        _fsync_dir(path)
    except OSError as exc:
        raise KeyFileError(f"cannot create verdict key: {exc.strerror}", path=str(path)) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return private


def rotate_key(path: str | Path) -> tuple[Signer, Signer, Path]:
    """Replace the key at ``path`` with a new one; returns (old, new, where the old key was kept).

    The old private key is kept beside it as ``<name>.retired-<key id prefix>`` (mode 0600: destroy it once
    no daemon signs with it any more); the new key is swapped in with one rename, so a daemon starting
    meanwhile reads either the old or the new key, never half of one."""
    path = Path(path)
    if not path.exists():
        raise KeyFileError("there is no verdict key to rotate", path=str(path))
    old = load_or_create_key(path)
    retired = path.with_name(f"{path.name}.retired-{old.key_id[:16]}")
    tmp: Path | None = None
    try:
        private, tmp = _new_key_file(path)
        if not retired.exists():
            os.link(path, retired)
        os.replace(tmp, path)
        _fsync_dir(path)
    except OSError as exc:
        raise KeyFileError(f"cannot rotate the verdict key: {exc.strerror}", path=str(path)) from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return old, Signer(private), retired


def load_public_keys(data: bytes, origin: str) -> list[PublicKey]:
    """Public keys from a PEM SubjectPublicKeyInfo, 64 hex digits, or a ``/v1/keys`` JSON document."""
    text = data.strip()
    if text.startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(text)
        except ValueError as exc:
            raise InputError("not a PEM public key", path=origin) from exc
        if not isinstance(key, Ed25519PublicKey):
            raise InputError("not an Ed25519 public key", path=origin, got=type(key).__name__)
        return [PublicKey(_raw(key))]
    if len(text) == 64:
        try:
            return [PublicKey(bytes.fromhex(text.decode("ascii")))]
        except (ValueError, UnicodeDecodeError):
            pass
    try:
        doc = json.loads(text)
        keys = [PublicKey(bytes.fromhex(k["public_key_hex"])) for k in doc["keys"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(
            "unrecognised public key: expected PEM, 64 hex digits or a /v1/keys JSON document", path=origin
        ) from exc
    if any(len(k.raw) != 32 for k in keys):
        raise InputError("an Ed25519 public key must be 32 bytes", path=origin)
    return keys


UNSIGNED_MEMBERS = ("signature", "signature_batch", "log")


def verify_verdict(doc: Mapping[str, Any], keys: Sequence[PublicKey]) -> Report:
    """Check a verdict document's signature against ``keys`` (matched by key id). Findings:

    ``verdict.malformed``, ``verdict.unknown_key``, ``verdict.signature_invalid``.
    """
    report = Report()
    try:
        verdict = Verdict.from_dict(doc)
        signature = bytes.fromhex(verdict.signature)
        # what the signature covers: the document without its unsigned members (signature, batch proof,
        # log inclusion proof)
        message = canonical_bytes({k: v for k, v in doc.items() if k not in UNSIGNED_MEMBERS})
        if verdict.batch is not None:
            b = verdict.batch
            root = root_from_path(leaf_hash(message), b.index, b.size, [bytes.fromhex(h) for h in b.path])
            if root is None:
                raise ValueError(f"batch proof does not fit a batch of {b.size} (index {b.index})")
            message = batch_message(root, b.size)
    except (InputError, ValueError) as exc:
        report.add("verdict.malformed", str(exc))
        return report
    key = next((k for k in keys if k.key_id == verdict.key_id), None)
    if key is None:
        report.add(
            "verdict.unknown_key",
            "the verdict names a key id none of the given keys has",
            key_id=verdict.key_id,
            known=[k.key_id for k in keys],
        )
        return report
    if not key.verify(signature, message):
        report.add("verdict.signature_invalid", "the signature does not verify", key_id=key.key_id)
    return report
