/* Deliver: direct server return. A backend on this switch gets the packet by
 * an L2 rewrite (the backend owns the VIP on its loopback); a backend behind
 * another switch gets it IP-in-IP, routed by the outer address. Everything
 * else is routed by LPM on the destination with a TTL decrement.
 * Both ends of a tunnel are here: Deliver encapsulates, and Decap (applied
 * first, so that the tenant and the service are the inner packet's) ends the
 * tunnels addressed to this switch's backends. */
#ifndef TF_DELIVER_P4
#define TF_DELIVER_P4

control Decap(inout headers_t hdr,
              inout local_metadata_t meta,
              inout standard_metadata_t standard_metadata) {

    @name(".decap_to_backend")
    action decap_to_backend(bit<16> backend_id) {
        SET(F_DECAP);
        meta.backend_id = (bit<32>)backend_id;
    }

    /* IP-in-IP addressed to a backend behind this switch: strip the outer
     * header here, and deliver the inner packet to that backend. */
    @name(".tunnel_term")
    table tunnel_term {
        key = { hdr.ipv4.dst_addr: exact @name("dst_addr"); }
        actions = { decap_to_backend; @defaultonly NoAction; }
        const default_action = NoAction();
        size = MAX_BACKENDS;
    }

    /* Ingress applies this to IPv4 packets that are not beacons. */
    apply {
        if (hdr.inner_ipv4.isValid()) {
            tunnel_term.apply();
            if (IS(F_DECAP)) {
                hdr.ipv4 = hdr.inner_ipv4;
                hdr.ipv4_options = hdr.inner_ipv4_options;
                hdr.inner_ipv4.setInvalid();
                hdr.inner_ipv4_options.setInvalid();
                hdr.flow.setInvalid();  /* delivered as it is: no pin, no service */
            }
        }
    }
}

control Deliver(inout headers_t hdr,
                inout local_metadata_t meta,
                inout standard_metadata_t standard_metadata) {

    @name(".deliver_local")
    action deliver_local(port_t port, mac_t smac, mac_t dmac) {
        standard_metadata.egress_spec = port;
        hdr.ethernet.src_addr = smac;
        hdr.ethernet.dst_addr = dmac;
    }

    /* Encapsulate: the packet (options and all) becomes the inner header.
     * Nothing reaches here already encapsulated: a service packet is not
     * IP-in-IP, and a terminated tunnel's inner header was made the outer. */
    @name(".deliver_ipip")
    action deliver_ipip(ipv4_t tunnel_src, ipv4_t tunnel_dst) {
        hdr.inner_ipv4 = hdr.ipv4;
        hdr.inner_ipv4_options = hdr.ipv4_options;  /* valid only if there are options */
        hdr.ipv4_options.setInvalid();
        hdr.ipv4.ihl = IPV4_MIN_IHL;
        hdr.ipv4.total_len = hdr.inner_ipv4.total_len + IPV4_HEADER_BYTES;
        hdr.ipv4.identification = 0;
        hdr.ipv4.flags = 0;
        hdr.ipv4.frag_offset = 0;
        hdr.ipv4.ttl = TUNNEL_TTL;
        hdr.ipv4.protocol = PROTO_IPIP;
        hdr.ipv4.src_addr = tunnel_src;
        hdr.ipv4.dst_addr = tunnel_dst;
    }

    @name(".backend")
    table backend {
        key = { meta.backend_id: exact @name("backend_id"); }
        actions = { deliver_local; deliver_ipip; @defaultonly NoAction; }
        const default_action = NoAction();
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
        size = ROUTES;
    }

    /* Ingress applies this to packets to forward (not dropped, not beacons). */
    apply {
        /* Applied to every packet, one test fewer for the common one: other
         * traffic has backend_id 0, which no backend has. */
        switch (backend.apply().action_run) {
            /* DSR: the L2 rewrite is all. A packet to a backend is never
             * IP-in-IP here: a service's vip is TCP, and Decap made the
             * inner header the outer. */
            deliver_local: {}
            /* deliver_ipip's tunnel, by its outer address; or a packet for no
             * backend: routed unless it was for one (a service packet or a
             * decapsulated one, whose backend has no entry). */
            default: {
                if (!hdr.inner_ipv4.isValid() && (SERVICE || IS(F_DECAP))) {
                    meta.drop_reason = DROP_UNKNOWN_BACKEND;
                } else if (hdr.ipv4.ttl <= 1) {
                    meta.drop_reason = DROP_TTL_EXPIRED;
                } else {
                    ipv4_route.apply();
                }
            }
        }
    }
}

#endif
