"""The CURVE key files of remote augmenters: their layout, their format, and who may connect.

The gateway (pipeline/remote.py) reads its keypair and the allowed clients here;
`alexnetd keys` (service/keys.py) writes them with the same format code.

Layout, in RUN_DIR/remote/ (mode 0700, like the run directory):

    server.key            the daemon's keypair (mode 0600), made on first use
    clients/NAME.pub      public key of each allowed client host
    revoked/NAME.pub      a revoked client's public key, kept so `keys list` can show it

Every file is a zmq.auth certificate (ZPL text, `zmq.auth.load_certificate` reads its
keypair). A client's key file, which `alexnetd keys add NAME` writes (mode 0600) and the
CPU host gets a copy of, has one more line, the daemon's public key:

    metadata
        name = "NAME"
    curve
        public-key = "<client public, Z85>"
        secret-key = "<client secret, Z85>"
        server-public-key = "<daemon public, Z85>"

The client proves it holds the secret of an allowed public key (CURVE authentication)
and learns from the file which server to trust, so it cannot be talked to by an
impostor. The gateway re-reads clients/ for every handshake, and at least every
ALLOW_RELOAD seconds for the hosts already connected: `add` and `revoke` take effect
without restarting the daemon, and a revoked host's live connections are dropped.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import zmq
from zmq.utils import z85

__all__ = ["KeyFileError", "AllowedKeys", "keys_dir", "private_dir", "read_fields", "z85_key", "write_private",
           "certificate", "server_keypair", "allowed_clients", "ALLOW_RELOAD"]

ALLOW_RELOAD = 2.0    # seconds between re-reads of the allowed keys for connected hosts (revocation)
_LINE = re.compile(r'^\s*([a-z-]+)\s*=\s*"?([^"]*)"?\s*$')


class KeyFileError(ValueError):
    """A key problem the user can fix; the message is one line."""


def keys_dir(run_dir) -> Path:
    return Path(run_dir) / "remote"


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def read_fields(path: Path) -> dict:
    """key = "value" lines of a ZPL certificate (comments and section names ignored)."""
    out = {}
    for line in Path(path).read_text().splitlines():
        match = _LINE.match(line)
        if match and not line.lstrip().startswith("#"):
            out[match.group(1)] = match.group(2)
    return out


def z85_key(value: str, what: str, path: Path) -> bytes:
    raw = value.encode()
    if len(raw) != 40:
        raise KeyFileError(f"{path}: {what} is not a 40-character Z85 CURVE key")
    return raw


def write_private(path: Path, text: str) -> None:
    # Created 0600 from the start: a secret never sits in a world-readable file, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def certificate(banner: str, metadata: dict, keys: dict) -> str:
    lines = [f"#   {banner}", f"#   made {time.strftime('%Y-%m-%d %H:%M:%S')}", "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in metadata.items()]
    lines.append("curve")
    lines += [f'    {k} = "{v.decode() if isinstance(v, bytes) else v}"' for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def server_keypair(run_dir) -> tuple[bytes, bytes]:
    """(public, secret) of the daemon, made on first use."""
    if not zmq.has("curve"):
        raise KeyFileError("this pyzmq/libzmq has no CURVE support; remote augmenters need it")
    path = private_dir(keys_dir(run_dir)) / "server.key"
    if not path.exists():
        public, secret = zmq.curve_keypair()
        try:
            write_private(path, certificate("alexnetd daemon keypair: keep secret", {},
                                            {"public-key": public, "secret-key": secret}))
        except FileExistsError:
            pass  # made by a concurrent `keys add`
    fields = read_fields(path)
    return (z85_key(fields.get("public-key", ""), "public-key", path),
            z85_key(fields.get("secret-key", ""), "secret-key", path))


def allowed_clients(run_dir) -> dict[str, str]:
    """Z85 public key -> name of every allowed client: the text zmq.auth hands its
    credentials provider, and the User-Id it gives each connection."""
    out = {}
    for path in (keys_dir(run_dir) / "clients").glob("*.pub"):
        try:
            raw = z85.decode(read_fields(path).get("public-key", "").encode())
        except (OSError, ValueError):
            continue  # a half-written or damaged entry allows nobody
        if len(raw) == 32:
            # Re-encoded, so the entry compares equal to the key as libzmq received it.
            out[z85.encode(raw).decode()] = path.stem
    return out


class AllowedKeys:
    """zmq.auth's credentials provider (`configure_curve_callback`): admits a CURVE key
    listed in clients/ now, and names the host each connected key belongs to."""

    def __init__(self, run_dir):
        self.run_dir = run_dir
        self.names: dict[str, str] = {}
        self.read_at = float("-inf")

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the authenticator's thread with the Z85 key of each handshake."""
        # Every handshake sees the current list: a key added a moment ago is admitted.
        self._reload()
        return key.decode("ascii", "replace") in self.names

    def name_of(self, key: str | None) -> str | None:
        """The name of a connected host's key (its User-Id), None once it is revoked."""
        if time.monotonic() - self.read_at > ALLOW_RELOAD:
            self._reload()
        return self.names.get(key) if key else None

    def _reload(self) -> None:
        # Called from the authenticator's thread and the gateway's: each swaps in a whole
        # new dict, so either reader sees one complete list, never a half-built one.
        self.names, self.read_at = allowed_clients(self.run_dir), time.monotonic()
