"""The nemesis: fault campaigns against a real cluster on loopback (issue 5, docs/nemesis.md).

`campaign.campaign(Options)` starts a coordinator, storage nodes and a FUSE mount as real
processes behind TCP proxies (`proxy`, `cluster`), runs writers and readers (`workload`) while
`faults.Nemesis` kills, pauses, partitions, slows, fills and corrupts, records every operation
(`history`), then heals the cluster and judges the history and the final state (`checker`,
`final`). `python -m dfs.nemesis` / scripts/nemesis is the command line.
"""
