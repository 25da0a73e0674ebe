"""``python -m normscope``: the ``normscope`` command line."""

from normscope.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
