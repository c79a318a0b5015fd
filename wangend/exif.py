"""The EXIF UserComment byte format that JPEG and WebP outputs carry their settings in.

The daemon writes it (media/persistence.py) and wangenctl reads it back without the
daemon (wangenctl/inspect.py), so the byte format is defined here, once, as pure
functions. It is a leaf like protocol.py: no I/O and nothing heavy is imported, so the
client can use it without loading the media stack.
"""

from __future__ import annotations

__all__ = ["decode_user_comment", "encode_user_comment"]


def encode_user_comment(text: str) -> bytes:
    """EXIF UserComment: an 8-byte charset id, then the text. Written with a little-endian
    EXIF block (media/persistence.py write_image), so UTF-16-LE."""
    return b"UNICODE\0" + text.encode("utf-16-le")


def decode_user_comment(raw: bytes | str, little_endian: bool | None = None) -> str | None:
    """The text of an EXIF UserComment, whatever charset id and byte order it uses."""
    if isinstance(raw, str):
        return raw
    head, body = raw[:8], raw[8:]
    if head.startswith(b"ASCII"):
        return body.decode("ascii", errors="replace").rstrip("\0")
    if head.startswith(b"UNICODE"):
        orders = ["utf-16-le", "utf-16-be"]
        if little_endian is False:
            orders.reverse()
        for encoding in orders:
            try:
                text = body.decode(encoding).rstrip("\0")
            except UnicodeDecodeError:
                continue
            if text.lstrip().startswith("{"):
                return text
        return None
    return body.decode("utf-8", errors="replace").rstrip("\0") if body else None
