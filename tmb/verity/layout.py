"""dm-verity parameters and on-disk layout: algorithms, salt and UUID syntax, tree geometry, superblock.

Everything here follows cryptsetup (lib/verity): ``hash_levels`` for the geometry, ``struct verity_sb`` for
the superblock. See docs/commitment.md for the layout in prose.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass

from tmb.verity.errors import VerityInputError

DEFAULT_BLOCK_SIZE = 4096
SUPERBLOCK_SIZE = 512
MAX_SALT_SIZE = 256
SUPERBLOCK_SIGNATURE = b"verity\x00\x00"

# veritysetup (kernel crypto API) name -> hashlib name. md5 is refused on purpose: a commitment needs a
# collision-resistant hash. sha1 is kept for compatibility only.
ALGORITHMS: Mapping[str, str] = {
    "sha1": "sha1",
    "sha224": "sha224",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sha3-224": "sha3_224",
    "sha3-256": "sha3_256",
    "sha3-384": "sha3_384",
    "sha3-512": "sha3_512",
    "blake2b-512": "blake2b",
    "blake2s-256": "blake2s",
}

_SB_STRUCT = struct.Struct("<8sII16s32sIIQH6s256s168s")
_UUID_RE = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_HEX_RE = re.compile(r"^(?:[0-9a-fA-F]{2})*$")


# --------------------------------------------------------------------------------------------- parameters


def canonical_algorithm(name: str) -> str:
    """The veritysetup name of a supported hash algorithm (case-insensitive), or :class:`VerityInputError`."""
    key = name.strip().lower()
    if key not in ALGORITHMS:
        raise VerityInputError(
            f"unsupported verity hash algorithm {name!r}",
            hint="use one of " + ", ".join(ALGORITHMS),
        )
    return key


def digest_size(algorithm: str) -> int:
    return hashlib.new(ALGORITHMS[canonical_algorithm(algorithm)]).digest_size


def block_digest(algorithm: str, hash_type: int, salt: bytes, block: bytes) -> bytes:
    """One dm-verity digest: ``H(salt || block)`` (format 1) or ``H(block || salt)`` (format 0)."""
    h = hashlib.new(ALGORITHMS[canonical_algorithm(algorithm)])
    if hash_type == 1:
        h.update(salt)
    h.update(block)
    if hash_type != 1:
        h.update(salt)
    return h.digest()


def parse_salt(text: str) -> bytes:
    """``-`` (or empty) for no salt, else an even number of hex digits, at most 256 bytes."""
    text = text.strip()
    if text in ("-", ""):
        return b""
    if not _HEX_RE.match(text):
        raise VerityInputError(
            f"invalid salt {text!r}", hint="give an even number of hex digits, or - for none"
        )
    salt = bytes.fromhex(text)
    check_salt(salt)
    return salt


def salt_hex(salt: bytes) -> str:
    """The salt as veritysetup and the dm table print it: hex, or ``-`` when empty."""
    return salt.hex() if salt else "-"


class VerityNumbers:
    """Derived views shared by the records that carry a tree's ``root_hash``, ``salt``, ``data_blocks``
    and ``data_block_size`` (``tree.VerityResult``, ``commitment.Commitment``)."""

    root_hash: bytes
    salt: bytes
    data_blocks: int
    data_block_size: int

    @property
    def root_hex(self) -> str:
        return self.root_hash.hex()

    @property
    def salt_hex(self) -> str:
        return salt_hex(self.salt)

    @property
    def target_len(self) -> int:
        """dm-verity target length in 512-byte sectors, as IMA's ``dm_table_load`` reports it."""
        return self.data_blocks * self.data_block_size // 512


def parse_uuid(text: str) -> str:
    """A UUID in the canonical 8-4-4-4-12 form (what libuuid accepts), returned lower-case."""
    if not _UUID_RE.match(text.strip()):
        raise VerityInputError(
            f"invalid UUID {text!r}", hint="expected the form 12345678-1234-1234-1234-123456789abc"
        )
    return text.strip().lower()


def check_salt(salt: bytes) -> None:
    if len(salt) > MAX_SALT_SIZE:
        raise VerityInputError(f"salt is {len(salt)} bytes; dm-verity allows at most {MAX_SALT_SIZE}")


def check_block_size(name: str, size: int) -> None:
    # cryptsetup's VERITY_BLOCK_SIZE_OK: a power of two from 512 bytes to 512 KiB.
    if size < 512 or size > 512 * 1024 or size & (size - 1):
        raise VerityInputError(f"{name} {size} is not a power of two between 512 and 524288")


def _bits_down(value: int) -> int:
    return max(value.bit_length() - 1, 0)


# ----------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class TreeGeometry:
    """Where every level of the tree lives on the hash device, as cryptsetup's ``hash_levels`` computes it."""

    data_blocks: int
    data_block_size: int
    hash_block_size: int
    digest_size: int
    hash_type: int
    hashes_per_block: int
    entry_size: int  # bytes per digest slot: next power of two (format 1) or the digest size (format 0)
    level_sizes: tuple[int, ...]  # index 0 = the level hashing the data blocks
    level_starts: tuple[int, ...]  # absolute hash-block index of each level on the hash device
    tree_start: int  # hash-block index of the first (top) tree block

    @property
    def levels(self) -> int:
        return len(self.level_sizes)

    @property
    def hash_blocks(self) -> int:
        """Tree blocks, superblock excluded (veritysetup's ``Hash blocks``)."""
        return sum(self.level_sizes)

    @property
    def hash_end(self) -> int:
        """Bytes of the hash device used, from offset 0 to the end of the tree."""
        return (self.tree_start + self.hash_blocks) * self.hash_block_size


def tree_geometry(
    data_blocks: int,
    *,
    digest_size: int,
    data_block_size: int = DEFAULT_BLOCK_SIZE,
    hash_block_size: int = DEFAULT_BLOCK_SIZE,
    hash_type: int = 1,
    hash_offset: int = 0,
    superblock: bool = True,
) -> TreeGeometry:
    if data_blocks < 1:
        raise VerityInputError("a verity device needs at least one data block")
    if hash_type not in (0, 1):
        raise VerityInputError(
            f"unsupported verity hash format {hash_type}", hint="use 1 (normal) or 0 (Chrome OS)"
        )
    check_block_size("data block size", data_block_size)
    check_block_size("hash block size", hash_block_size)
    if hash_offset < 0 or hash_offset % 512:
        raise VerityInputError(f"hash offset {hash_offset} is not a non-negative multiple of 512")
    bits = _bits_down(hash_block_size // digest_size)
    if bits == 0:
        raise VerityInputError("hash block too small for the digest")
    entry_size = digest_size if hash_type == 0 else 1 << (digest_size - 1).bit_length()
    if superblock:
        tree_start = (hash_offset + SUPERBLOCK_SIZE + hash_block_size - 1) // hash_block_size
    else:
        tree_start = hash_offset // hash_block_size
    levels = 0
    while bits * levels < 64 and (data_blocks - 1) >> (bits * levels):
        levels += 1
    sizes = [0] * levels
    starts = [0] * levels
    position = tree_start
    for i in range(levels - 1, -1, -1):
        shift = (i + 1) * bits
        starts[i] = position
        sizes[i] = (data_blocks + (1 << shift) - 1) >> shift
        position += sizes[i]
    return TreeGeometry(
        data_blocks=data_blocks,
        data_block_size=data_block_size,
        hash_block_size=hash_block_size,
        digest_size=digest_size,
        hash_type=hash_type,
        hashes_per_block=1 << bits,
        entry_size=entry_size,
        level_sizes=tuple(sizes),
        level_starts=tuple(starts),
        tree_start=tree_start,
    )


# --------------------------------------------------------------------------------------------- superblock


@dataclass(frozen=True)
class Superblock:
    """The 512-byte on-disk header cryptsetup writes (``struct verity_sb``, version 1, little endian)."""

    uuid: str
    algorithm: str
    salt: bytes
    data_blocks: int
    data_block_size: int = DEFAULT_BLOCK_SIZE
    hash_block_size: int = DEFAULT_BLOCK_SIZE
    hash_type: int = 1

    def pack(self) -> bytes:
        check_salt(self.salt)
        name = self.algorithm.encode("ascii")
        if len(name) > 31:
            raise VerityInputError(f"hash algorithm name {self.algorithm!r} is longer than 31 bytes")
        return _SB_STRUCT.pack(
            SUPERBLOCK_SIGNATURE,
            1,
            self.hash_type,
            uuidlib.UUID(self.uuid).bytes,
            name,
            self.data_block_size,
            self.hash_block_size,
            self.data_blocks,
            len(self.salt),
            b"",
            self.salt,
            b"",
        )

    @classmethod
    def unpack(cls, raw: bytes, *, path: str = "") -> Superblock:
        if len(raw) < SUPERBLOCK_SIZE:
            raise VerityInputError("hash file too short for a verity superblock", path=path, size=len(raw))
        sig, version, hash_type, uuid_raw, alg, dbs, hbs, blocks, salt_size, _, salt, _ = _SB_STRUCT.unpack(
            raw[:SUPERBLOCK_SIZE]
        )
        if sig != SUPERBLOCK_SIGNATURE:
            raise VerityInputError("no verity superblock (signature missing)", path=path)
        if version != 1:
            raise VerityInputError(f"unsupported verity superblock version {version}", path=path)
        if salt_size > MAX_SALT_SIZE:
            raise VerityInputError(f"corrupt verity superblock: salt size {salt_size}", path=path)
        return cls(
            uuid=str(uuidlib.UUID(bytes=uuid_raw)),
            algorithm=alg.split(b"\x00", 1)[0].decode("ascii", "replace"),
            salt=salt[:salt_size],
            data_blocks=blocks,
            data_block_size=dbs,
            hash_block_size=hbs,
            hash_type=hash_type,
        )


def read_superblock(path: str | os.PathLike[str], offset: int = 0) -> Superblock:
    """Read and decode the superblock at ``offset`` of a hash device/file."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            raw = fh.read(SUPERBLOCK_SIZE)
    except OSError as exc:
        raise VerityInputError(f"cannot read hash file: {exc.strerror}", path=os.fspath(path)) from exc
    return Superblock.unpack(raw, path=os.fspath(path))
