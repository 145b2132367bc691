"""After the campaign: wait for the healed cluster to recover, repair, then judge its state.

In order: every node up and no transaction in flight or owing COMMITs; `dfs check --deep
--repair`, then `dfs check --deep` must exit 0 (when the checker exists; otherwise the same
questions are asked here over the wire and the report says so); then, file by file:

- the file's content is exactly one write's (no mix), and not a failed write's;
- no ok write is lost (I2): the final content is not older than any ok write (by time, and by
  version where the write's version is known), i.e. it is the last ok write or a later
  unknown one;
- every listed replica, R distinct nodes, holds that version COMMITTED and its bytes read
  back verified chunk by chunk and as a whole (I1, I4);
- no blob on any node is left that no file references once GC and recovery had time (I3).

A replica damaged by an injected bit flip is a violation only if the checker ran and should
have repaired it; without the checker it is reported as unrepaired damage.
"""

from __future__ import annotations

import importlib.util
import io
import json
from dataclasses import dataclass, field
from typing import Any

import trio

from dfs.chunks import chunk_digest, file_checksum, nchunks
from dfs.client import Attr
from dfs.errors import DfsError
from dfs.nemesis.checker import Violation, check_recency
from dfs.nemesis.cluster import NemesisCluster
from dfs.nemesis.history import FAIL, INITIAL, OK, History
from dfs.nemesis.workload import Workload
from dfs.rpc import Peer

RECOVERY_TIMEOUT = 90.0
SETTLE_TIMEOUT = 60.0


@dataclass
class FinalReport:
    checker: str = "unavailable"  # "clean", "repaired", "dirty" or "unavailable"
    checker_output: list[dict[str, Any]] = field(default_factory=list)
    unrepaired: list[str] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)


def checker_available() -> bool:
    return importlib.util.find_spec("dfs.cli.check") is not None


async def wait_recovered(cluster: NemesisCluster) -> None:
    """All nodes up, nothing in flight, no COMMIT owed (replicas have the decisions)."""
    with trio.fail_after(RECOVERY_TIMEOUT):
        while True:
            try:
                status = await cluster.status()
                up = sum(n["state"] == "up" for n in status["nodes"])
                if up == len(cluster.nodes) and not status["inflight"] \
                        and not status["committing"]:
                    return
            except DfsError:
                pass
            await trio.sleep(0.3)


async def run_checker(cluster: NemesisCluster, report: FinalReport) -> None:
    """`dfs check --deep --repair`, then `dfs check --deep` must be clean (exit 0)."""
    if not checker_available():
        return
    repair = await cluster.dfs("check", "--deep", "--repair", "--json", timeout=300)
    again = await cluster.dfs("check", "--deep", "--json", timeout=300)
    for name, result in (("check --deep --repair", repair), ("check --deep", again)):
        try:
            doc: Any = json.loads(result.stdout or b"null")
        except ValueError:
            doc = result.stdout.decode(errors="replace")[-2000:]
        report.checker_output.append({"command": name, "exit": result.returncode, "output": doc,
                                      "stderr": result.stderr.decode(errors="replace")[-2000:]})
    if again.returncode != 0:
        report.checker = "dirty"
        report.violations.append(Violation(
            "dfs-check", "*", f"dfs check --deep exited {again.returncode} after --repair "
            f"(which exited {repair.returncode}); see the report's checker output"))
    else:
        first = report.checker_output[0]["output"]
        findings = first.get("findings") if isinstance(first, dict) else None
        report.checker = f"clean after repairing {len(findings)} finding(s)" if findings \
            else "clean"


async def check_files(cluster: NemesisCluster, workload: Workload, history: History,
                      corrupted: list[dict[str, Any]], report: FinalReport) -> None:
    damaged = {(c["node"], c["blob"]) for c in corrupted}
    async with cluster.client(via="") as client:
        nodes = {n["id"]: n for n in await client.node_list()}
        names = {proc.listen: name for name, proc in cluster.procs.items()}
        proxy_of = {cluster.proxies[f"n-{n}"].address: n for n in cluster.nodes}
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
                name = proxy_of.get(address) or names.get(address) or f"node {node_id}"
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
        out.append(Violation("aborted-write-visible", file, f"the final content is write "
                             f"{writer.id}'s, which failed ({writer.error})", [writer.id]))
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
            if reply["digest"] != chunk_digest(reply["data"]):
                return f"chunk {index} fails its digest"
            parts.append(reply["data"])
        got = b"".join(parts)
        if got != data or file_checksum(got) != attr.checksum:
            return f"holds {len(got)} bytes that differ from the committed version"
    except DfsError as e:
        return f"{e.code.value}: {e.msg}"
    finally:
        await peer.aclose()
    return None


async def wait_no_orphans(cluster: NemesisCluster, workload: Workload, report: FinalReport
                          ) -> None:
    """I3: in time, every blob on every node is some file's current version, COMMITTED."""
    leftovers: list[str] = []
    with trio.move_on_after(SETTLE_TIMEOUT):
        while True:
            leftovers = await _leftovers(cluster, workload)
            if not leftovers:
                return
            await trio.sleep(1.0)
    for item in leftovers:
        report.violations.append(Violation("orphan", "*", item))


async def _leftovers(cluster: NemesisCluster, workload: Workload) -> list[str]:
    async with cluster.client(via="") as client:
        current: dict[int, set[int]] = {}
        for file in workload.all_files:
            attr = await client.getattr(workload.inos[file])
            if attr.blob is not None:
                current[attr.blob] = set(attr.replicas)
        nodes = await client.node_list()
    out: list[str] = []
    for node in nodes:
        peer = Peer(node["address"], cluster.secret, timeout=10.0)
        try:
            blobs = (await peer.call("list", after=0, limit=10_000, retry_for=10))["blobs"]
        finally:
            await peer.aclose()
        for blob, state, _size, _checksum in blobs:
            if blob not in current:
                out.append(f"node {node['id']}: blob {blob} ({state}) belongs to no file")
            elif state != "COMMITTED":
                out.append(f"node {node['id']}: current blob {blob} is {state}")
            elif node["id"] not in current[blob]:
                out.append(f"node {node['id']}: holds blob {blob} but is not a listed replica")
    return out
