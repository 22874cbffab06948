"""The compose stack's `.env`: `.env.example` with a fresh secret for each `change-me`.

`scripts/stack env` and `scripts/stack up` run this file with the system python3, before a virtual
environment or anything else of the project exists, so it uses the standard library only and imports
nothing from the package:

    python3 tasks/dermaops/stack_env.py .env.example .env DOCKER_GID

The target is created with mode 0600 and never overwritten: a running stack keeps using the secrets it
was started with.
"""

from __future__ import annotations

import base64
import os
import secrets
import sys


def fresh_value(name: str, value: str, docker_gid: str) -> str:
    """The value a line of .env.example gets in the deployment's .env."""
    if name == "AIRFLOW__CORE__FERNET_KEY":
        # 32 random bytes, urlsafe base64, as cryptography's Fernet.generate_key() makes it.
        return base64.urlsafe_b64encode(os.urandom(32)).decode()
    if name == "DOCKER_GID":
        return docker_gid  # the group of the host's docker.sock, for the workers' DockerOperator
    if value != "change-me":
        return value
    if name.startswith("DERMAOPS_S3_") and name.endswith("_SECRET_KEY"):
        return secrets.token_hex(16)  # a stage role's S3 secret, 32 characters: MinIO takes at most 40
    if "PASSWORD" in name:
        return secrets.token_urlsafe(24)
    # 64 characters: the API's secret key signs HS512 tokens, and PyJWT wants 64 bytes for SHA-512.
    return secrets.token_hex(32)


def render(example: str, docker_gid: str) -> str:
    """The .env text for `example` (comments and blank lines kept as they are)."""
    out = []
    for line in example.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            line = f"{name}{sep}{fresh_value(name, value, docker_gid)}"
        out.append(line)
    return "\n".join(out) + "\n"


def write(example_path: str, target: str, docker_gid: str) -> None:
    with open(example_path) as f:
        text = render(f.read(), docker_gid)
    # O_EXCL: an existing file (a running stack's secrets) is an error here, never replaced.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: stack_env.py EXAMPLE TARGET DOCKER_GID", file=sys.stderr)
        return 2
    try:
        write(*argv)
    except OSError as exc:
        print(f"stack env: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
