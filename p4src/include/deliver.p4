/* Deliver: direct server return. A backend on this switch gets the packet by
 * an L2 rewrite (the backend owns the VIP on its loopback); a backend behind
 * another switch gets it IP-in-IP, routed by the outer address. Everything
 * else is routed by LPM on the destination with a TTL decrement. */
#ifndef TF_DELIVER_P4
#define TF_DELIVER_P4

control Deliver(inout headers_t hdr,
                inout local_metadata_t meta,
                inout standard_metadata_t standard_metadata) {

    bool encap = false;
    bool delivered = false;
    bit<32> tunnel_src_addr = 0;
    bit<32> tunnel_dst_addr = 0;

    @name(".deliver_local")
    action deliver_local(port_t port, mac_t smac, mac_t dmac) {
        standard_metadata.egress_spec = port;
        hdr.ethernet.src_addr = smac;
        hdr.ethernet.dst_addr = dmac;
        delivered = true;
    }

    @name(".deliver_ipip")
    action deliver_ipip(ipv4_t tunnel_src, ipv4_t tunnel_dst) {
        tunnel_src_addr = tunnel_src;
        tunnel_dst_addr = tunnel_dst;
        encap = true;
    }

    @name(".backend_unknown")
    action backend_unknown() {
        meta.drop_reason = DROP_UNKNOWN_BACKEND;
    }

    @name(".backend")
    table backend {
        key = { meta.backend_id: exact @name("backend_id"); }
        actions = { deliver_local; deliver_ipip; @defaultonly backend_unknown; }
        const default_action = backend_unknown();
        size = MAX_BACKENDS;
    }

    @name(".route")
    action route(port_t port, mac_t smac, mac_t dmac) {
        standard_metadata.egress_spec = port;
        hdr.ethernet.src_addr = smac;
        hdr.ethernet.dst_addr = dmac;
        hdr.ipv4.ttl = hdr.ipv4.ttl - 1;
    }

    @name(".no_route")
    action no_route() {
        meta.drop_reason = DROP_NO_ROUTE;
    }

    @name(".ipv4_route")
    table ipv4_route {
        key = { hdr.ipv4.dst_addr: lpm @name("dst_addr"); }
        actions = { route; @defaultonly no_route; }
        const default_action = no_route();
        size = 4096;
    }

    apply {
        if (meta.drop_reason != DROP_NONE || meta.consumed == 1) {
            return;
        }
        if (meta.service_hit == 1 || meta.decap == 1) {
            backend.apply();
            if (delivered || meta.drop_reason != DROP_NONE) {
                return;
            }
        }
        if (encap && !hdr.inner_ipv4.isValid()) {
            /* Outer header per RFC 2003; DSCP and ECN copied from the inner. */
            hdr.inner_ipv4 = hdr.ipv4;
            if (hdr.ipv4_options.isValid()) {
                hdr.inner_ipv4_options = hdr.ipv4_options;
                hdr.ipv4_options.setInvalid();
            }
            hdr.ipv4.ihl = 5;
            hdr.ipv4.total_len = hdr.inner_ipv4.total_len + 20;
            hdr.ipv4.identification = 0;
            hdr.ipv4.flags = 0;
            hdr.ipv4.frag_offset = 0;
            hdr.ipv4.ttl = 64;
            hdr.ipv4.protocol = PROTO_IPIP;
            hdr.ipv4.src_addr = tunnel_src_addr;
            hdr.ipv4.dst_addr = tunnel_dst_addr;
        }
        if (hdr.ipv4.ttl <= 1) {
            meta.drop_reason = DROP_TTL_EXPIRED;
            return;
        }
        ipv4_route.apply();
    }
}

#endif
