"""`python -m services.registry`: run the model registry service."""

from services.common.server import run
from services.registry.app import build_service

if __name__ == "__main__":
    run(build_service)
