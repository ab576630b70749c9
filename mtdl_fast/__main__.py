"""``python -m mtdl_fast <command>``: the same CLI as the ``mtdl-fast`` console script."""
import sys

from mtdl_fast.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
