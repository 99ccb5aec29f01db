/* A small v1model program with every kind of object the southbound drives:
 * exact, LPM, ternary, range and optional matches, an action selector with
 * weighted groups, a direct counter, an indexed counter and an indexed meter.
 * Compiled by tests/integration/southbound/data/build.sh (p4c-bm2-ss). */
#include <core.p4>
#include <v1model.p4>

header ethernet_h {
    bit<48> dst_addr;
    bit<48> src_addr;
    bit<16> ether_type;
}

header ipv4_h {
    bit<4> version;
    bit<4> ihl;
    bit<6> dscp;
    bit<2> ecn;
    bit<16> total_len;
    bit<16> identification;
    bit<3> flags;
    bit<13> frag_offset;
    bit<8> ttl;
    bit<8> protocol;
    bit<16> hdr_checksum;
    bit<32> src_addr;
    bit<32> dst_addr;
}

struct headers_t {
    ethernet_h ethernet;
    ipv4_h ipv4;
}

struct meta_t {
    bit<16> tenant;
    bit<16> l4_port;
    bit<2> color;
}

parser MiniParser(packet_in packet, out headers_t hdr, inout meta_t meta,
                  inout standard_metadata_t standard_metadata) {
    state start {
        packet.extract(hdr.ethernet);
        transition select(hdr.ethernet.ether_type) {
            0x0800: parse_ipv4;
            default: accept;
        }
    }
    state parse_ipv4 {
        packet.extract(hdr.ipv4);
        transition accept;
    }
}

control MiniVerify(inout headers_t hdr, inout meta_t meta) {
    apply { }
}

control MiniIngress(inout headers_t hdr, inout meta_t meta,
                    inout standard_metadata_t standard_metadata) {
    counter(4096, CounterType.packets_and_bytes) tenant_packets;
    meter(4096, MeterType.bytes) tenant_meter;
    direct_counter(CounterType.packets_and_bytes) route_counter;
    action_selector(HashAlgorithm.crc16, 1024, 16) backend_selector;

    action drop() {
        mark_to_drop(standard_metadata);
    }

    action set_tenant(bit<16> tenant) {
        meta.tenant = tenant;
        tenant_packets.count((bit<32>) tenant);
        tenant_meter.execute_meter((bit<32>) tenant, meta.color);
    }

    action forward(bit<9> port, bit<48> dst_mac) {
        standard_metadata.egress_spec = port;
        hdr.ethernet.dst_addr = dst_mac;
    }

    action route(bit<9> port) {
        standard_metadata.egress_spec = port;
    }

    action set_dscp(bit<6> dscp) {
        hdr.ipv4.dscp = dscp;
    }

    table classify {
        key = { hdr.ipv4.src_addr: lpm; }
        actions = { set_tenant; drop; }
        size = 4096;
        default_action = drop();
    }

    table qos {
        key = {
            meta.tenant: ternary;
            meta.l4_port: range;
            hdr.ipv4.protocol: optional;
        }
        actions = { set_dscp; NoAction; }
        size = 4096;
        default_action = NoAction();
    }

    table select_backend {
        key = {
            hdr.ipv4.dst_addr: exact;
            hdr.ipv4.src_addr: selector;
        }
        actions = { forward; drop; }
        implementation = backend_selector;
        size = 256;
    }

    table routes {
        key = { hdr.ipv4.dst_addr: lpm; }
        actions = { route; drop; }
        counters = route_counter;
        size = 1024;
        default_action = drop();
    }

    apply {
        if (hdr.ipv4.isValid()) {
            classify.apply();
            qos.apply();
            if (!select_backend.apply().hit) {
                routes.apply();
            }
        }
    }
}

control MiniEgress(inout headers_t hdr, inout meta_t meta,
                   inout standard_metadata_t standard_metadata) {
    apply { }
}

control MiniComputeChecksum(inout headers_t hdr, inout meta_t meta) {
    apply { }
}

control MiniDeparser(packet_out packet, in headers_t hdr) {
    apply {
        packet.emit(hdr.ethernet);
        packet.emit(hdr.ipv4);
    }
}

V1Switch(MiniParser(), MiniVerify(), MiniIngress(), MiniEgress(),
         MiniComputeChecksum(), MiniDeparser()) main;
