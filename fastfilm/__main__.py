"""`python -m fastfilm`: the `fastfilm` command (`fastfilm.cli.main`), the one module that imports `cli`."""

from fastfilm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
