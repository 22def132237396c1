"""`python -m services.features`: run the feature service (one serving process per core)."""

from services.common.workers import main
from services.features.app import MIGRATIONS, build_service

if __name__ == "__main__":
    main("features", build_service, MIGRATIONS)
