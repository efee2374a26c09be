"""A small DER (and BER indefinite-length) reader: enough of ASN.1 to walk a PKCS#7 SignedData and
the issuer of an X.509 certificate, which ``cryptography`` does not expose as raw bytes."""

from __future__ import annotations

from typing import NamedTuple


class _Tlv(NamedTuple):
    tag: int
    start: int  # first byte of the tag
    body: int  # first byte of the contents
    body_end: int  # end of the contents (before an end-of-contents marker)
    end: int  # first byte after the element


def _read(buf: bytes, pos: int, limit: int) -> _Tlv:
    if pos + 2 > limit:
        raise ValueError("DER element runs past its container")
    tag, first = buf[pos], buf[pos + 1]
    if tag & 0x1F == 0x1F:
        raise ValueError("high tag numbers are not used by PKCS#7")
    p = pos + 2
    if first == 0x80:  # BER indefinite length (constructed only): children up to 00 00
        if not tag & 0x20:
            raise ValueError("indefinite length on a primitive element")
        q = p
        while True:
            if q + 2 > limit:
                raise ValueError("indefinite-length element has no end-of-contents")
            if buf[q] == 0 and buf[q + 1] == 0:
                return _Tlv(tag, pos, p, q, q + 2)
            q = _read(buf, q, limit).end
    if first & 0x80:
        n = first & 0x7F
        if n > 4 or p + n > limit:
            raise ValueError("DER length field invalid")
        length = int.from_bytes(buf[p : p + n], "big")
        p += n
    else:
        length = first
    if p + length > limit:
        raise ValueError("DER element runs past its container")
    return _Tlv(tag, pos, p, p + length, p + length)


def _children(buf: bytes, node: _Tlv) -> list[_Tlv]:
    out, pos = [], node.body
    while pos < node.body_end:
        child = _read(buf, pos, node.body_end)
        out.append(child)
        pos = child.end
    return out


def _expect(node: _Tlv, tag: int, what: str) -> _Tlv:
    if node.tag != tag:
        raise ValueError(f"{what}: expected tag 0x{tag:02x}, got 0x{node.tag:02x}")
    return node


def _oid(buf: bytes, node: _Tlv) -> str:
    raw = buf[_expect(node, 0x06, "OBJECT IDENTIFIER").body : node.body_end]
    if not raw:
        raise ValueError("empty OBJECT IDENTIFIER")
    parts, value = [], 0
    for byte in raw:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    first = min(parts[0] // 40, 2)
    return ".".join(str(p) for p in [first, parts[0] - 40 * first, *parts[1:]])
