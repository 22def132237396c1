"""`python -m services.monitoring`: run the monitoring service."""

from services.common.server import run
from services.monitoring.app import build_service

if __name__ == "__main__":
    run(build_service)
