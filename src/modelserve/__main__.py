"""`python -m modelserve` is `modelserve`."""

from modelserve.cli import main

main()
