"""CURVE keys for remote augmenter hosts: the daemon's keypair and its allowed clients.

Layout, in RUN_DIR/remote/ (mode 0700, like the run directory):

    server.key            the daemon's keypair (mode 0600), made on first use
    clients/NAME.pub      public key of each allowed client host
    revoked/NAME.pub      a revoked client's public key, kept so `keys list` can show it

A client key file, `alexnetd keys add NAME` writes it (mode 0600) and the CPU host gets
a copy, is a zmq.auth certificate (ZPL text, `zmq.auth.load_certificate` reads its
keypair) with one more line, the daemon's public key:

    metadata
        name = "NAME"
    curve
        public-key = "<client public, Z85>"
        secret-key = "<client secret, Z85>"
        server-public-key = "<daemon public, Z85>"

The client proves it holds the secret of an allowed public key (CURVE authentication)
and learns from the file which server to trust, so it cannot be talked to by an
impostor. The gateway re-reads clients/ for every handshake: `add` and `revoke` take
effect without restarting the daemon, and a revoked host's live connections are dropped.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import zmq
from zmq.utils import z85

__all__ = ["KeyFileError", "ClientKey", "keys_dir", "server_keypair", "add_client", "revoke_client", "list_clients",
           "allowed_clients", "read_client_key", "NAME_PATTERN"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LINE = re.compile(r'^\s*([a-z-]+)\s*=\s*"?([^"]*)"?\s*$')


class KeyFileError(ValueError):
    """A key problem the user can fix; the message is one line."""


class ClientKey:
    def __init__(self, name: str, public: bytes, secret: bytes, server_public: bytes):
        self.name, self.public, self.secret, self.server_public = name, public, secret, server_public


def keys_dir(run_dir) -> Path:
    return Path(run_dir) / "remote"


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _fields(path: Path) -> dict:
    """key = "value" lines of a ZPL certificate (comments and section names ignored)."""
    out = {}
    for line in path.read_text().splitlines():
        match = _LINE.match(line)
        if match and not line.lstrip().startswith("#"):
            out[match.group(1)] = match.group(2)
    return out


def _z85(value: str, what: str, path: Path) -> bytes:
    raw = value.encode()
    if len(raw) != 40:
        raise KeyFileError(f"{path}: {what} is not a 40-character Z85 CURVE key")
    return raw


def _write(path: Path, text: str) -> None:
    # Created 0600 from the start: a secret never sits in a world-readable file, even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def _cert(banner: str, metadata: dict, keys: dict) -> str:
    lines = [f"#   {banner}", f"#   made {time.strftime('%Y-%m-%d %H:%M:%S')}", "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in metadata.items()]
    lines.append("curve")
    lines += [f'    {k} = "{v.decode() if isinstance(v, bytes) else v}"' for k, v in keys.items()]
    return "\n".join(lines) + "\n"


def server_keypair(run_dir) -> tuple[bytes, bytes]:
    """(public, secret) of the daemon, made on first use."""
    if not zmq.has("curve"):
        raise KeyFileError("this pyzmq/libzmq has no CURVE support; remote augmenters need it")
    path = _private_dir(keys_dir(run_dir)) / "server.key"
    if not path.exists():
        public, secret = zmq.curve_keypair()
        try:
            _write(path, _cert("alexnetd daemon keypair: keep secret", {}, {"public-key": public, "secret-key": secret}))
        except FileExistsError:
            pass  # made by a concurrent `keys add`
    fields = _fields(path)
    return (_z85(fields.get("public-key", ""), "public-key", path),
            _z85(fields.get("secret-key", ""), "secret-key", path))


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise KeyFileError(f"{name!r} is not a key name: use letters, digits, '.', '_' or '-' (64 at most)")


def add_client(run_dir, name: str, out: Path) -> Path:
    """Allow a new client host; write its key file to `out` (never overwritten)."""
    _check_name(name)
    server_public, _ = server_keypair(run_dir)
    clients = _private_dir(keys_dir(run_dir) / "clients")
    if (clients / f"{name}.pub").exists():
        raise KeyFileError(f"a key named {name!r} exists already; revoke it first or choose another name")
    out = Path(out)
    if out.exists():
        raise KeyFileError(f"{out} exists; not overwriting it")
    public, secret = zmq.curve_keypair()
    try:
        _write(out, _cert(f"alexnetd remote augmenter key {name!r}: holds a secret key, keep it private",
                          {"name": name}, {"public-key": public, "secret-key": secret,
                                           "server-public-key": server_public}))
    except OSError as exc:
        raise KeyFileError(f"cannot write {out}: {exc.strerror}") from None
    revoked = keys_dir(run_dir) / "revoked" / f"{name}.pub"
    revoked.unlink(missing_ok=True)  # the name is reused with a fresh key
    _write(clients / f"{name}.pub", _cert(f"allowed remote augmenter {name!r}", {"name": name}, {"public-key": public}))
    return out


def revoke_client(run_dir, name: str) -> None:
    _check_name(name)
    path = keys_dir(run_dir) / "clients" / f"{name}.pub"
    if not path.exists():
        raise KeyFileError(f"no key named {name!r} in {keys_dir(run_dir) / 'clients'}")
    revoked = _private_dir(keys_dir(run_dir) / "revoked")
    os.replace(path, revoked / f"{name}.pub")


def list_clients(run_dir) -> list[dict]:
    """[{name, public_key, state: allowed|revoked, added}] sorted by name."""
    rows = []
    for state, folder in (("allowed", "clients"), ("revoked", "revoked")):
        for path in sorted((keys_dir(run_dir) / folder).glob("*.pub")):
            rows.append({"name": path.stem, "public_key": _fields(path).get("public-key", ""), "state": state,
                         "added": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))})
    return sorted(rows, key=lambda r: (r["name"], r["state"]))


def allowed_clients(run_dir) -> dict[bytes, str]:
    """Raw 32-byte public key -> name of every allowed client (what ZAP compares)."""
    out = {}
    for path in (keys_dir(run_dir) / "clients").glob("*.pub"):
        try:
            public = _fields(path).get("public-key", "")
            out[z85.decode(public.encode())] = path.stem
        except (OSError, ValueError):
            continue  # a half-written or damaged entry allows nobody
    return out


def read_client_key(path) -> ClientKey:
    path = Path(path)
    try:
        fields = _fields(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not an alexnetd key file") from None
    missing = [k for k in ("public-key", "secret-key", "server-public-key") if k not in fields]
    if missing:
        raise KeyFileError(f"{path} is not an alexnetd client key file (no {', '.join(missing)}); "
                        "make one with `alexnetd keys add NAME` on the daemon's host")
    return ClientKey(fields.get("name", path.stem), _z85(fields["public-key"], "public-key", path),
                     _z85(fields["secret-key"], "secret-key", path),
                     _z85(fields["server-public-key"], "server-public-key", path))
