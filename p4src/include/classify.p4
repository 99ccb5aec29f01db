/* Classify: which tenant and traffic class an IPv4 packet belongs to (not a
 * beacon: those are Beacon's). Whether it is addressed to a service is Pin's;
 * a tunnel ended here (Decap) is classified by its inner header. */
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
        size = TENANT_PREFIXES;
    }

    /* ...and return traffic (backend to client) the destination address. */
    @name(".tenant_by_dst")
    table tenant_by_dst {
        key = { hdr.ipv4.dst_addr: lpm @name("dst_addr"); }
        actions = { set_tenant; set_tenant_trusting_dscp; @defaultonly NoAction; }
        const default_action = NoAction();
        size = TENANT_PREFIXES;
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
        size = DSCP_VALUES;
    }

    /* RoCEv2 keeps its lossless class; CNPs (BTH opcode 0x81) ride the top class. */
    @name(".roce_class")
    table roce_class {
        key = { meta.is_cnp: exact @name("is_cnp"); }
        actions = { set_class; @defaultonly NoAction; }
        const default_action = NoAction();
        size = ROCE_CLASSES;
    }

    /* Ingress applies this to IPv4 packets that are not beacons. */
    apply {
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
    }
}

#endif
