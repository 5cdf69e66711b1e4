"""How items become stream entries, and back.

An entry carries the item in field ``d``; with an ordered run, its sequence
path in ``q``; with the pickle codec, an HMAC-SHA256 of ``d`` in ``s``.

- ``msgpack`` (the default) and ``json`` carry plain data only (None, bool,
  int, float, str, bytes with msgpack, lists, dicts); tuples come back as
  lists, but as dict keys (msgpack), where a list cannot be one. Decoding them
  never runs code.
- ``pickle`` carries any picklable object (cloudpickle, so lambdas too), and
  only with a secret key shared by the driver and the workers: every entry
  is signed, and an entry whose signature is missing or wrong is refused
  (`PayloadRejected`) before a single byte of it is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import pickle
from typing import Any

from ..errors import (
    ConfigurationError,
    ConfigurationTypeError,
    PayloadRejected,
    RemoteError,
    SerializationError,
)
from ..stage import Failure

__all__ = [
    "CODECS",
    "MAX_ENTRY_BYTES",
    "SECRET_ENV",
    "Codec",
    "check_secret_key",
    "child_path",
    "decode_failure",
    "dump_path",
    "encode_failure",
    "get_codec",
    "key_check",
    "load_path",
]

CODECS = ("msgpack", "json", "pickle")
MAX_ENTRY_BYTES = 512 * 2**20
"""The largest item an entry carries: the largest value Redis takes in a command
(``proto-max-bulk-len``, 512 MiB by default). Redis closes the connection on a
bigger one, which would look like an outage."""
SECRET_ENV = "CONVEYOR_SECRET_KEY"
"""Environment variable read for the pickle codec's key when none is passed."""
MIN_KEY_BYTES = 16
"""The shortest secret key the pickle codec signs with (HMAC-SHA256)."""


class Codec:
    """Turns items into entry fields and back; plain data, no signature (msgpack)."""

    name = "msgpack"

    def dumps(self, value: Any) -> bytes:
        """The item's bytes (field ``d``)."""
        import msgpack

        try:
            data: bytes = msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise SerializationError(
                f"the {self.name} codec cannot carry {type(value).__name__} {value!r:.60}: {exc}. "
                f"Use plain data, or codec='pickle' with a secret key"
            ) from exc
        return data

    def loads(self, data: bytes) -> Any:
        """The item back from its bytes."""
        import msgpack

        try:
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        except TypeError:
            # A dict key that was a tuple comes back as a list, which cannot be a key:
            # read it again with such keys as tuples (only then: the hook costs time).
            return msgpack.unpackb(
                data, raw=False, strict_map_key=False, object_pairs_hook=_with_tuple_keys
            )

    def sign(self, data: bytes) -> bytes | None:
        """The signature of ``data`` (field ``s``), or None when the codec signs nothing."""
        return None

    def verify(self, data: bytes, signature: bytes | None) -> None:
        """Check the signature of ``data`` (a pack's body); nothing to check unsigned.

        Raises:
            PayloadRejected: (pickle) the signature is missing or wrong.
        """

    def item_bytes(self, value: Any) -> bytes:
        """The item's bytes, refused when Redis could not take them in one value.

        Raises:
            SerializationError: the codec cannot encode it, or it is over `MAX_ENTRY_BYTES`.
        """
        data = self.dumps(value)
        if len(data) > MAX_ENTRY_BYTES:
            raise SerializationError(
                f"an item of {len(data)} bytes ({type(value).__name__}, {self.name} codec) is over "
                f"the {MAX_ENTRY_BYTES} bytes Redis takes in one value (proto-max-bulk-len): "
                f"send a reference to it (a path, a key) instead"
            )
        return data

    def encode(self, value: Any) -> list[bytes]:
        """The item as a flat list of entry fields: ``[b"d", data, (b"s", sig)]``."""
        data = self.item_bytes(value)
        signature = self.sign(data)
        return [b"d", data] if signature is None else [b"d", data, b"s", signature]

    def decode(self, fields: dict[bytes, bytes]) -> Any:
        """The item of an entry.

        Raises:
            PayloadRejected: the entry has no item, or (pickle) a bad signature.
        """
        data = fields.get(b"d")
        if data is None:
            raise PayloadRejected("the entry has no 'd' field")
        return self.loads(data)


def _with_tuple_keys(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """A decoded map whose list keys (tuples when encoded) are tuples again."""
    return {_as_key(key): value for key, value in pairs}


def _as_key(key: Any) -> Any:
    return tuple(_as_key(x) for x in key) if isinstance(key, list) else key


class JsonCodec(Codec):
    """Plain data as JSON text (readable with redis-cli)."""

    name = "json"

    def dumps(self, value: Any) -> bytes:
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=True).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"the json codec cannot carry {type(value).__name__} {value!r:.60}: {exc}"
            ) from exc

    def loads(self, data: bytes) -> Any:
        return json.loads(data)


class PickleCodec(Codec):
    """Any picklable object, signed with HMAC-SHA256; unsigned entries are refused."""

    name = "pickle"

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigurationError(
                f"the pickle codec's secret key must be at least {MIN_KEY_BYTES} bytes"
            )
        self._key = key

    def dumps(self, value: Any) -> bytes:
        import cloudpickle

        try:
            data: bytes = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise SerializationError(
                f"cannot pickle {type(value).__name__} {value!r:.60}: {exc}"
            ) from exc
        return data

    def sign(self, data: bytes) -> bytes:
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def verify(self, data: bytes, signature: bytes | None) -> None:
        if signature is None:
            raise PayloadRejected("unsigned pickle entry refused (it was not unpickled)")
        if not hmac.compare_digest(signature, self.sign(data)):
            raise PayloadRejected("pickle entry with a wrong signature refused (not unpickled)")

    def loads(self, data: bytes) -> Any:
        """The item back from bytes whose signature was checked (`verify`)."""
        return pickle.loads(data)

    def decode(self, fields: dict[bytes, bytes]) -> Any:
        data = fields.get(b"d")
        if data is None:
            raise PayloadRejected("the entry has no 'd' field")
        self.verify(data, fields.get(b"s"))
        return pickle.loads(data)


def key_check(key: bytes | None) -> str:
    """A fingerprint of the secret key, stored with the run so workers can tell a wrong key."""
    if key is None:
        return ""
    return hmac.new(key, b"conveyor key check", hashlib.sha256).hexdigest()[:16]


def check_secret_key(key: object, where: str) -> None:
    """Refuse a ``secret_key`` that is neither bytes, a str nor None, or that is too short
    to sign with (whatever the codec: a worker meets runs of every codec)."""
    if key is None:
        return
    if not isinstance(key, (bytes, str)):
        raise ConfigurationTypeError(
            f"{where} 'secret_key' must be bytes, a str or None, got {type(key).__name__}"
        )
    size = len(key.encode() if isinstance(key, str) else key)
    if size < MIN_KEY_BYTES:
        raise ConfigurationError(
            f"{where} 'secret_key' must be at least {MIN_KEY_BYTES} bytes, got {size}"
        )


def secret_from(key: bytes | str | None) -> bytes | None:
    """The secret key as bytes: ``key`` itself, else the environment variable, else None.

    Raises:
        ConfigurationError: the environment variable is set but shorter than
            ``MIN_KEY_BYTES``.
    """
    if key is None:
        env = os.environ.get(SECRET_ENV)
        if not env:
            return None
        if len(env.encode()) < MIN_KEY_BYTES:
            raise ConfigurationError(
                f"the {SECRET_ENV} environment variable must be at least {MIN_KEY_BYTES} "
                f"bytes, got {len(env.encode())}"
            )
        return env.encode()
    return key.encode() if isinstance(key, str) else key


def get_codec(name: str, key: bytes | None = None) -> Codec:
    """The codec called ``name``.

    Raises:
        ConfigurationError: an unknown name, or ``pickle`` without a key.
    """
    if name == "msgpack":
        return Codec()
    if name == "json":
        return JsonCodec()
    if name == "pickle":
        if key is None:
            raise ConfigurationError(
                f"codec='pickle' needs a secret key shared by the driver and the workers: "
                f"pass secret_key=... or set {SECRET_ENV}"
            )
        return PickleCodec(key)
    allowed = ", ".join(repr(c) for c in CODECS)
    raise ConfigurationError(f"'codec' must be one of {allowed}; got {name!r}")


# ---------------------------------------------------------------------- failures

# A failure (an item given up on with on_error="skip") in the run's failures
# stream: the stage, the attempts, a line of text for people (`conveyor status`,
# redis-cli), the item as the run's codec carries items (d, s), and the error as
# a `conveyor.remote.ExceptionRecord` through the same codec (ed, es), so the
# driver gets the item back as itself and the exception as its own class.


def encode_failure(codec: Codec, failure: Failure) -> dict[str | bytes, Any]:
    """The fields of a failure's entry in the failures stream."""
    from ..remote import capture

    fields: dict[str | bytes, Any] = {
        "stage": failure.stage,
        "attempts": failure.attempts,
        "text": f"{type(failure.error).__name__}: {failure.error} (item {failure.item!r:.200})",
    }
    try:
        fields.update(_named(codec.encode(failure.item), b"d", b"s"))
    except Exception:
        pass  # an item the codec cannot carry back: the text still names it
    record = capture(failure.error, codec.dumps).as_dict()
    fields.update(_named(codec.encode(record), b"ed", b"es"))
    return fields


def decode_failure(codec: Codec, fields: dict[bytes, bytes]) -> Failure:
    """A failure back from its entry: the item and the exception as themselves where
    they can be (see `encode_failure`); else the text."""
    from ..remote import ExceptionRecord, rebuild

    text = fields.get(b"text", b"").decode(errors="replace")
    item: Any = text
    if b"d" in fields:
        item = codec.decode(fields)
    error: BaseException
    if b"ed" in fields:
        record = codec.decode({b"d": fields[b"ed"], **_present(b"s", fields.get(b"es"))})
        error = rebuild(ExceptionRecord.from_dict(record))
    else:
        error = RemoteError(text)
    return Failure(
        stage=fields.get(b"stage", b"?").decode(errors="replace"),
        item=item,
        error=error,
        attempts=int(fields.get(b"attempts", b"1")),
    )


def _named(encoded: list[bytes], data: bytes, signature: bytes) -> dict[str | bytes, Any]:
    """An encoded item's fields under other names (``d``/``s`` -> ``data``/``signature``)."""
    names = {b"d": data, b"s": signature}
    return {names[encoded[i]]: encoded[i + 1] for i in range(0, len(encoded), 2)}


def _present(name: bytes, value: bytes | None) -> dict[bytes, bytes]:
    return {} if value is None else {name: value}


# Sequence paths (`conveyor.ordering`) travel in field ``q``.


def dump_path(path: list[int]) -> bytes:
    """A path as the bytes of field ``q``."""
    import msgpack

    data: bytes = msgpack.packb(path)
    return data


def load_path(data: bytes) -> list[int]:
    """A path back from field ``q``."""
    import msgpack

    path: list[int] = msgpack.unpackb(data)
    return path


def child_path(parent: bytes, j: int, k: int) -> bytes:
    """The path of output ``j`` of ``k`` (k > 1) produced from the entry at ``parent``."""
    return dump_path([*load_path(parent), j, k])
