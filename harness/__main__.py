import sys

from .cli import main

if __name__ == "__main__":  # the runner's spawned workers import this module too
    sys.exit(main())
