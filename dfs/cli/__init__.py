"""The `dfs` command line (DESIGN.md §11)."""
