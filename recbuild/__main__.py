"""`python -m recbuild`: see recbuild/cli.py."""
import sys

from recbuild.cli import main

if __name__ == "__main__":
    sys.exit(main())
