"""`python -m services.inference`: run the inference service (one serving process per core)."""

from services.common.workers import main
from services.inference.app import build_service
from services.inference.tables import MIGRATIONS

if __name__ == "__main__":
    main("inference", build_service, MIGRATIONS)
