"""`python -m worker.cli`: the same as the `fiscal-worker` console script."""

from worker.cli import main

if __name__ == "__main__":
    main()
