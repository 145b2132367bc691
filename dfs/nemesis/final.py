"""After the campaign: wait for the healed cluster to settle, judge it, then repair it.

In order (the judge comes before the repair, so a lost replica cannot be healed unseen):

1. settle: every member node up, no transaction in flight or owing COMMITs, no read repair
   queued, re-replication done, leftovers of the campaign cleaned up over the wire. A bounded
   wait; a cluster that never settles is a violation (`unsettled`) with the reason;
2. judge: the first `dfs check --deep --json`; every finding must be explained by a fault in
   the nemesis's ledger (judge.py), else it is an `unexplained-finding`;
3. `dfs check --deep --repair`, then `dfs check --deep` must exit 0 (`dfs-check`);
4. file by file, over the wire: the content is exactly one write's (no mix), not a failed
   write's; no ok write is lost (I2); every listed replica, R distinct nodes, holds that
   version COMMITTED and its bytes verify chunk by chunk and as a whole (I1, I4);
5. no blob on any node is left that no file references (as its current version, or as a kept
   one: the mount load's files keep theirs) once GC had time (I3).

Without the checker installed, 2 and 3 are skipped, and a replica damaged by an injected bit
flip is reported as unrepaired damage instead of a violation.
"""

from __future__ import annotations

import importlib.util
import io
import json
from dataclasses import dataclass, field
from typing import Any

import trio

from dfs.chunks import chunk_length, chunk_problem, file_checksum, nchunks
from dfs.client import Attr
from dfs.errors import DfsError
from dfs.nemesis.checker import Violation, check_recency
from dfs.nemesis.cluster import NemesisCluster
from dfs.nemesis.history import FAIL, INITIAL, OK, History
from dfs.nemesis.judge import Ledger, attribute, tally
from dfs.nemesis.workload import Workload
from dfs.rpc import Peer

SETTLE_TIMEOUT = 90.0  # nodes up, nothing in flight, re-replication done
LEFTOVER_TIMEOUT = 45.0  # staged timeouts, outcome queries and GC clean up the rest
CHECK_TIMEOUT = 300.0
LIVE_SILENCE = 2.0  # a draining node heard from this recently is live


@dataclass
class FinalReport:
    checker: str = "unavailable"
    checker_output: list[dict[str, Any]] = field(default_factory=list)
    judged: list[dict[str, Any]] = field(default_factory=list)  # the first check's findings
    explained: dict[str, int] = field(default_factory=dict)  # "corrupt_chunk explained": 1
    settled: str = ""
    unrepaired: list[str] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)


def checker_available() -> bool:
    return importlib.util.find_spec("dfs.cli.check") is not None


async def settle(cluster: NemesisCluster, workload: Workload, report: FinalReport) -> None:
    """Wait until the cluster has done what it does by itself; say why if it never does."""
    started = trio.current_time()
    reason: str | None = "the coordinator never answered status"
    with trio.move_on_after(SETTLE_TIMEOUT):
        while True:
            try:
                reason = unsettled(cluster, await cluster.status())
            except DfsError as e:
                reason = f"status failed: {e.code.value}: {e.msg}"
            if reason is None:
                break
            await trio.sleep(0.3)
    if reason is not None:
        reason += await _owed(cluster)
        report.settled = f"not settled after {SETTLE_TIMEOUT:g} s: {reason}"
        report.violations.append(Violation("unsettled", "*", report.settled))
        return
    leftovers = await wait_no_leftovers(cluster, workload, LEFTOVER_TIMEOUT)
    report.settled = f"settled in {trio.current_time() - started:.1f} s" + (
        f"; {len(leftovers)} leftover(s) still there for the check to judge" if leftovers
        else "")


async def _owed(cluster: NemesisCluster) -> str:
    """The transactions that still owe COMMITs, with their replicas' names, for the reason."""
    try:
        async with cluster.client(via="") as client:
            txns = [t for t in await client.txn_list() if t.get("state") == "committed"]
            names = cluster.names_by_id(await client.node_list())
    except DfsError:
        return ""
    owed = []
    for t in txns[:5]:
        replicas = ", ".join(f"{n} ({names.get(n, '?')})" for n in t.get("replicas", []))
        owed.append(f"txid {t['txid']} ino {t.get('ino')} replicas [{replicas}] acked "
                    f"{t.get('acked')} decided {t.get('age_s')} s ago")
    return f" ({'; '.join(owed)})" if owed else ""


def unsettled(cluster: NemesisCluster, status: dict[str, Any]) -> str | None:
    """Why the cluster is not settled yet, or None."""
    nodes = status.get("nodes", [])
    names = cluster.names_by_id(nodes)
    by_name = {names[int(n["id"])]: n for n in nodes if int(n["id"]) in names}
    for name in cluster.nodes:
        node = by_name.get(name)
        if node is None:
            return f"{name} is not registered"
        seen = node.get("last_seen_s")
        live = node["state"] == "up" or (node["state"] == "draining" and seen is not None
                                         and seen <= LIVE_SILENCE)
        if not live:
            return f"{name} (id {node['id']}) is {node['state']}"
    if status.get("inflight"):
        return f"{status['inflight']} transaction(s) in flight"
    if status.get("committing"):
        return f"{status['committing']} transaction(s) still owe COMMITs"
    queued = (status.get("repairs") or {}).get("queued")
    if queued:
        return f"{queued} read repair(s) queued"
    for entry in (status.get("rereplication") or {}).get("nodes", []):
        if not entry.get("clean"):
            return (f"re-replication: {entry.get('remaining')} replica(s) left on node "
                    f"{entry['id']} ({entry.get('reason')})")
    return None


async def _check(cluster: NemesisCluster, report: FinalReport, name: str, *args: str
                 ) -> tuple[int, Any]:
    """Run `dfs check ARGS --json`; its exit status and its document (kept in the report)."""
    try:
        result = await cluster.dfs("check", *args, "--json", timeout=CHECK_TIMEOUT)
    except trio.TooSlowError:
        report.checker_output.append({"command": name, "exit": None, "output": "timeout"})
        return -1, None
    try:
        doc: Any = json.loads(result.stdout or b"null")
    except ValueError:
        doc = result.stdout.decode(errors="replace")[-2000:]
    report.checker_output.append({"command": name, "exit": result.returncode, "output": doc,
                                  "stderr": result.stderr.decode(errors="replace")[-2000:]})
    return result.returncode, doc


async def judge_then_repair(cluster: NemesisCluster, ledger: Ledger, report: FinalReport
                            ) -> None:
    """The first deep check is judged against the ledger; then repair; then it must be clean."""
    if not checker_available():
        return
    code, doc = await _check(cluster, report, "check --deep (judged)", "--deep")
    if code not in (0, 3) or not isinstance(doc, dict):
        report.violations.append(Violation(
            "dfs-check", "*", f"the judged dfs check --deep exited {code}; see the checker "
            "output in the history"))
        findings: list[dict[str, Any]] = []
    else:
        findings = list(doc.get("findings") or [])
        names = cluster.names_by_id(list(doc.get("nodes") or []))
        attributions, unexplained = attribute(findings, ledger, names)
        report.judged = [a.to_json() for a in attributions]
        report.explained = tally(attributions)
        report.violations += unexplained
    repair, _ = await _check(cluster, report, "check --deep --repair", "--deep", "--repair")
    again, doc = await _check(cluster, report, "check --deep", "--deep")
    if again != 0:
        left = [f"{f.get('kind')} node {f.get('node')} blob {f.get('blob')} {f.get('path')}"
                for f in (doc.get("findings") or [])] if isinstance(doc, dict) else []
        report.checker = "dirty"
        report.violations.append(Violation(
            "dfs-check", "*", f"dfs check --deep exited {again} after --repair (which exited "
            f"{repair}): {'; '.join(left[:10]) or 'see the checker output'}"))
    else:
        explained = sum(1 for f in report.judged if f.get("explained_by"))
        report.checker = (f"{len(findings)} finding(s) judged ({explained} explained), "
                          "repaired, then clean" if findings else "clean")


async def check_files(cluster: NemesisCluster, workload: Workload, history: History,
                      corrupted: list[dict[str, Any]], report: FinalReport) -> None:
    damaged = {(c["node"], c["blob"]) for c in corrupted}
    async with cluster.client(via="") as client:
        node_list = await client.node_list()
        nodes = {n["id"]: n for n in node_list}
        names = cluster.names_by_id(node_list)
        for file in workload.all_files:
            attr = await client.getattr(workload.inos[file])
            sink = io.BytesIO()
            if attr.blob is not None:
                await client.read_file(attr, sink)
            data = sink.getvalue()
            final = history.invoke("final", "read", file, "lib")
            history.attribute(final, data)
            history.complete(final, OK, version=attr.version)
            report.files[file] = {"version": attr.version, "op": final.saw,
                                  "size": attr.size, "replicas": list(attr.replicas)}
            report.violations += _judge_final(history, file, final.id)
            for node_id in dict.fromkeys(attr.replicas):
                address = nodes.get(node_id, {}).get("address", "")
                name = names.get(node_id) or f"node {node_id}"
                if nodes.get(node_id, {}).get("state") == "removed":
                    address = ""  # its data is gone: never a good replica
                problem = await replica_problem(cluster, attr, address, data)
                if problem is None:
                    continue
                if (name, attr.blob) in damaged and report.checker == "unavailable":
                    report.unrepaired.append(f"{file}: {name}: {problem}")
                else:
                    report.violations.append(Violation(
                        "replica", file, f"replica on {name} (id {node_id}) of version "
                        f"{attr.version}: {problem}", [final.id]))
            if attr.blob is not None and len(set(attr.replicas)) != cluster.replicas:
                report.violations.append(Violation(
                    "under-replicated", file, f"{len(set(attr.replicas))} distinct replicas "
                    f"listed, R={cluster.replicas}", [final.id]))


def _judge_final(history: History, file: str, final_id: int) -> list[Violation]:
    final = history.ops[final_id]
    if final.problem is not None:
        return [Violation("final-mixed", file, final.problem, [final_id])]
    out: list[Violation] = []
    writer = history.ops.get(final.saw) if final.saw not in (None, INITIAL) else None
    if writer is not None and writer.outcome == FAIL:
        tried = f" [{writer.detail}]" if writer.detail else ""
        out.append(Violation("aborted-write-visible", file, f"the final content is write "
                             f"{writer.id}'s, which failed ({writer.error}){tried}",
                             [writer.id]))
    ok_writes = [op for op in history.ops.values()
                 if op.file == file and op.f == "write" and op.outcome == OK]
    for v in check_recency(history, final, ok_writes):
        out.append(Violation("lost-write", file, v.msg.replace(f"read {final_id} (lib)",
                                                               "the final state"), v.ops))
    return out


async def replica_problem(cluster: NemesisCluster, attr: Attr, address: str, data: bytes
                           ) -> str | None:
    """Why this replica does not hold exactly `data` as the committed blob, or None."""
    if attr.blob is None:
        return None
    if not address:
        return "not in the node table"
    peer = Peer(address, cluster.secret, timeout=10.0)
    try:
        info = (await peer.call("stat", blobs=[attr.blob], retry_for=10))["blobs"]
        record = info.get(attr.blob, info.get(str(attr.blob)))
        if record is None:
            return f"blob {attr.blob} is missing"
        if record.get("state") != "COMMITTED":
            return f"blob {attr.blob} is {record.get('state')}"
        parts = []
        for index in range(nchunks(attr.size)):
            reply = await peer.call("read", blob=attr.blob, index=index, retry_for=10)
            if problem := chunk_problem(reply.get("data"), reply.get("digest"),
                                        chunk_length(attr.size, index)):
                return f"chunk {index} {problem}"
            parts.append(reply["data"])
        got = b"".join(parts)
        if got != data or file_checksum(got) != attr.checksum:
            return f"holds {len(got)} bytes that differ from the committed version"
    except DfsError as e:
        return f"{e.code.value}: {e.msg}"
    finally:
        await peer.aclose()
    return None


async def wait_no_leftovers(cluster: NemesisCluster, workload: Workload, timeout: float
                            ) -> list[str]:
    """Wait (bounded) until every blob on every live node is some file's current or kept
    version, COMMITTED and listed there; what is still left over at the end."""
    leftovers: list[str] = []
    with trio.move_on_after(timeout):
        while True:
            try:
                leftovers = await _leftovers(cluster, workload)
            except DfsError as e:
                leftovers = [f"could not list: {e.code.value}: {e.msg}"]
            if not leftovers:
                return []
            await trio.sleep(1.0)
    return leftovers


async def wait_no_orphans(cluster: NemesisCluster, workload: Workload, report: FinalReport
                          ) -> None:
    """I3: in time, every blob on every node is some file's current or kept version, COMMITTED."""
    for item in await wait_no_leftovers(cluster, workload, LEFTOVER_TIMEOUT):
        report.violations.append(Violation("orphan", "*", item))


async def _leftovers(cluster: NemesisCluster, workload: Workload) -> list[str]:
    async with cluster.client(via="") as client:
        current = await workload.listed_blobs(client)
        nodes = await client.node_list()
    out: list[str] = []
    for node in nodes:
        if node["state"] not in ("up", "draining"):
            continue  # removed (its data is gone) or down: nothing to ask
        peer = Peer(node["address"], cluster.secret, timeout=10.0)
        try:
            blobs = (await peer.call("list", after=0, limit=10_000, retry_for=10))["blobs"]
        finally:
            await peer.aclose()
        for blob, state, _size, _checksum in blobs:
            if blob not in current:
                out.append(f"node {node['id']}: blob {blob} ({state}) belongs to no file")
            elif state != "COMMITTED":
                out.append(f"node {node['id']}: listed blob {blob} is {state}")
            elif node["id"] not in current[blob]:
                out.append(f"node {node['id']}: holds blob {blob} but is not a listed replica")
    return out
