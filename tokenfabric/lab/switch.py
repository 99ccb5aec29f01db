"""A Mininet switch that runs BMv2's simple_switch_grpc (through tokenfabric.bmv2).

The switch lives in the root namespace (as Mininet's OVS switches do), so its
gRPC and Thrift ports are on 127.0.0.1 where the controller reaches them. It
starts empty (`--no-p4`): the controller pushes the pipeline over P4Runtime.

Usable from plain Mininet too:

    sudo mn --custom mininet/tokenfabric_mn.py --switch bmv2 --topo tfsingle
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from mininet.node import Switch

from tokenfabric.bmv2 import Bmv2Options, Bmv2Switch
from tokenfabric.lab.offload import checksum_offload_off
from tokenfabric.tools import free_port

log = logging.getLogger(__name__)


class Bmv2MininetSwitch(Switch):
    """simple_switch_grpc with `--priority-queues 8`, a log per switch, optional pcap."""

    def __init__(self, name: str, device_id: int | None = None, grpc_port: int | None = None,
                 thrift_port: int | None = None, log_dir: str | Path | None = None,
                 pcap: bool = False, log_level: str = "info",
                 json_path: str | Path | None = None, **params: Any) -> None:
        super().__init__(name, **params)
        self.device_id = device_id if device_id is not None else int(self.dpid, 16)
        self.grpc_port = grpc_port or free_port()
        self.thrift_port = thrift_port or free_port()
        self.log_dir = Path(log_dir) if log_dir else None
        self.pcap = pcap
        self.log_level = log_level
        self.json_path = Path(json_path) if json_path else None
        self.bmv2: Bmv2Switch | None = None

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def data_ports(self) -> dict[int, str]:
        return {port: intf.name for intf, port in self.ports.items() if intf.name != "lo"}

    def start(self, controllers: list) -> None:  # noqa: ARG002 - P4Runtime, not OpenFlow
        ports = self.data_ports()
        # The kernel would leave TCP checksums to an offload the userspace switch never does.
        checksum_offload_off(list(ports.values()))
        log_path = pcap_dir = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{self.name}.log"
            if self.pcap:
                pcap_dir = self.log_dir / f"{self.name}-pcap"
                pcap_dir.mkdir(exist_ok=True)
        opts = Bmv2Options(ports=ports, grpc_port=self.grpc_port, thrift_port=self.thrift_port,
                           device_id=self.device_id, json_path=self.json_path,
                           log_path=log_path, log_level=self.log_level, pcap_dir=pcap_dir)
        self.bmv2 = Bmv2Switch(opts).start()
        log.info("%s: simple_switch_grpc pid %s, gRPC %s, thrift %s, ports %s", self.name,
                 self.bmv2.pid, self.grpc_address, self.thrift_port, ports)

    @property
    def switch_pid(self) -> int | None:
        return self.bmv2.pid if self.bmv2 else None

    def running(self) -> bool:
        return bool(self.bmv2 and self.bmv2.proc and self.bmv2.proc.poll() is None)

    def stop(self, deleteIntfs: bool = True) -> None:  # noqa: N803 - Mininet's signature
        if self.bmv2:
            self.bmv2.stop()
        super().stop(deleteIntfs)
