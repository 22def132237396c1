"""`python -m services.features`: run the feature service."""

from services.common.server import run
from services.features.app import build_service

if __name__ == "__main__":
    run(build_service)
