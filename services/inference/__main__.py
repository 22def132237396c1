"""`python -m services.inference`: run the inference service (one serving process per core)."""

from services.inference.app import main

if __name__ == "__main__":
    main()
