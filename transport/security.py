"""ZeroMQ CURVE for a cluster that leaves loopback: encrypted links, and only listed workers.

`kairos keys DIR` writes a folder every process of the cluster reads with `--curve-keys DIR`:

  server.key, server.key_secret   the keypair of every listening socket (the router's, and each
                                  decode worker's KV socket); clients and workers need only the
                                  public half
  worker.key, worker.key_secret   the keypair workers present
  workers/                        the public keys allowed to act as workers (worker.key to
                                  start with; add more to admit workers with keys of their own)

A client presents a throwaway keypair: anyone holding the server's public key may send
requests. A worker must present a listed key: the router registers no other, and a decode
worker's KV socket completes no handshake with any other. Keys are checked by a ZAP handler
per process (pyzmq's authenticator thread), whose verdict each message carries as its
User-Id: the z85 text of the peer's public key.
"""

from __future__ import annotations

import ipaddress
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("kairos.security")

ANY_KEY = "kairos-any"  # ZAP domain of the router's socket: clients may use any key
WORKER_KEYS = "kairos-workers"  # ZAP domain of a decode worker's KV socket: listed keys only


def generate_keys(folder: str | Path) -> Path:
    """Writes a new server keypair, a worker keypair and the allowed-workers folder."""
    folder = Path(folder)
    if (folder / "server.key").exists():
        raise ValueError(f"{folder} already holds keys; remove it or choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    zmq.auth.create_certificates(folder, "server")
    public, _ = zmq.auth.create_certificates(folder, "worker")
    (folder / "workers").mkdir(exist_ok=True)
    shutil.copy(public, folder / "workers" / "worker.key")
    return folder


class _Listed:
    """A ZAP credentials check: the key (z85 bytes) is in the set, or any key is."""

    def __init__(self, keys: frozenset[bytes] | None):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        return self.keys is None or key in self.keys


@dataclass(frozen=True)
class CurveKeys:
    server_public: bytes
    server_secret: bytes | None  # only where a socket listens
    public: bytes  # what this process presents when it connects
    secret: bytes
    allowed_workers: frozenset[bytes]  # z85 public keys

    @classmethod
    def load(cls, folder: str | Path, role: str) -> CurveKeys:
        """role: "client" (a throwaway keypair, the server's public key), "worker" (the worker
        keypair, and the server's secret key for a decode worker's KV socket) or "router"."""
        folder = Path(folder)
        try:
            if role == "client":
                server_public, server_secret = zmq.auth.load_certificate(folder / "server.key")
                public, secret = zmq.curve_keypair()
            else:
                server_public, server_secret = zmq.auth.load_certificate(folder / "server.key_secret")
                public, secret = zmq.auth.load_certificate(folder / "worker.key_secret")
            allowed = frozenset(zmq.auth.load_certificates(folder / "workers")) if role != "client" else frozenset()
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read CURVE keys from {folder} ({e}); "
                             f"`kairos keys {folder}` writes them") from None
        if role != "client" and not allowed:
            raise ValueError(f"{folder / 'workers'} lists no worker keys")
        return cls(server_public, server_secret, public, secret, allowed)

    def listen(self, sock: zmq.Socket, domain: str) -> None:
        """Makes a socket, before it binds, a CURVE server whose peers ZAP checks in `domain`."""
        sock.curve_secretkey = self.server_secret
        sock.curve_publickey = self.server_public
        sock.curve_server = True
        sock.zap_domain = domain.encode()

    def connect(self, sock: zmq.Socket) -> None:
        """Makes a socket, before it connects, a CURVE client of the cluster's servers."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public

    def start_authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("kairos.zap"))
        auth.start()
        auth.configure_curve_callback(ANY_KEY, _Listed(None))
        auth.configure_curve_callback(WORKER_KEYS, _Listed(self.allowed_workers))
        return auth

    def is_worker(self, user_id: str | None) -> bool:
        return user_id is not None and user_id.encode() in self.allowed_workers


def warn_if_exposed(host: str, keys: CurveKeys | None, what: str) -> None:
    """A loud warning for a socket bound beyond loopback without CURVE."""
    if keys is not None:
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("!!! %s binds %s WITHOUT authentication or encryption: anyone who can reach it can "
                    "submit requests or pose as a worker. Use --curve-keys DIR (kairos keys DIR). !!!", what, host)
