"""`python -m gateway`: render the Envoy config for the given upstreams and run Envoy in the
foreground (as a container entry point or a sidecar).

    python -m gateway --upstream registry=127.0.0.1:50051 [--port 8080] [--admin-port 9901]

The HS256 secret comes from STRATA_JWT_SECRET, or a JWKS file from --jwks-file (RS256 in
production); STRATA_AUTH=disabled renders the gateway without JWT and RBAC. With the STRATA_TLS_*
client settings (STRATA_TLS_CA_FILE, STRATA_TLS_CLIENT_CERT_FILE/KEY_FILE) Envoy speaks TLS/mTLS
to the upstreams.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gateway.config import render_envoy_config
from gateway.envoy import envoy_binary, validate_config, write_config
from services.common.client import ClientTLS

DESCRIPTOR = Path(__file__).resolve().parent / "strata.pb"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", action="append", required=True, metavar="KEY=HOST:PORT",
                    help="a service and its gRPC address, e.g. registry=registry:50051 (repeatable)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--admin-port", type=int, default=9901)
    ap.add_argument("--jwks-file", type=Path, help="JWKS for RS256/ES256 tokens instead of the HS256 secret")
    ap.add_argument("--config-dir", type=Path, default=Path(os.environ.get("STRATA_HOME", ".strata")) / "gateway")
    ap.add_argument("--render-only", action="store_true", help="write and validate the config, do not run")
    args = ap.parse_args(argv)
    upstreams = {}
    for item in args.upstream:
        key, sep, addr = item.partition("=")
        if not sep:
            ap.error(f"--upstream {item!r}: expected KEY=HOST:PORT")
        upstreams[key] = addr
    auth = os.environ.get("STRATA_AUTH", "enabled") != "disabled"
    secret = os.environ.get("STRATA_JWT_SECRET")
    if auth and not (secret or args.jwks_file):
        ap.error("set STRATA_JWT_SECRET or --jwks-file (or STRATA_AUTH=disabled for local development)")
    config = render_envoy_config(
        upstreams=upstreams, descriptor_path=DESCRIPTOR, auth_enabled=auth,
        jwt_secret=None if args.jwks_file else secret,
        jwks_json=args.jwks_file.read_text() if args.jwks_file else None,
        listen_port=args.port, admin_port=args.admin_port, upstream_tls=ClientTLS.from_settings())
    path = write_config(config, args.config_dir)
    validate_config(path)
    if args.render_only:
        print(path)
        return 0
    os.execv(envoy_binary(), [envoy_binary(), "-c", str(path), "--use-dynamic-base-id"])


if __name__ == "__main__":
    sys.exit(main())
