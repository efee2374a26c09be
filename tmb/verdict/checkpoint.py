"""C2SP signed notes and transparency-log checkpoints: what the daemon signs about its verdict log.

A *signed note* (https://c2sp.org/signed-note) is UTF-8 text ending in a newline, a blank line, then one
or more signature lines ``— <key name> <base64(key id[4] || signature)>``. For Ed25519 (signature type
0x01) the key id is the first four bytes of ``SHA-256(name || 0x0A || 0x01 || public key)`` and the
signature covers the text including its final newline. A verifier shares its key as
``<name>+<hex key id>+<base64(0x01 || public key)>`` (:func:`verifier_key`), the form Go's
``sumdb/note``, witnesses and other tools read.

A *checkpoint* (https://c2sp.org/tlog-checkpoint) is a note whose text is the log's origin line, the tree
size in decimal, the root hash in base64, then optional extension lines (:class:`Checkpoint`).

Reading is strict and bounded: notes over 1 MiB or with more than 100 signature lines are refused, as Go's
reference does; a signature line from a key the reader does not know is ignored; one from a known key that
does not verify rejects the whole note.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from tmb.errors import InputError

__all__ = [
    "Checkpoint",
    "NoteError",
    "NoteVerifier",
    "key_id",
    "open_note",
    "parse_verifier_key",
    "sign_note",
    "verifier_key",
]

ED25519 = 0x01
SIG_PREFIX = "\u2014 "  # em dash, space
MAX_NOTE_BYTES = 1 << 20
MAX_SIGNATURES = 100
_NAME_RE = re.compile(r"^[^\s+]+$")
_SIZE_RE = re.compile(r"^(0|[1-9][0-9]{0,19})$")


class NoteError(InputError):
    """A signed note or checkpoint that is malformed, unsigned by a trusted key, or badly signed."""


def _check_name(name: str) -> None:
    if not name or not _NAME_RE.match(name):
        raise NoteError(f"note key name {name!r} is empty or contains a space or '+'", name=name)


def key_id(name: str, public_raw: bytes) -> bytes:
    """The 4-byte C2SP key id of an Ed25519 key named ``name``."""
    return hashlib.sha256(name.encode() + b"\n" + bytes([ED25519]) + public_raw).digest()[:4]


def verifier_key(name: str, public_raw: bytes) -> str:
    """The verifier key string ``<name>+<key id hex>+<base64(0x01 || key)>``."""
    _check_name(name)
    material = base64.b64encode(bytes([ED25519]) + public_raw).decode()
    return f"{name}+{key_id(name, public_raw).hex()}+{material}"


@dataclass(frozen=True, slots=True)
class NoteVerifier:
    """One trusted key: its name, id and Ed25519 public key."""

    name: str
    id: bytes
    public_raw: bytes

    def verify(self, text: bytes, signature: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.public_raw).verify(signature, text)
        except (InvalidSignature, ValueError):
            return False
        return True


def parse_verifier_key(vkey: str) -> NoteVerifier:
    """Read a verifier key string (refusing a key id that does not match the name and key)."""
    name, sep1, rest = vkey.strip().partition("+")
    kid_hex, sep2, material = rest.partition("+")
    if not (sep1 and sep2):
        raise NoteError("a verifier key reads '<name>+<key id hex>+<base64 key>'", key=vkey[:200])
    _check_name(name)
    try:
        kid = bytes.fromhex(kid_hex)
        raw = base64.b64decode(material, validate=True)
    except (ValueError, binascii.Error):
        raise NoteError("the verifier key's id or key is not hex / base64", key=vkey[:200]) from None
    if len(kid) != 4 or len(raw) != 33 or raw[0] != ED25519:
        raise NoteError("the verifier key is not an Ed25519 key (type 0x01, 32 bytes)", key=vkey[:200])
    if key_id(name, raw[1:]) != kid:
        raise NoteError("the verifier key's id does not match its name and key", key=vkey[:200])
    return NoteVerifier(name, kid, raw[1:])


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("a note's text must end with a newline")
    if "\n\n" in text:
        raise NoteError("a note's text must not contain a blank line")
    bad = next((c for c in text if c < " " and c != "\n"), None)
    if bad is not None:
        raise NoteError("a note's text must not contain control characters", character=hex(ord(bad)))


def sign_note(text: str, name: str, public_raw: bytes, sign: Callable[[bytes], bytes]) -> str:
    """The signed note: ``text``, a blank line and one Ed25519 signature line by key ``name``."""
    _check_name(name)
    _check_text(text)
    signature = sign(text.encode())
    blob = base64.b64encode(key_id(name, public_raw) + signature).decode()
    return f"{text}\n{SIG_PREFIX}{name} {blob}\n"


def open_note(note: str | bytes, verifiers: Sequence[NoteVerifier]) -> tuple[str, list[str]]:
    """The note's text and the names of the trusted keys whose signatures verified (at least one).

    Raises :class:`NoteError` when the note is malformed, no trusted key signed it, or a trusted key's
    signature does not verify."""
    raw = note.encode() if isinstance(note, str) else note
    if len(raw) > MAX_NOTE_BYTES:
        raise NoteError("the note is larger than 1 MiB", size=len(raw))
    try:
        whole = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NoteError("the note is not UTF-8", offset=exc.start) from None
    cut = whole.rfind("\n\n")
    if cut < 0:
        raise NoteError("the note has no blank line before its signatures")
    text, sigs = whole[: cut + 1], whole[cut + 2 :]
    _check_text(text)
    if not sigs.endswith("\n"):
        raise NoteError("the note's signature block must end with a newline")
    lines = sigs[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError("the note has more than 100 signature lines", lines=len(lines))
    known = {(v.name, v.id): v for v in verifiers}
    verified: list[str] = []
    for number, line in enumerate(lines, 1):
        if not line.startswith(SIG_PREFIX):
            raise NoteError("a signature line must start with an em dash and a space", line=number)
        name, _, blob = line[len(SIG_PREFIX) :].partition(" ")
        _check_name(name)
        try:
            sig = base64.b64decode(blob, validate=True)
        except (ValueError, binascii.Error):
            raise NoteError("a signature is not base64", line=number, name=name) from None
        if len(sig) < 5:
            raise NoteError("a signature is too short to hold a key id", line=number, name=name)
        verifier = known.get((name, sig[:4]))
        if verifier is None:
            continue  # an unknown key (a witness we do not follow, another log key): ignored
        if not verifier.verify(text.encode(), sig[4:]):
            raise NoteError(f"the signature by {name!r} does not verify", line=number, name=name)
        if name not in verified:
            verified.append(name)
    if not verified:
        raise NoteError(
            "no trusted key signed the note", signers=[ln[len(SIG_PREFIX) :].split(" ")[0] for ln in lines]
        )
    return text, verified


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A log checkpoint: the origin (the log's name), the tree size and root, and extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "".join(f"{line}\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "":
            raise NoteError("a checkpoint has an origin, a size and a root hash, one per line")
        origin, size, root, *extensions = lines[:-1]
        if not origin:
            raise NoteError("the checkpoint's origin line is empty")
        if not _SIZE_RE.match(size):
            raise NoteError("the checkpoint's size is not a decimal number", size=size[:40])
        try:
            digest = base64.b64decode(root, validate=True)
        except (ValueError, binascii.Error):
            digest = b""
        if len(digest) != 32:
            raise NoteError("the checkpoint's root is not a base64 SHA-256 hash", root=root[:60])
        if any(not line for line in extensions):
            raise NoteError("a checkpoint extension line is empty")
        return cls(origin, int(size), digest, tuple(extensions))

    def sign(self, name: str, public_raw: bytes, sign: Callable[[bytes], bytes]) -> str:
        return sign_note(self.text(), name, public_raw, sign)

    @classmethod
    def open(
        cls, note: str | bytes, verifiers: Sequence[NoteVerifier], origin: str | None = None
    ) -> Checkpoint:
        """Verify and read a signed checkpoint (``origin``: the log it must belong to)."""
        text, _ = open_note(note, verifiers)
        checkpoint = cls.parse(text)
        if origin is not None and checkpoint.origin != origin:
            raise NoteError("the checkpoint is for another log", origin=checkpoint.origin, expected=origin)
        return checkpoint
