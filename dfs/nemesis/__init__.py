"""The nemesis: fault campaigns against a real cluster on loopback (issue 5, docs/nemesis.md).

`campaign.campaign(Options)` starts a coordinator, storage nodes and two FUSE mounts as real
processes behind TCP proxies (`proxy`, `cluster`), runs writers and readers (`workload`) while
`faults.Nemesis` kills, pauses, partitions, slows, fills and corrupts, records every operation
(`history`), then heals the cluster and judges the history and the final state (`checker`,
`final`). `python -m dfs.nemesis` / scripts/nemesis is the command line.
`mount_writers` and `finished` are writers of every shape through a mount and the judge of
the versions they leave (issue 17; tests/test_mount_writers.py uses them); `mount_load` runs
them in a campaign, under its faults, and `mount_ends` settles which of their writes whose
end failed may still have committed.
"""
