/* Classify: which tenant and traffic class a packet belongs to, whether a
 * beacon comes from where its backend was registered, and whether an IP-in-IP
 * packet ends here. (Whether it is addressed to a service is Pin's.) */
#ifndef TF_CLASSIFY_P4
#define TF_CLASSIFY_P4

control Classify(inout headers_t hdr,
                 inout local_metadata_t meta,
                 inout standard_metadata_t standard_metadata) {

    @name(".set_tenant")
    action set_tenant(bit<12> tenant_id, bit<3> tclass) {
        meta.tenant_id = (bit<32>)tenant_id;
        meta.tclass = (bit<32>)tclass;
    }

    /* A tenant whose policy lets the packet's DSCP choose the class: an action
     * of its own, so that the other tenants' packets pay for no flag. */
    @name(".set_tenant_trusting_dscp")
    action set_tenant_trusting_dscp(bit<12> tenant_id, bit<3> tclass) {
        set_tenant(tenant_id, tclass);
        SET(F_TRUST_DSCP);
    }

    /* Client prefixes: forward traffic matches the source address... */
    @name(".tenant_by_src")
    table tenant_by_src {
        key = { hdr.ipv4.src_addr: lpm @name("src_addr"); }
        actions = { set_tenant; set_tenant_trusting_dscp; @defaultonly NoAction; }
        const default_action = NoAction();
        size = 8192;
    }

    /* ...and return traffic (backend to client) the destination address. */
    @name(".tenant_by_dst")
    table tenant_by_dst {
        key = { hdr.ipv4.dst_addr: lpm @name("dst_addr"); }
        actions = { set_tenant; set_tenant_trusting_dscp; @defaultonly NoAction; }
        const default_action = NoAction();
        size = 8192;
    }

    @name(".set_class")
    action set_class(bit<3> tclass) {
        meta.tclass = (bit<32>)tclass;
    }

    /* Applied only for tenants whose entry is set_tenant_trusting_dscp. */
    @name(".dscp_class")
    table dscp_class {
        key = { hdr.ipv4.dscp: exact @name("dscp"); }
        actions = { set_class; @defaultonly NoAction; }
        const default_action = NoAction();
        size = 64;
    }

    /* RoCEv2 keeps its lossless class; CNPs (BTH opcode 0x81) ride the top class. */
    @name(".roce_class")
    table roce_class {
        key = { meta.is_cnp: exact @name("is_cnp"); }
        actions = { set_class; @defaultonly NoAction; }
        const default_action = NoAction();
        size = 2;
    }

    @name(".accept_beacon")
    action accept_beacon() {
        SET(F_BEACON_OK);
        meta.backend_id = (bit<32>)hdr.beacon.backend_id;  /* for Select's registers */
    }

    @name(".reject_beacon")
    action reject_beacon() {
        meta.drop_reason = DROP_BEACON_UNAUTHORIZED;
    }

    /* A beacon counts only from the port and address registered for its backend. */
    @name(".beacon_source")
    table beacon_source {
        key = {
            hdr.beacon.backend_id: exact @name("backend_id");
            standard_metadata.ingress_port: exact @name("ingress_port");
            hdr.ipv4.src_addr: exact @name("src_addr");
        }
        actions = { accept_beacon; @defaultonly reject_beacon; }
        const default_action = reject_beacon();
        size = 2048;
    }

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

    apply {
        /* The common case first: one test for it. */
        if (hdr.ipv4.isValid() && !hdr.beacon.isValid()) {
            if (hdr.inner_ipv4.isValid()) {
                tunnel_term.apply();
                if (IS(F_DECAP)) {
                    hdr.ipv4 = hdr.inner_ipv4;
                    hdr.ipv4_options = hdr.inner_ipv4_options;
                    hdr.inner_ipv4.setInvalid();
                    hdr.inner_ipv4_options.setInvalid();
                }
            }

            if (!tenant_by_src.apply().hit) {
                tenant_by_dst.apply();
            }
            /* The classes a packet can carry over its tenant's, behind one test. */
            if (IS(F_TRUST_DSCP) || hdr.bth.isValid()) {
                if (IS(F_TRUST_DSCP)) {
                    dscp_class.apply();
                }
                if (hdr.bth.isValid()) {
                    meta.is_cnp = (bit<1>)(hdr.bth.opcode == BTH_OPCODE_CNP);
                    roce_class.apply();
                }
            }
        } else if (!hdr.ipv4.isValid()) {
            meta.drop_reason = DROP_NOT_IPV4;
        } else {
            SET(F_CONSUMED);
            if (hdr.beacon_load.isValid() && hdr.beacon.backend_id >= MAX_BACKENDS) {
                meta.drop_reason = DROP_BEACON_BAD_ID;
            } else if (hdr.beacon_usage.isValid()
                       && hdr.beacon_usage.tenant_id >= MAX_TENANTS) {
                meta.drop_reason = DROP_BEACON_BAD_ID;
            } else {
                beacon_source.apply();
            }
        }
    }
}

#endif
