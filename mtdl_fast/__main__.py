"""``python -m mtdl_fast <command>``: the same CLI as the ``mtdl-fast`` console script."""
from mtdl_fast.app.cli import script_main

if __name__ == "__main__":
    script_main()
