"""Signatures on catalog updates, so that relayed updates stay authentic.

Updates travel through other nodes (each node relays what it accepts, see
:mod:`.replicated`), and a joiner takes every origin's records from one member's
snapshot.  Neither a relay nor a snapshot server may speak for the origin: every
``KV`` and ``BYE`` a node originates carries its Ed25519 signature over
``(kind, sender, epoch, seq, key, value)``, made with a key pair the node makes
for each run.  The public key is part of the node's descriptor
(:class:`~.membership.PeerInfo` ``key``), which a node believes only once the
descriptor's own RPC endpoint answers ``ping`` with exactly it; receivers verify
every update, and every record inside a snapshot, against that key.
"""

from __future__ import annotations

from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

#: Bytes in an Ed25519 signature; hex digits in a public key as descriptors carry it.
SIG_BYTES = 64
KEY_HEX = 64


def signed_bytes(kind: bytes, sender: str, epoch: int, seq: int, key: str,
                 value: dict[str, Any] | None) -> bytes:
    """What a signature covers: msgpack of the fields, so a relay that decodes and
    re-encodes a message (or a snapshot that carries the record as a map) keeps it
    verifiable."""
    return msgpack.packb([kind, sender, epoch, seq, key, value], use_bin_type=True)


class Signer:
    """This run's key pair."""

    def __init__(self) -> None:
        self._key = Ed25519PrivateKey.generate()
        self.public_hex = self._key.public_key().public_bytes(
            Encoding.Raw, PublicFormat.Raw).hex()

    def sign(self, kind: bytes, sender: str, epoch: int, seq: int, key: str,
             value: dict[str, Any] | None) -> bytes:
        return self._key.sign(signed_bytes(kind, sender, epoch, seq, key, value))


class Verifier:
    """Checks signatures against public keys given as hex (parsed keys are cached)."""

    def __init__(self) -> None:
        self._keys: dict[str, Ed25519PublicKey] = {}

    def verify(self, public_hex: str, sig: bytes, kind: bytes, sender: str, epoch: int,
               seq: int, key: str, value: dict[str, Any] | None) -> bool:
        if len(public_hex) != KEY_HEX or len(sig) != SIG_BYTES:
            return False
        pub = self._keys.get(public_hex)
        if pub is None:
            try:
                pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
            except ValueError:
                return False
            if len(self._keys) > 65_536:  # keys come from descriptors: stay bounded
                self._keys.clear()
            self._keys[public_hex] = pub
        try:
            pub.verify(sig, signed_bytes(kind, sender, epoch, seq, key, value))
        except InvalidSignature:
            return False
        return True
