/* Parser, checksums and deparser. Parser errors do not drop here: v1model
 * hands the packet to ingress with parser_error set, where it is dropped and
 * counted by reason. */
#ifndef TF_PARSER_P4
#define TF_PARSER_P4

error {
    BadIpv4Version,
    BadIpv4Ihl,
    BadTcpDataOffset,
    BadBeaconVersion,
    BadBeaconType
}

parser TokenParser(packet_in packet,
                   out headers_t hdr,
                   inout local_metadata_t meta,
                   inout standard_metadata_t standard_metadata) {
    state start {
        packet.extract(hdr.ethernet);
        transition select(hdr.ethernet.ether_type) {
            ETHERTYPE_IPV4: parse_ipv4;
            default: accept;
        }
    }

    /* Bad version and IHL are select cases, not verify(): BMv2 evaluates a
     * verify() condition into a temporary on every packet. */
    state parse_ipv4 {
        packet.extract(hdr.ipv4);
        transition select(hdr.ipv4.version, hdr.ipv4.ihl, hdr.ipv4.frag_offset,
                          hdr.ipv4.protocol) {
            (4, 5, 0, PROTO_TCP): parse_tcp;
            (4, 5, 0, PROTO_UDP): parse_udp;
            (4, 5, 0, PROTO_IPIP): parse_inner_ipv4;
            (4, 5, _, _): accept;
            (4, NIBBLE_BELOW_4, _, _): bad_ipv4_ihl;
            (4, 4, _, _): bad_ipv4_ihl;
            (4, _, _, _): parse_ipv4_options;
            default: bad_ipv4_version;
        }
    }

    /* Options by one state per length: a length computed from the IHL would
     * cost a temporary, which BMv2 zeroes for every packet. */
    state parse_ipv4_options {
        transition select(hdr.ipv4.ihl) {
            6: ipv4_options_1;
            7: ipv4_options_2;
            8: ipv4_options_3;
            9: ipv4_options_4;
            10: ipv4_options_5;
            11: ipv4_options_6;
            12: ipv4_options_7;
            13: ipv4_options_8;
            14: ipv4_options_9;
            default: ipv4_options_10;
        }
    }
#define OPTIONS_STATE(name, words, next) \
    state name##_##words { \
        packet.extract(hdr.name, words * 32); \
        transition next; \
    }
    OPTIONS_STATE(ipv4_options, 1, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 2, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 3, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 4, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 5, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 6, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 7, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 8, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 9, dispatch_ipv4)
    OPTIONS_STATE(ipv4_options, 10, dispatch_ipv4)

    /* Non-first fragments carry no L4 header. */
    state dispatch_ipv4 {
        transition select(hdr.ipv4.frag_offset, hdr.ipv4.protocol) {
            (0, PROTO_TCP): parse_tcp;
            (0, PROTO_UDP): parse_udp;
            (0, PROTO_IPIP): parse_inner_ipv4;
            default: accept;
        }
    }

    state parse_inner_ipv4 {
        packet.extract(hdr.inner_ipv4);
        transition select(hdr.inner_ipv4.version, hdr.inner_ipv4.ihl) {
            (4, 5): dispatch_inner_ipv4;
            (4, NIBBLE_BELOW_4): bad_ipv4_ihl;
            (4, 4): bad_ipv4_ihl;
            (4, _): parse_inner_ipv4_options;
            default: bad_ipv4_version;
        }
    }

    state parse_inner_ipv4_options {
        transition select(hdr.inner_ipv4.ihl) {
            6: inner_ipv4_options_1;
            7: inner_ipv4_options_2;
            8: inner_ipv4_options_3;
            9: inner_ipv4_options_4;
            10: inner_ipv4_options_5;
            11: inner_ipv4_options_6;
            12: inner_ipv4_options_7;
            13: inner_ipv4_options_8;
            14: inner_ipv4_options_9;
            default: inner_ipv4_options_10;
        }
    }
    OPTIONS_STATE(inner_ipv4_options, 1, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 2, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 3, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 4, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 5, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 6, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 7, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 8, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 9, dispatch_inner_ipv4)
    OPTIONS_STATE(inner_ipv4_options, 10, dispatch_inner_ipv4)
#undef OPTIONS_STATE

    state dispatch_inner_ipv4 {
        transition select(hdr.inner_ipv4.frag_offset, hdr.inner_ipv4.protocol) {
            (0, PROTO_TCP): parse_tcp;
            (0, PROTO_UDP): parse_udp;
            default: accept;
        }
    }

    state parse_tcp {
        packet.extract(hdr.tcp);
        hdr.flow.setValid();
        hdr.flow.client = hdr.ipv4.src_addr ++ hdr.ipv4.dst_addr ++ hdr.tcp.src_port;
        hdr.flow.dst_port = hdr.tcp.dst_port;
        transition select(hdr.tcp.data_offset) {
            NIBBLE_BELOW_4: bad_tcp_data_offset;
            4: bad_tcp_data_offset;
            default: accept;
        }
    }

    state parse_udp {
        packet.extract(hdr.udp);
        hdr.flow.setValid();
        hdr.flow.client = hdr.ipv4.src_addr ++ hdr.ipv4.dst_addr ++ hdr.udp.src_port;
        hdr.flow.dst_port = hdr.udp.dst_port;
        transition select(hdr.ipv4.dst_addr, hdr.udp.dst_port) {
            (FABRIC_ADDRESS, BEACON_PORT): parse_beacon;
            (_, ROCEV2_PORT): parse_bth;
            default: accept;
        }
    }

    state parse_bth {
        packet.extract(hdr.bth);
        transition accept;
    }

    state parse_beacon {
        packet.extract(hdr.beacon);
        transition select(hdr.beacon.version, hdr.beacon.type) {
            (BEACON_VERSION, BEACON_TYPE_LOAD): parse_beacon_load;
            (BEACON_VERSION, BEACON_TYPE_USAGE): parse_beacon_usage;
            (BEACON_VERSION, _): bad_beacon_type;
            default: bad_beacon_version;
        }
    }

    state parse_beacon_load {
        packet.extract(hdr.beacon_load);
        transition accept;
    }

    state parse_beacon_usage {
        packet.extract(hdr.beacon_usage);
        transition accept;
    }

    state bad_beacon_type {
        verify(false, error.BadBeaconType);
        transition accept;
    }

    state bad_beacon_version {
        verify(false, error.BadBeaconVersion);
        transition accept;
    }

    state bad_ipv4_version {
        verify(false, error.BadIpv4Version);
        transition accept;
    }

    state bad_ipv4_ihl {
        verify(false, error.BadIpv4Ihl);
        transition accept;
    }

    state bad_tcp_data_offset {
        verify(false, error.BadTcpDataOffset);
        transition accept;
    }
}

/* One checksum per IPv4 header, options included: BMv2 leaves the fields of
 * an invalid header (no options) out of a checksum's input. */
control TokenVerifyChecksum(inout headers_t hdr, inout local_metadata_t meta) {
    apply {
        verify_checksum(hdr.ipv4.isValid(),
            { hdr.ipv4.version, hdr.ipv4.ihl, hdr.ipv4.dscp, hdr.ipv4.ecn,
              hdr.ipv4.total_len, hdr.ipv4.identification, hdr.ipv4.flags,
              hdr.ipv4.frag_offset, hdr.ipv4.ttl, hdr.ipv4.protocol,
              hdr.ipv4.src_addr, hdr.ipv4.dst_addr, hdr.ipv4_options.options },
            hdr.ipv4.hdr_checksum, HashAlgorithm.csum16);
    }
}

/* Every rewritten IPv4 header gets its checksum recomputed; L4 checksums need
 * no update because no rewrite touches the L4 pseudo-header. */
control TokenComputeChecksum(inout headers_t hdr, inout local_metadata_t meta) {
    apply {
        update_checksum(hdr.ipv4.isValid(),
            { hdr.ipv4.version, hdr.ipv4.ihl, hdr.ipv4.dscp, hdr.ipv4.ecn,
              hdr.ipv4.total_len, hdr.ipv4.identification, hdr.ipv4.flags,
              hdr.ipv4.frag_offset, hdr.ipv4.ttl, hdr.ipv4.protocol,
              hdr.ipv4.src_addr, hdr.ipv4.dst_addr, hdr.ipv4_options.options },
            hdr.ipv4.hdr_checksum, HashAlgorithm.csum16);
        update_checksum(hdr.inner_ipv4.isValid(),
            { hdr.inner_ipv4.version, hdr.inner_ipv4.ihl, hdr.inner_ipv4.dscp, hdr.inner_ipv4.ecn,
              hdr.inner_ipv4.total_len, hdr.inner_ipv4.identification, hdr.inner_ipv4.flags,
              hdr.inner_ipv4.frag_offset, hdr.inner_ipv4.ttl, hdr.inner_ipv4.protocol,
              hdr.inner_ipv4.src_addr, hdr.inner_ipv4.dst_addr, hdr.inner_ipv4_options.options },
            hdr.inner_ipv4.hdr_checksum, HashAlgorithm.csum16);
    }
}

control TokenDeparser(packet_out packet, in headers_t hdr) {
    apply {
        packet.emit(hdr.ethernet);
        packet.emit(hdr.ipv4);
        packet.emit(hdr.ipv4_options);
        packet.emit(hdr.inner_ipv4);
        packet.emit(hdr.inner_ipv4_options);
        packet.emit(hdr.tcp);
        packet.emit(hdr.udp);
        packet.emit(hdr.bth);
        packet.emit(hdr.beacon);
        packet.emit(hdr.beacon_load);
        packet.emit(hdr.beacon_usage);
    }
}

#endif
