"""Allow ``python -m busdx``."""

from busdx.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
