"""Standard QoS vocabularies the policy files use, as data.

- 3GPP TS 23.501 Table 5.7.4-1: standardized 5QI values and their QoS
  characteristics (resource type, default priority level, packet delay budget,
  packet error rate, default maximum data burst volume for delay-critical GBR).
  5QI 75 is withdrawn in current releases and is not listed.
- RFC 4594 service classes with their recommended DSCPs, plus the queue this
  fabric gives each (0 is the lowest BMv2 priority queue).
- The mapping from a 5QI to an RFC 4594 class, used when a contract names a 5QI
  and no explicit class. It follows the example services of each 5QI; AF3x
  (multimedia-streaming) is avoided because DSCP 26 (AF31) is RoCEv2's class.
- CAMARA Quality-on-Demand profile names.
"""

from __future__ import annotations

from tokenfabric.controller.model import FiveQI, ResourceType, TrafficClass

_G, _N, _D = ResourceType.GBR, ResourceType.NON_GBR, ResourceType.DELAY_CRITICAL_GBR

FIVEQI_TABLE: dict[int, FiveQI] = {q.value: q for q in [
    FiveQI(1, _G, 20, 100, 1e-2, example="Conversational Voice"),
    FiveQI(2, _G, 40, 150, 1e-3, example="Conversational Video (Live Streaming)"),
    FiveQI(3, _G, 30, 50, 1e-3, example="Real Time Gaming, V2X messages"),
    FiveQI(4, _G, 50, 300, 1e-6, example="Non-Conversational Video (Buffered Streaming)"),
    FiveQI(65, _G, 7, 75, 1e-2, example="Mission Critical user plane Push To Talk voice"),
    FiveQI(66, _G, 20, 100, 1e-2, example="Non-Mission-Critical user plane Push To Talk voice"),
    FiveQI(67, _G, 15, 100, 1e-3, example="Mission Critical Video user plane"),
    FiveQI(71, _G, 56, 150, 1e-6, example='"Live" Uplink Streaming'),
    FiveQI(72, _G, 56, 300, 1e-4, example='"Live" Uplink Streaming'),
    FiveQI(73, _G, 56, 300, 1e-8, example='"Live" Uplink Streaming'),
    FiveQI(74, _G, 56, 500, 1e-8, example='"Live" Uplink Streaming'),
    FiveQI(76, _G, 56, 500, 1e-4, example='"Live" Uplink Streaming'),
    FiveQI(5, _N, 10, 100, 1e-6, example="IMS Signalling"),
    FiveQI(6, _N, 60, 300, 1e-6, example="Video (Buffered Streaming) TCP-based"),
    FiveQI(7, _N, 70, 100, 1e-3, example="Voice, Video (Live Streaming), Interactive Gaming"),
    FiveQI(8, _N, 80, 300, 1e-6, example="Video (Buffered Streaming) TCP-based"),
    FiveQI(9, _N, 90, 300, 1e-6, example="Video (Buffered Streaming) TCP-based"),
    FiveQI(10, _N, 90, 1100, 1e-6, example="TCP-based services, also over satellite access"),
    FiveQI(69, _N, 5, 60, 1e-6, example="Mission Critical delay sensitive signalling"),
    FiveQI(70, _N, 55, 200, 1e-6, example="Mission Critical Data"),
    FiveQI(79, _N, 65, 50, 1e-2, example="V2X messages"),
    FiveQI(80, _N, 68, 10, 1e-6, example="Low Latency eMBB applications, Augmented Reality"),
    FiveQI(82, _D, 19, 10, 1e-4, 255, example="Discrete Automation"),
    FiveQI(83, _D, 22, 10, 1e-4, 1354, example="Discrete Automation, V2X platooning"),
    FiveQI(84, _D, 24, 30, 1e-5, 1354, example="Intelligent transport systems"),
    FiveQI(85, _D, 21, 5, 1e-5, 255, example="Electricity Distribution high voltage"),
    FiveQI(86, _D, 18, 5, 1e-4, 1354, example="V2X collision avoidance, platooning"),
    FiveQI(87, _D, 25, 5, 1e-3, 500, example="Interactive Service: motion tracking data"),
    FiveQI(88, _D, 25, 10, 1e-3, 1125, example="Interactive Service: motion tracking data"),
    FiveQI(89, _D, 25, 15, 1e-4, 17000, example="Visual content for cloud/edge/split rendering"),
    FiveQI(90, _D, 25, 20, 1e-4, 63000, example="Visual content for cloud/edge/split rendering"),
]}

# RFC 4594 Figure 3: service class -> (recommended DSCP, this fabric's default queue).
# Queues: 3 is RoCE's lossless class and 6 carries CNPs (policy defaults), so tenant
# classes default to the others; a policy may override any value.
RFC4594_CLASSES: dict[str, tuple[int, int]] = {
    "network-control": (48, 7),  # CS6
    "telephony": (46, 5),  # EF
    "signaling": (40, 5),  # CS5
    "multimedia-conferencing": (34, 4),  # AF41
    "real-time-interactive": (32, 4),  # CS4
    "multimedia-streaming": (26, 4),  # AF31 (collides with RoCE; rejected while RoCE is on)
    "broadcast-video": (24, 4),  # CS3
    "low-latency-data": (18, 2),  # AF21
    "oam": (16, 2),  # CS2
    "high-throughput-data": (10, 1),  # AF11
    "standard": (0, 1),  # DF
    "low-priority-data": (8, 0),  # CS1
}

# AF3x (RFC 2597): AF31, AF32, AF33. AF31 is also RoCEv2's usual DSCP.
AF3X = (26, 28, 30)

FIVEQI_TO_CLASS: dict[int, str] = {
    1: "telephony", 65: "telephony", 66: "telephony",
    2: "multimedia-conferencing", 67: "multimedia-conferencing",
    3: "real-time-interactive", 79: "real-time-interactive", 80: "real-time-interactive",
    82: "real-time-interactive", 83: "real-time-interactive", 84: "real-time-interactive",
    85: "real-time-interactive", 86: "real-time-interactive", 87: "real-time-interactive",
    88: "real-time-interactive", 89: "real-time-interactive", 90: "real-time-interactive",
    4: "broadcast-video", 71: "broadcast-video", 72: "broadcast-video",
    73: "broadcast-video", 74: "broadcast-video", 76: "broadcast-video",
    5: "signaling", 69: "signaling",
    7: "low-latency-data", 70: "low-latency-data",
    6: "high-throughput-data", 8: "high-throughput-data",
    9: "standard", 10: "standard",
}

# CAMARA Quality-on-Demand profile names (QoD API): E(xtreme?)/S/M/L latency profiles.
CAMARA_PROFILES = ("QOS_E", "QOS_S", "QOS_M", "QOS_L")


def class_for_fiveqi(value: int) -> TrafficClass:
    """The default traffic class of a standardized 5QI."""
    q = FIVEQI_TABLE[value]
    name = FIVEQI_TO_CLASS[value]
    dscp, queue = RFC4594_CLASSES[name]
    return TrafficClass(service_class=name, dscp=dscp, priority_level=q.priority_level,
                        queue=queue)
