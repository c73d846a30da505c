"""What the DHT catalog stores under which key (kademlia hashes each with SHA-1).

Three kinds of key, so that several holders of one name never write the same
value (kademlia keeps one value per key, last writer wins):

* ``hpcflow/idx/NAME`` -- the **index** of a name: one signed entry per holder
  (which parts it holds, or none: a tombstone), merged entry by entry by every
  node that stores it (:class:`~hpcflow.catalog.dht.storage.PointerStorage`),
  so two holders announcing at once both stay listed.  One lookup finds every
  holder; the fan-out after it is bounded by the holders found.
* ``hpcflow/ptr/NAME[@PART]/HOLDER`` -- one **pointer** (a dataset record: size,
  dtype, shape, version, checksum ...) per (name, part, holder); only HOLDER
  writes it, so last-writer-wins is harmless (and versions decide, see
  :mod:`.values`).
* ``hpcflow/inv/HOLDER/PAGE`` -- a holder's **inventory**: the names it holds,
  paged to fit the value limit; only what a full listing (``hpcflow ls``) needs.
"""

from __future__ import annotations

from ..record import key_of

PREFIX = "hpcflow/"
IDX, PTR, INV = "idx", "ptr", "inv"


def index_key(name: str) -> str:
    return f"{PREFIX}{IDX}/{name}"


def pointer_key(name: str, part: int | None, holder: str) -> str:
    return f"{PREFIX}{PTR}/{key_of(name, part)}/{holder}"


def inventory_key(holder: str, page: int) -> str:
    return f"{PREFIX}{INV}/{holder}/{page}"


def kind_of(key: str) -> str:
    """``idx``, ``ptr`` or ``inv``; "" for a key that is none of ours."""
    if not key.startswith(PREFIX):
        return ""
    kind = key[len(PREFIX):].split("/", 1)[0]
    return kind if kind in (IDX, PTR, INV) else ""


def single_writer(key: str) -> str | None:
    """The only node that may write ``key`` (pointers and inventories name it last
    or second); None for an index, which every holder writes an entry of."""
    kind = kind_of(key)
    parts = key[len(PREFIX):].split("/")
    if kind == PTR and len(parts) == 3:
        return parts[2]
    if kind == INV and len(parts) == 3:
        return parts[1]
    return None
