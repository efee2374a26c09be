"""The model commitment: what a provider publishes about a model image, and the verifier rule made from it.

The JSON format (``format: tmb-model-commitment``, ``format_version: 1``) is documented in
docs/commitment.md. It is written canonically (sorted keys, two-space indent, UTF-8, final newline) and holds
no timestamp, so two parties who commit the same directory with the same tools get the same bytes.

By default the salt is derived from the model id and revision (:func:`derive_salt`), and so are the UUIDs of
the image and of the hash superblock (:func:`derive_uuid`): nothing random goes in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tmb.errors import TmbError
from tmb.verity.errors import CommitmentError
from tmb.verity.image import FileEntry
from tmb.verity.layout import (
    ALGORITHMS,
    DEFAULT_BLOCK_SIZE,
    VerityNumbers,
    canonical_algorithm,
    digest_size,
    parse_salt,
    parse_uuid,
    tree_geometry,
)

FORMAT = "tmb-model-commitment"
FORMAT_VERSION = 1
SALT_DOMAIN = b"tmb/verity/salt/v1"
UUID_DOMAIN = b"tmb/verity/uuid/v1"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HEX_RE = re.compile(r"^(?:[0-9a-f]{2})+$")


# ------------------------------------------------------------------------------------------- derivation


def check_model_ref(model_id: str, revision: str) -> None:
    """A model id (no ``@``) and a revision: non-empty, no control characters, no surrounding blanks."""
    for what, value in (("model id", model_id), ("revision", revision)):
        if not isinstance(value, str) or not value or value != value.strip() or _CONTROL.search(value):
            raise CommitmentError(
                f"invalid {what} {value!r}",
                hint="a non-empty string without control characters or surrounding spaces",
            )
    if "@" in model_id:
        raise CommitmentError(f"invalid model id {model_id!r}: '@' separates the id from the revision")


def _fields(domain: bytes, *values: str) -> bytes:
    out = bytearray(domain + b"\x00")
    for value in values:
        raw = value.encode("utf-8")
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def derive_salt(model_id: str, revision: str) -> bytes:
    """``SHA-256("tmb/verity/salt/v1" 0x00 len(id) id len(rev) rev)``, lengths as 4-byte big endian."""
    check_model_ref(model_id, revision)
    return hashlib.sha256(_fields(SALT_DOMAIN, model_id, revision)).digest()


def derive_uuid(model_id: str, revision: str, purpose: str) -> str:
    """A UUID (RFC 9562 version 8) from the first 16 bytes of a domain-separated SHA-256.

    ``purpose`` is ``"erofs"`` for the filesystem UUID and ``"verity"`` for the hash superblock.
    """
    check_model_ref(model_id, revision)
    raw = bytearray(hashlib.sha256(_fields(UUID_DOMAIN, purpose, model_id, revision)).digest()[:16])
    raw[6] = (raw[6] & 0x0F) | 0x80
    raw[8] = (raw[8] & 0x3F) | 0x80
    return str(uuidlib.UUID(bytes=bytes(raw)))


# ------------------------------------------------------------------------------------------------ model


@dataclass(frozen=True)
class Commitment(VerityNumbers):
    model_id: str
    revision: str
    files: tuple[FileEntry, ...]
    image_path: str  # image file name, relative to the commitment file
    image_size: int
    root_hash: bytes
    salt: bytes
    data_blocks: int
    hash_blocks: int
    algorithm: str = "sha256"
    salt_source: str = "derived"  # "derived" (derive_salt) or "explicit"
    hash_type: int = 1
    data_block_size: int = DEFAULT_BLOCK_SIZE
    hash_block_size: int = DEFAULT_BLOCK_SIZE
    hash_path: str | None = "image.verity"  # hash tree file, relative to the commitment file
    hash_offset: int = 0
    superblock: bool = True
    verity_uuid: str | None = None
    image_format: str = "erofs"
    image_uuid: str | None = None
    mkfs_args: tuple[str, ...] = ()
    tools: Mapping[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """``model_id@revision``: the rule name in the verifier policy."""
        return f"{self.model_id}@{self.revision}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"id": self.model_id, "revision": self.revision},
            "image": {
                "format": self.image_format,
                "path": self.image_path,
                "size": self.image_size,
                "uuid": self.image_uuid,
                "mkfs_args": list(self.mkfs_args),
            },
            "verity": {
                "hash_format": self.hash_type,
                "hash_algorithm": self.algorithm,
                "data_block_size": self.data_block_size,
                "hash_block_size": self.hash_block_size,
                "data_blocks": self.data_blocks,
                "hash_blocks": self.hash_blocks,
                "salt": self.salt_hex,
                "salt_source": self.salt_source,
                "root_hash": self.root_hex,
                "hash_path": self.hash_path,
                "hash_offset": self.hash_offset,
                "superblock": self.superblock,
                "uuid": self.verity_uuid,
            },
            "files": [_file_to_dict(f) for f in self.files],
            "tools": dict(sorted(self.tools.items())),
        }

    def to_json(self) -> str:
        """The canonical encoding: sorted keys, indent 2, UTF-8 (not escaped), trailing newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<commitment>") -> Commitment:
        return _parse(data, source)


def _file_to_dict(f: FileEntry) -> dict[str, Any]:
    out: dict[str, Any] = {"path": f.path, "type": f.type, "mode": f"{f.mode:04o}"}
    if f.type == "file":
        out["size"] = f.size
        out["sha256"] = f.sha256
    elif f.type == "symlink":
        out["target"] = f.target
    return out


# ------------------------------------------------------------------------------------------------ parse


class _Reader:
    """Typed access to a JSON object; every failure is a CommitmentError naming the file and field."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, message: str, **context: Any) -> CommitmentError:
        return CommitmentError(f"invalid commitment: {message}", path=self.source, **context)

    def obj(self, data: Any, where: str) -> Mapping[str, Any]:
        if not isinstance(data, Mapping):
            raise self.fail(f"{where} must be an object")
        return data

    def get(self, data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if key not in data:
            raise self.fail(f"missing field {where}.{key}")
        value = data[key]
        if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
            raise self.fail(f"{where}.{key} has the wrong type")
        if not isinstance(value, kind):
            raise self.fail(f"{where}.{key} has the wrong type", got=type(value).__name__)
        return value

    def count(self, data: Mapping[str, Any], key: str, where: str, minimum: int = 0) -> int:
        value = self.get(data, key, int, where)
        if value < minimum:
            raise self.fail(f"{where}.{key} must be at least {minimum}", got=value)
        return int(value)


def _parse(data: Any, source: str) -> Commitment:
    r = _Reader(source)
    top = r.obj(data, "the document")
    if top.get("format") != FORMAT:
        raise CommitmentError(
            "not a tmb model commitment",
            path=source,
            format=top.get("format"),
            hint=f"expected format {FORMAT}",
        )
    version = top.get("format_version")
    if version != FORMAT_VERSION:
        raise CommitmentError(
            f"unsupported commitment format version {version!r}",
            path=source,
            hint=f"this tmb reads format_version {FORMAT_VERSION}",
        )
    model = r.obj(r.get(top, "model", dict, "commitment"), "model")
    image = r.obj(r.get(top, "image", dict, "commitment"), "image")
    verity = r.obj(r.get(top, "verity", dict, "commitment"), "verity")
    model_id = r.get(model, "id", str, "model")
    revision = r.get(model, "revision", str, "model")
    try:
        check_model_ref(model_id, revision)
    except CommitmentError as exc:
        raise r.fail(exc.message) from None
    algorithm = r.get(verity, "hash_algorithm", str, "verity")
    if algorithm not in ALGORITHMS or canonical_algorithm(algorithm) != algorithm:
        raise r.fail(f"unsupported verity.hash_algorithm {algorithm!r}")
    root_text = r.get(verity, "root_hash", str, "verity")
    if not _HEX_RE.match(root_text) or len(root_text) != 2 * digest_size(algorithm):
        raise r.fail(f"verity.root_hash is not a lower-case hex {algorithm} digest")
    salt_text = r.get(verity, "salt", str, "verity")
    if salt_text != "-" and not _HEX_RE.match(salt_text):
        raise r.fail("verity.salt must be lower-case hex or '-'")
    try:
        salt = parse_salt(salt_text)
    except TmbError as exc:
        raise r.fail(f"verity.salt: {exc.message}") from None
    salt_source = r.get(verity, "salt_source", str, "verity")
    if salt_source not in ("derived", "explicit"):
        raise r.fail("verity.salt_source must be 'derived' or 'explicit'")
    if salt_source == "derived" and salt != derive_salt(model_id, revision):
        raise r.fail("verity.salt is marked derived but differs from the salt of this model id and revision")
    hash_type = r.get(verity, "hash_format", int, "verity")
    dbs = r.count(verity, "data_block_size", "verity", 512)
    hbs = r.count(verity, "hash_block_size", "verity", 512)
    data_blocks = r.count(verity, "data_blocks", "verity", 1)
    hash_blocks = r.count(verity, "hash_blocks", "verity")
    hash_offset = r.count(verity, "hash_offset", "verity")
    superblock = r.get(verity, "superblock", bool, "verity")
    hash_path = r.get(verity, "hash_path", (str, type(None)), "verity")
    verity_uuid = r.get(verity, "uuid", (str, type(None)), "verity")
    try:
        geometry = tree_geometry(
            data_blocks,
            digest_size=digest_size(algorithm),
            data_block_size=dbs,
            hash_block_size=hbs,
            hash_type=hash_type,
            hash_offset=hash_offset,
            superblock=superblock,
        )
        if verity_uuid is not None:
            verity_uuid = parse_uuid(verity_uuid)
    except TmbError as exc:
        raise r.fail(exc.message) from None
    if geometry.hash_blocks != hash_blocks:
        raise r.fail("verity.hash_blocks does not match the tree geometry", expected=geometry.hash_blocks)
    image_size = r.count(image, "size", "image", 1)
    if image_size < data_blocks * dbs:
        raise r.fail("image.size is smaller than verity.data_blocks * data_block_size")
    image_uuid = r.get(image, "uuid", (str, type(None)), "image")
    mkfs = r.get(image, "mkfs_args", list, "image")
    if not all(isinstance(a, str) for a in mkfs):
        raise r.fail("image.mkfs_args must be a list of strings")
    tools = r.obj(r.get(top, "tools", dict, "commitment"), "tools")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in tools.items()):
        raise r.fail("tools must map names to version strings")
    files = tuple(_parse_file(r, item, i) for i, item in enumerate(r.get(top, "files", list, "commitment")))
    return Commitment(
        model_id=model_id,
        revision=revision,
        files=files,
        image_path=r.get(image, "path", str, "image"),
        image_size=image_size,
        root_hash=bytes.fromhex(root_text),
        salt=salt,
        data_blocks=data_blocks,
        hash_blocks=hash_blocks,
        algorithm=algorithm,
        salt_source=salt_source,
        hash_type=hash_type,
        data_block_size=dbs,
        hash_block_size=hbs,
        hash_path=hash_path,
        hash_offset=hash_offset,
        superblock=superblock,
        verity_uuid=verity_uuid,
        image_format=r.get(image, "format", str, "image"),
        image_uuid=image_uuid,
        mkfs_args=tuple(mkfs),
        tools=dict(tools),
    )


def _parse_file(r: _Reader, item: Any, index: int) -> FileEntry:
    where = f"files[{index}]"
    obj = r.obj(item, where)
    path = r.get(obj, "path", str, where)
    kind = r.get(obj, "type", str, where)
    mode_text = r.get(obj, "mode", str, where)
    if not re.fullmatch(r"0[0-7]{3}", mode_text):
        raise r.fail(f"{where}.mode must be four octal digits", got=mode_text)
    mode = int(mode_text, 8)
    if kind == "file":
        size = r.count(obj, "size", where)
        digest = r.get(obj, "sha256", str, where)
        if not _SHA256_RE.match(digest):
            raise r.fail(f"{where}.sha256 is not a lower-case hex SHA-256")
        return FileEntry(path, kind, mode, size=size, sha256=digest)
    if kind == "dir":
        return FileEntry(path, kind, mode)
    if kind == "symlink":
        return FileEntry(path, kind, mode, target=r.get(obj, "target", str, where))
    raise r.fail(f"{where}.type must be file, dir or symlink", got=kind)


def load_commitment(path: str | os.PathLike[str]) -> Commitment:
    """Read and validate a commitment file; any problem is a :class:`CommitmentError` naming the file."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise CommitmentError(f"cannot read commitment: {exc.strerror}", path=source) from exc
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise CommitmentError("commitment is not UTF-8 text", path=source) from None
    except json.JSONDecodeError as exc:
        raise CommitmentError(
            f"commitment is not valid JSON: {exc.msg}", path=source, line=exc.lineno, column=exc.colno
        ) from None
    return Commitment.from_dict(data, source=source)


def write_commitment(commitment: Commitment, path: str | os.PathLike[str]) -> None:
    """Write the canonical JSON under a temporary name, then rename it into place."""
    final = os.fspath(path)
    tmp = f"{final}.tmp-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(commitment.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CommitmentError(f"cannot write commitment: {exc.strerror}", path=final) from exc


# ----------------------------------------------------------------------------------------------- policy


POLICY_RULE_KEYS = (
    "name",
    "root_digest",
    "verity_algorithm",
    "salt",
    "data_blocks",
    "data_block_size",
    "hash_block_size",
)


def policy_rule_from_commitment(commitment: Commitment | Mapping[str, Any]) -> dict[str, Any]:
    """The verifier's dm-verity rule for this model (the keys in :data:`POLICY_RULE_KEYS`).

    An IMA ``dm_table_load`` event matches when its ``root_digest``, ``verity_algorithm`` and ``salt`` equal
    the rule's and its ``target_len`` (512-byte sectors) equals ``data_blocks * data_block_size / 512``: the
    root hash alone does not pin the size, a table with fewer data blocks maps a truncated device.
    """
    c = commitment if isinstance(commitment, Commitment) else Commitment.from_dict(commitment)
    return {
        "name": c.name,
        "root_digest": c.root_hex,
        "verity_algorithm": c.algorithm,
        "salt": c.salt_hex,
        "data_blocks": c.data_blocks,
        "data_block_size": c.data_block_size,
        "hash_block_size": c.hash_block_size,
    }


def _toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def policy_toml_snippet(commitment: Commitment | Mapping[str, Any]) -> str:
    """The rule as a TOML ``[[verity]]`` table, ready to paste into a policy file."""
    rule = policy_rule_from_commitment(commitment)
    sectors = rule["data_blocks"] * rule["data_block_size"] // 512
    lines = [
        f"# dm-verity rule from a tmb commitment: IMA dm_table_load target_len must be {sectors} sectors",
        "[[verity]]",
    ]
    for key in POLICY_RULE_KEYS:
        value = rule[key]
        lines.append(f"{key} = {value}" if isinstance(value, int) else f"{key} = {_toml_string(str(value))}")
    return "\n".join(lines) + "\n"
