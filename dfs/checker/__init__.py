"""The replica consistency checker and repair (`dfs check`, docs/checker.md).

- findings.py: the kinds of problem and the finding record (the --json contract);
- scan.py: sans-IO rules judging metadata, node listings and deep verdicts;
- collect.py: batched gathering from the coordinator and the nodes, and confirmation;
- repair.py: fixes through the coordinator, each one transaction;
- run.py: one check from start to end, as a Report.
"""

from dfs.checker.findings import Finding, Kind
from dfs.checker.run import Report, run_check

__all__ = ["Finding", "Kind", "Report", "run_check"]
