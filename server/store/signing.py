"""Ed25519 checkpoints of the chain head, signed with a key kept outside the database.

A chain alone can be recomputed whole by whoever can write the database; a signed (seq, chain_hash)
pins every record up to seq. Checkpoints are stored in the database and, optionally, appended to a
log file beside the key, so that deleting the stored ones does not erase the evidence.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .records import canonical, sha256_hex


def key_id(public_key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key (stored with each signature)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sha256_hex(raw)[:16]


def load_signing_key(path: str | os.PathLike, create: bool = False) -> Ed25519PrivateKey:
    """Load a PEM (PKCS#8) Ed25519 private key; with ``create``, make one (mode 0600) if absent."""
    path = Path(path)
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"signing key {path} does not exist")
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        return key
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"signing key {path}: not an Ed25519 private key")
    return key


def load_public_key(source: str | os.PathLike | bytes | Ed25519PublicKey | Ed25519PrivateKey) -> Ed25519PublicKey:
    """A trusted public key from a key object, PEM bytes, or a PEM file (public or private)."""
    if isinstance(source, Ed25519PublicKey):
        return source
    if isinstance(source, Ed25519PrivateKey):
        return source.public_key()
    pem = source if isinstance(source, bytes) else Path(source).read_bytes()
    if b"PRIVATE KEY" in pem:
        key = serialization.load_pem_private_key(pem, password=None).public_key()
    else:
        key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("public key: not an Ed25519 key")
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement "the chain up to ``seq`` ends in ``chain_hash``"."""

    seq: int
    chain_hash: str
    signed_us: int
    key_id: str
    signature: str  # hex

    @staticmethod
    def message(seq: int, chain_hash: str, signed_us: int, kid: str) -> bytes:
        return canonical({"v": 1, "seq": seq, "chain_hash": chain_hash, "signed_us": signed_us, "key_id": kid})

    @classmethod
    def sign(cls, key: Ed25519PrivateKey, seq: int, chain_hash: str, signed_us: int) -> Checkpoint:
        kid = key_id(key.public_key())
        sig = key.sign(cls.message(seq, chain_hash, signed_us, kid)).hex()
        return cls(seq, chain_hash, signed_us, kid, sig)

    def valid_under(self, public_key: Ed25519PublicKey) -> bool:
        try:
            public_key.verify(bytes.fromhex(self.signature),
                              self.message(self.seq, self.chain_hash, self.signed_us, self.key_id))
        except (InvalidSignature, ValueError):
            return False
        return True

    def to_json(self) -> bytes:
        return orjson.dumps(asdict(self))


def append_checkpoint_log(path: str | os.PathLike, checkpoint: Checkpoint) -> None:
    """Append one checkpoint as a JSON line, synced: the copy an attacker on the database cannot reach."""
    with open(path, "ab") as f:
        f.write(checkpoint.to_json() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_checkpoint_log(path: str | os.PathLike) -> list[Checkpoint]:
    out = []
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line.strip():
            try:
                out.append(Checkpoint(**orjson.loads(line)))
            except (orjson.JSONDecodeError, TypeError) as e:
                raise ValueError(f"checkpoint log {path}, line {n}: {e}") from None
    return out
