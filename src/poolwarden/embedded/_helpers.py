"""The small pieces every part of the embedded servers shares: the error type, the names of
the roles, database and host, and the password and port helpers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import socket

from ..errors import PoolwardenError

__all__ = [
    "DEFAULT_DATABASE",
    "DEFAULT_USER",
    "LOOPBACK",
    "SUPERUSER",
    "EmbeddedError",
    "free_port",
    "generate_password",
    "scram_verifier",
]

SUPERUSER = "postgres"
DEFAULT_USER = "poolwarden"
DEFAULT_DATABASE = "poolwarden"
LOOPBACK = "127.0.0.1"


class EmbeddedError(PoolwardenError):
    """An embedded server could not be found, created, started, stopped or queried."""


def scram_verifier(password: str, *, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for ``password`` (RFC 5802/7677).

    Setting the verifier instead of the password keeps the plain password out of the server's
    statement log and error messages.
    """
    salt = os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode()

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def generate_password() -> str:
    """A random password that contains ``@ : / %`` — characters that break naive DSN handling."""
    return f"pw{secrets.token_urlsafe(9)}@:/%{secrets.token_hex(3)}"


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
