"""p4runtime-shell on a switch, as a reader that never takes over from the controller.

`tokenfabric switch shell NAME` calls open_shell(): the operator gets
p4runtime-shell's IPython prompt on the switch with election id 0, below
every controller's (the southbound refuses ids < 1), so the shell is a
backup: it reads everything and its writes are refused while a controller
is connected. (BMv2 ignores P4Runtime roles, so election id 0 is how a
reader stays out of the way; should every controller go away, the shell
would be promoted, like any backup.)

shell_read() runs p4runtime-shell in a child process and returns what the
switch holds as plain JSON: the tests use it as a reader independent of the
southbound, the benchmark uses the same child to write with p4runtime-shell.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

READER_ELECTION_ID = (0, 0)  # (high, low): below every controller's election id


def shell_command(address: str, device_id: int) -> list[str]:
    return [sys.executable, "-m", "p4runtime_sh", "--grpc-addr", address,
            "--device-id", str(device_id),
            "--election-id", ",".join(map(str, READER_ELECTION_ID))]


def check_program(address: str, device_id: int, p4info_path: str | Path,
                  bmv2_json_path: str | Path, timeout: float = 5.0) -> str | None:
    """None when the switch runs this program (same cookie), else what differs."""
    import grpc
    from p4.v1 import p4runtime_pb2, p4runtime_pb2_grpc

    from tokenfabric.controller.southbound.p4info import Pipeline

    wanted = Pipeline.from_files(p4info_path, bmv2_json_path)
    with grpc.insecure_channel(address) as channel:
        stub = p4runtime_pb2_grpc.P4RuntimeStub(channel)
        request = p4runtime_pb2.GetForwardingPipelineConfigRequest(
            device_id=device_id,
            response_type=p4runtime_pb2.GetForwardingPipelineConfigRequest.COOKIE_ONLY)
        try:
            response = stub.GetForwardingPipelineConfig(request, timeout=timeout)
        except grpc.RpcError as exc:
            return f"cannot ask {address} for its program: {exc.code().name} {exc.details()}"
    installed = response.config.cookie.cookie
    if installed != wanted.cookie:
        return (f"the switch runs program cookie {installed:#x}, not {wanted.cookie:#x} "
                f"({Path(bmv2_json_path).name}): names may not match")
    return None


def open_shell(address: str, device_id: int, p4info_path: str | Path | None = None,
               bmv2_json_path: str | Path | None = None) -> int:
    """Run p4runtime-shell interactively on the switch; returns its exit code.

    With the program's files, first checks that the switch runs that program
    and warns if not (the shell always uses the P4Info the switch reports).
    """
    if p4info_path and bmv2_json_path:
        problem = check_program(address, device_id, p4info_path, bmv2_json_path)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
    print(f"p4runtime-shell on {address} device {device_id} as a reader "
          f"(election id {READER_ELECTION_ID}); the controller stays primary.", file=sys.stderr)
    return subprocess.call(shell_command(address, device_id))


def shell_read(address: str, device_id: int, timeout: float = 60.0) -> dict:
    """Everything the switch holds, read with p4runtime-shell in a child process."""
    return _sorted_view(_child(["read", "--grpc-addr", address, "--device-id", str(device_id)],
                               timeout))


def _sorted_view(view: dict) -> dict:
    """Order-free form: rows sorted, empty tables/profiles/meters left out."""
    return {section: {name: sorted(rows, key=lambda r: json.dumps(r, sort_keys=True))
                      for name, rows in objects.items() if rows}
            for section, objects in view.items()}


def shell_write(address: str, device_id: int, commands: list[dict], election_id: int,
                timeout: float = 600.0) -> dict:
    """Insert entities with p4runtime-shell, one Write per entity (as an operator would).

    `commands` are dicts as returned by shell_read; returns {"seconds": ...}.
    Used by bench/bench_controller_apply.py as the baseline.
    """
    path = _tmp_json(commands)
    try:
        return _child(["write", "--grpc-addr", address, "--device-id", str(device_id),
                       "--election-id", str(election_id), "--input", path], timeout)
    finally:
        os.unlink(path)


def shell_commands(entities: list) -> list[dict]:
    """Normalized controller.entries entities as shell_write commands, in write order."""
    from tokenfabric.controller import entries as ent

    def action(a: ent.Action) -> dict:
        return {"name": a.name, "params": dict(a.params)}

    def match(value: object) -> dict:
        if isinstance(value, ent.Exact):
            return {"exact": value.value}
        if isinstance(value, ent.Lpm):
            return {"lpm": [value.value, value.prefix_len]}
        if isinstance(value, ent.Ternary):
            return {"ternary": [value.value, value.mask]}
        assert isinstance(value, ent.Range)
        return {"range": [value.low, value.high]}

    out: list[tuple[int, dict]] = []
    for e in entities:
        if isinstance(e, ent.ProfileMember):
            out.append((0, {"kind": "member", "profile": e.profile, "member_id": e.member_id,
                            "action": action(e.action)}))
        elif isinstance(e, ent.ProfileGroup):
            out.append((1, {"kind": "group", "profile": e.profile, "group_id": e.group_id,
                            "members": [list(m) for m in e.members]}))
        elif isinstance(e, ent.MeterConfig):
            out.append((2, {"kind": "meter", "meter": e.meter, "index": e.index, "cir": e.cir,
                            "cburst": e.cburst, "pir": e.pir, "pburst": e.pburst}))
        elif isinstance(e, ent.MulticastGroup):
            continue  # the packet replication engine: shell_read does not read it either
        else:
            row = {"kind": "table", "table": e.table, "priority": e.priority,
                   "match": {name: match(v) for name, v in e.match}}
            if isinstance(e.action, ent.Action):
                row["action"] = action(e.action)
            elif isinstance(e.action, ent.GroupRef):
                row["group_id"] = e.action.group_id
            else:
                row["member_id"] = e.action.member_id
            out.append((2, row))
    return [cmd for _, cmd in sorted(out, key=lambda pair: pair[0])]


def shell_view(entities: list) -> dict:
    """Normalized entities in the form shell_read returns, for comparisons."""
    view: dict = {"tables": {}, "members": {}, "groups": {}, "meters": {}}
    for cmd in shell_commands(entities):
        kind = cmd.pop("kind")
        if kind == "member":
            view["members"].setdefault(cmd.pop("profile"), []).append(cmd)
        elif kind == "group":
            view["groups"].setdefault(cmd.pop("profile"), []).append(cmd)
        elif kind == "meter":
            view["meters"].setdefault(cmd.pop("meter"), []).append(cmd)
        else:
            view["tables"].setdefault(cmd.pop("table"), []).append(cmd)
    return _sorted_view(view)


def _tmp_json(data: object) -> str:
    import tempfile
    fd, path = tempfile.mkstemp(prefix="tf-shell-", suffix=".json")
    with os.fdopen(fd, "w") as out:
        json.dump(data, out)
    return path


def _child(args: list[str], timeout: float) -> dict:
    proc = subprocess.run([sys.executable, "-m", "tokenfabric.controller.switch_shell", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"p4runtime-shell child failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout)


# ---- the child process: p4runtime-shell's module-level API ---------------------------

def _int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def _match_json(field_match) -> dict:  # noqa: ANN001 (protobuf FieldMatch)
    kind = field_match.WhichOneof("field_match_type")
    inner = getattr(field_match, kind)
    if kind in ("exact", "optional"):
        return {kind: _int(inner.value)}
    if kind == "lpm":
        return {"lpm": [_int(inner.value), inner.prefix_len]}
    if kind == "ternary":
        return {"ternary": [_int(inner.value), _int(inner.mask)]}
    return {"range": [_int(inner.low), _int(inner.high)]}


def _action_json(sh, action) -> dict:  # noqa: ANN001
    name = sh.context.get_name_from_id(action.action_id)
    return {"name": name, "params": {sh.context.get_param_name(name, p.param_id): _int(p.value)
                                     for p in action.params}}


def _read_all(sh) -> dict:  # noqa: ANN001 (the p4runtime_sh.shell module)
    from p4runtime_sh.context import P4Type

    out: dict = {"tables": {}, "members": {}, "groups": {}, "meters": {}}
    for name, table in sh.context.get_objs(P4Type.table):
        if table.is_const_table:
            continue
        rows = []
        for entry in sh.TableEntry(name).read():
            msg = entry.msg()
            row = {"match": {sh.context.get_mf_name(name, m.field_id): _match_json(m)
                             for m in msg.match},
                   "priority": msg.priority}
            which = msg.action.WhichOneof("type")
            if which == "action":
                row["action"] = _action_json(sh, msg.action.action)
            elif which == "action_profile_group_id":
                row["group_id"] = msg.action.action_profile_group_id
            else:
                row["member_id"] = msg.action.action_profile_member_id
            rows.append(row)
        out["tables"][name] = rows
    for full, profile in sh.context.get_objs(P4Type.action_profile):
        # BMv2 (PI) emulates a weight w by w copies of the member and reads each copy
        # back as a row with the same member id: fold them into one.
        members = {}
        for m in sh.ActionProfileMember(full).read():
            row = {"member_id": m.msg().member_id, "action": _action_json(sh, m.msg().action)}
            members[json.dumps(row, sort_keys=True)] = row
        out["members"][full] = list(members.values())
        if profile.with_selector:
            out["groups"][full] = [
                {"group_id": g.msg().group_id,
                 "members": sorted([x.member_id, x.weight] for x in g.msg().members)}
                for g in sh.ActionProfileGroup(full).read()]
    for full, _meter in sh.context.get_objs(P4Type.meter):
        cells = []
        for cell in sh.MeterEntry(full).read():
            msg = cell.msg()
            c = msg.config
            if msg.HasField("config") and (c.cir or c.pir or c.cburst or c.pburst):
                cells.append({"index": msg.index.index, "cir": c.cir, "cburst": c.cburst,
                              "pir": c.pir, "pburst": c.pburst})
        out["meters"][full] = cells
    return out


def _write_all(sh, commands: list[dict]) -> None:  # noqa: ANN001
    """Insert each command with the shell's own entity objects (one Write each)."""
    for cmd in commands:
        kind = cmd["kind"]
        if kind == "member":
            member = sh.ActionProfileMember(cmd["profile"])(
                member_id=cmd["member_id"], action=cmd["action"]["name"])
            for param, value in cmd["action"]["params"].items():
                member.action[param] = str(value)
            member.insert()
        elif kind == "group":
            group = sh.ActionProfileGroup(cmd["profile"])(group_id=cmd["group_id"])
            for member_id, weight in cmd["members"]:
                group.add(member_id, weight=weight)
            group.insert()
        elif kind == "meter":
            meter = sh.MeterEntry(cmd["meter"])
            meter.index = cmd["index"]
            meter.cir, meter.cburst = cmd["cir"], cmd["cburst"]
            meter.pir, meter.pburst = cmd["pir"], cmd["pburst"]
            meter.modify()
        else:
            entry = sh.TableEntry(cmd["table"])
            for field, spec in cmd["match"].items():
                entry.match[field] = _match_text(spec)
            if "action" in cmd:
                entry.action = sh.Action(cmd["action"]["name"])
                for param, value in cmd["action"]["params"].items():
                    entry.action[param] = str(value)
            elif "group_id" in cmd:
                entry.group_id = cmd["group_id"]
            else:
                entry.member_id = cmd["member_id"]
            entry.priority = cmd.get("priority", 0)
            entry.insert()


def _match_text(spec: dict) -> str:
    """p4runtime-shell's text syntax for a match value."""
    (kind, value), = spec.items()
    if kind in ("exact", "optional"):
        return str(value)
    if kind == "lpm":
        return f"{value[0]}/{value[1]}"
    if kind == "ternary":
        return f"{value[0]}&&&{value[1]}"
    return f"{value[0]}..{value[1]}"


def _child_main(argv: list[str]) -> int:
    import logging
    import time

    parser = argparse.ArgumentParser(prog="python -m tokenfabric.controller.switch_shell")
    parser.add_argument("mode", choices=["read", "write"])
    parser.add_argument("--grpc-addr", required=True)
    parser.add_argument("--device-id", type=int, default=0)
    parser.add_argument("--election-id", type=int, default=None)
    parser.add_argument("--input")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    # p4runtime-shell prints every message it builds (and a notice when it is not
    # primary) on stdout: keep stdout for the JSON answer.
    real_stdout, sys.stdout = sys.stdout, open(os.devnull, "w")  # noqa: SIM115
    from p4runtime_sh import shell as sh

    election = READER_ELECTION_ID if args.election_id is None else (
        args.election_id >> 64, args.election_id & (2**64 - 1))
    # Not verbose=False: in p4runtime-shell 0.0.6 the `verbose` option is an enum alias
    # of `canonical_bytestrings`, so turning it off sends padded bytestrings.
    sh.setup(device_id=args.device_id, grpc_addr=args.grpc_addr, election_id=election)
    try:
        if args.mode == "read":
            result = _read_all(sh)
        else:
            with open(args.input) as f:
                commands = json.load(f)
            started = time.perf_counter()
            _write_all(sh, commands)
            result = {"seconds": time.perf_counter() - started, "entities": len(commands)}
    finally:
        sh.teardown()
    sys.stdout = real_stdout
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
