"""`python -m phisearch.ui` runs the `idx` command (useful where the script is not on PATH)."""

from .cli import main

main()
