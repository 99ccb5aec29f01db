/* Every header the parser reads and the metadata the controls share. */
#ifndef TF_HEADERS_P4
#define TF_HEADERS_P4

typedef bit<48> mac_t;
typedef bit<32> ipv4_t;
typedef bit<9> port_t;

header ethernet_h {
    mac_t dst_addr;
    mac_t src_addr;
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
    ipv4_t src_addr;
    ipv4_t dst_addr;
}

/* IPv4 options, skipped by IHL (at most 40 bytes); kept for the checksum. */
header ipv4_options_h {
    varbit<320> options;
}

/* Fields the switch never reads are kept whole: BMv2 pays per field for
 * every header it extracts and emits. */
header tcp_h {
    bit<16> src_port;
    bit<16> dst_port;
    bit<64> seq_ack_no;       /* sequence and acknowledgement numbers */
    bit<4> data_offset;
    bit<4> res;
    bit<8> flags;             /* CWR ECE URG ACK PSH RST SYN FIN (TCP_* in defines.p4) */
    bit<48> window_csum_urg;  /* window, checksum, urgent pointer */
}

header udp_h {
    bit<16> src_port;
    bit<16> dst_port;
    bit<16> length;
    bit<16> checksum;
}

/* RoCEv2 base transport header (InfiniBand BTH), UDP port 4791. */
header bth_h {
    bit<8> opcode;
    bit<1> solicited;
    bit<1> migreq;
    bit<2> pad_count;
    bit<4> tver;
    bit<16> pkey;
    bit<1> fecn;
    bit<1> becn;
    bit<6> reserved0;
    bit<24> dest_qp;
    bit<1> ack_req;
    bit<7> reserved1;
    bit<24> psn;
}

/* Fabric beacon, common part (tokenfabric/beacon.py). */
header beacon_h {
    bit<8> version;
    bit<8> type;
    bit<8> flags;
    bit<8> reserved;
    bit<16> backend_id;
    bit<16> seq;
}

header beacon_load_h {
    bit<32> load;
    bit<16> running;
    bit<16> waiting;
}

header beacon_usage_h {
    bit<16> tenant_id;
    bit<16> reserved;
    bit<32> prompt_tokens;
    bit<32> completion_tokens;
}

/* Addresses and ports of a TCP or UDP packet, filled in by the parser and
 * never emitted. It is a header, not metadata, so that hashing it costs BMv2
 * no copies: p4c copies a hash's inputs into temporaries unless they are one
 * header that the hash's result cannot alias. Two fields, not four: making
 * the header valid zeroes each field, and BMv2 pays per field. The protocol,
 * the fifth member of the 5-tuple, enters the pin's fingerprint as the hash's
 * offset. The addresses are the outer ones. */
header flow_h {
    bit<80> client;    /* source address ++ destination address ++ source port */
    bit<16> dst_port;  /* a field of its own: a table key */
}

/* Scratch state of the slow path, one header per control that needs it,
 * kept in headers rather than metadata: BMv2 zeroes every metadata field of
 * every packet, but only clears a header's valid bit. The control makes its
 * header valid (zeroed) before using it; neither is emitted. */

/* Admit: the tenant's contract (tenant_contract) and bucket. */
header bucket_h {
    bit<64> contract_rate;
    bit<64> contract_full;
    bit<64> level;
    bit<48> elapsed;
}

/* Select: the service's selection (service table), the candidates and what
 * the registers say of them. */
header choice_h {
    bit<16> service_id;
    bit<8> mode;
    bit<32> overflow_backend;
    bit<8> pair_mask;
    bit<32> beacon_max_age_us;
    bit<32> conn_cost;
    bit<8> pair_slot;
    bit<32> pool_backend;
    bit<32> first;
    bit<32> second;
    bit<8> flags;
    bit<48> seen;
    bit<32> load;
    bit<32> pending;
    bit<32> by_pair_load;
    bit<32> affinity;        /* steer_affinity: the learned backend */
    bit<32> affinity_bound;  /* and its bound, percent of by_pair_load */
}

struct headers_t {
    ethernet_h ethernet;
    ipv4_h ipv4;
    ipv4_options_h ipv4_options;
    ipv4_h inner_ipv4;
    ipv4_options_h inner_ipv4_options;
    tcp_h tcp;
    udp_h udp;
    bth_h bth;
    beacon_h beacon;
    beacon_load_h beacon_load;
    beacon_usage_h beacon_usage;
    flow_h flow;
    bucket_h bucket;
    choice_h choice;
}

/* BMv2 zeroes every field here (and every variable and temporary p4c adds)
 * for every packet it receives, at about the cost of an assignment each:
 * fields are few, and one-bit facts are bits of one field. */
struct local_metadata_t {
    /* classify. Ids that index counters, meters and registers are 32 bits
     * wide, the width of those indices: a narrower field would cost BMv2 a
     * copy into a temporary at every use. */
    bit<32> tenant_id;      /* 0: no tenant (the controller numbers them 1..4095) */
    bit<32> tclass;
    bit<1> is_cnp;
    bit<8> flags;           /* F_* of defines.p4 */

    /* the service (VIP:port) this packet is addressed to; the rest of the
     * service is Select's hdr.choice */
    bit<32> idle_timeout_us;

    /* pin */
    bit<32> conn_index;     /* crc16 of the flow header */
    bit<32> fingerprint;    /* crc32 of it, offset by the protocol: never 0 */
    bit<2> pin_state;

    /* select */
    bit<32> backend_id;

    /* deliver, qos, count */
    bit<32> drop_reason;    /* indexes the drops counter */
    bit<2> color;
    bit<19> ecn_threshold;
}

#endif
