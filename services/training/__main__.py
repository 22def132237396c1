"""`python -m services.training`: run the training service (and its worker processes)."""

from services.common.server import run
from services.training.app import build_service

if __name__ == "__main__":
    run(build_service)
