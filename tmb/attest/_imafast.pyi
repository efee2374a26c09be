# The C extension tmb/attest/_imafast.c (optional: tmb/attest/pcr.py falls back to Python without it).
from _typeshed import ReadableBuffer

MAX_TAGS: int

def hot_binary(
    buf: ReadableBuffer,
    pos: int,
    limit: int,
    pcr: int,
    tags: tuple[bytes, ...],
    v1: bytes,
    v2: bytes,
    bank2: str | None,
    per_bank: bool,
    t1: bytes,
    t2: bytes,
    /,
) -> tuple[int, int, bytes, bytes, bool]: ...
def hot_ascii(
    buf: ReadableBuffer,
    pos: int,
    pcr_tag: bytes,
    algs: tuple[tuple[bytes, bytes, int], ...],
    v1: bytes,
    v2: bytes,
    bank2: str | None,
    per_bank: bool,
    t1: bytes,
    t2: bytes,
    /,
) -> tuple[int, int, bytes, bytes, bool]: ...
