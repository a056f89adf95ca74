"""Deterministic, uncompressed tar writing for webdataset shards.

Every header field that could vary between runs or machines is fixed (mtime 0, uid/gid 0,
owner ``mythos``, mode 0644, ustar format, members in the order given), so the same samples give
byte-identical shards and the shard sha256 is a content hash. Uncompressed, because random access
(``wids``, our offset index) needs member data at fixed byte offsets.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable

OWNER = "mythos"


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """The bytes of a tar archive holding ``(name, data)`` members in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = OWNER
            info.type = tarfile.REGTYPE
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
