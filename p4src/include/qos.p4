/* QoS, both directions: per class a DSCP remark and a priority queue (BMv2
 * runs with --priority-queues 8, queue 0 lowest); per tenant a two-rate
 * three-colour meter (RFC 2698) whose colour the policy remarks or drops. The
 * egress half (ECN marking on queue depth) is TokenEgress. */
#ifndef TF_QOS_P4
#define TF_QOS_P4

control Qos(inout headers_t hdr,
            inout local_metadata_t meta,
            inout standard_metadata_t standard_metadata) {

    @name(".tenant_meter")
    meter(MAX_TENANTS, MeterType.bytes) tenant_meter;

    /* The tenant's meter runs in the class's action: one action fewer per
     * packet. Meter 0 (no tenant) is never configured, so always green. */
    @name(".meter_only")
    action meter_only() {
        tenant_meter.execute_meter(meta.tenant_id, meta.color);
    }

    @name(".set_class_qos")
    action set_class_qos(bit<6> dscp, bit<3> priority) {
        hdr.ipv4.dscp = dscp;
        standard_metadata.priority = priority;
        meter_only();
    }

    @name(".class_qos")
    table class_qos {
        key = { meta.tclass: exact @name("tclass"); }
        actions = { set_class_qos; @defaultonly meter_only; }
        const default_action = meter_only();
        size = NUM_CLASSES;
    }

    @name(".color_remark")
    action color_remark(bit<6> dscp) {
        hdr.ipv4.dscp = dscp;
    }

    @name(".color_drop")
    action color_drop() {
        meta.drop_reason = DROP_METER_RED;
    }

    /* Colours: yellow and red (green is not looked up). No entry: the colour
     * changes nothing. */
    @name(".meter_policy")
    table meter_policy {
        key = {
            meta.tenant_id: exact @name("tenant_id");
            meta.color: exact @name("color");
        }
        actions = { color_remark; color_drop; @defaultonly NoAction; }
        const default_action = NoAction();
        size = METER_POLICIES;
    }

    apply {
        /* Ingress applies this to packets to forward, before Deliver (so that
         * an IP-in-IP header carries the class's DSCP inside and out): one
         * that Deliver drops (no route, TTL, unknown backend) is still metered,
         * as ingress policing does. */
        class_qos.apply();
        if (meta.color != COLOR_GREEN) {
            if (meta.color == COLOR_YELLOW) {
                events.count(EVENT_METER_YELLOW);
            } else {
                events.count(EVENT_METER_RED);
            }
            meter_policy.apply();
        }
    }
}

/* ECN CE marking (DCQCN) above a queue-depth threshold, per class. */
control TokenEgress(inout headers_t hdr,
                    inout local_metadata_t meta,
                    inout standard_metadata_t standard_metadata) {

    @name(".ecn_marked")
    counter(NUM_CLASSES, CounterType.packets) ecn_marked;

    @name(".set_ecn_threshold")
    action set_ecn_threshold(bit<19> qdepth) {
        meta.ecn_threshold = qdepth;
    }

    @name(".ecn_policy")
    table ecn_policy {
        key = { meta.tclass: exact @name("tclass"); }
        actions = { set_ecn_threshold; @defaultonly NoAction; }
        const default_action = NoAction();
        size = NUM_CLASSES;
    }

    apply {
        if (hdr.ipv4.isValid() && (hdr.ipv4.ecn == ECN_ECT1 || hdr.ipv4.ecn == ECN_ECT0)) {
            if (ecn_policy.apply().hit) {
                if (standard_metadata.enq_qdepth >= meta.ecn_threshold) {
                    hdr.ipv4.ecn = ECN_CE;
                    ecn_marked.count(meta.tclass);
                }
            }
        }
    }
}

#endif
