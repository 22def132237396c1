"""Credentials of a platform on one machine (`strata up`, `strata demo`): the development JWT
secret kept in STRATA_HOME and the tokens.env file with one development token per role.

The launcher writes them and the demo reads them; both import this module, not each other."""

from __future__ import annotations

import os
import secrets
import shlex
from pathlib import Path

from services.common.auth import mint_token
from services.common.client import ClientTLS

DEV_ROLES = ["viewer", "developer", "approver", "admin"]


def dev_secret(home: Path) -> str:
    """STRATA_JWT_SECRET, else a random secret kept (0600) in STRATA_HOME for local use."""
    if os.environ.get("STRATA_JWT_SECRET"):
        return os.environ["STRATA_JWT_SECRET"]
    path = home / "dev-secret"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def write_tokens(home: Path, secret: str | None, tls: ClientTLS | None = None) -> Path:
    """`source .strata/tokens.env`: development tokens (30 days), one per role (none without
    auth), and the client TLS settings the CLI needs to reach this platform."""
    lines = [f"export STRATA_{role.upper()}_TOKEN={mint_token(secret, f'dev-{role}', [role], ttl_seconds=30 * 86400)}"
             for role in DEV_ROLES] if secret else []
    if secret:
        lines.append("export STRATA_TOKEN=$STRATA_ADMIN_TOKEN")
    if tls is not None:
        for var, path in (("STRATA_TLS_CA_FILE", tls.ca_file), ("STRATA_TLS_CLIENT_CERT_FILE", tls.cert_file),
                          ("STRATA_TLS_CLIENT_KEY_FILE", tls.key_file)):
            if path is not None:
                lines.append(f"export {var}={shlex.quote(str(path.resolve()))}")
    path = home / "tokens.env"
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path
