"""The `dfs` command line (docs/design.md §11)."""
