/* Count: per tenant, per backend, per class and per drop reason, all indexed
 * counters readable over P4Runtime. Drops by reason happen here, after
 * counting. With direct server return a backend's replies enter the switch on
 * its own port: reply_bytes counts, per backend, what the switch forwarded from
 * that port, the bound the billing cross-check holds billed tokens to
 * (controller/crosscheck.py). */
#ifndef TF_COUNT_P4
#define TF_COUNT_P4

control Count(inout headers_t hdr,
              inout local_metadata_t meta,
              inout standard_metadata_t standard_metadata) {

    @name(".tenant_admitted")
    counter(MAX_TENANTS, CounterType.packets) tenant_admitted;
    @name(".tenant_overflow")
    counter(MAX_TENANTS, CounterType.packets) tenant_overflow;
    @name(".tenant_traffic")
    counter(MAX_TENANTS, CounterType.packets_and_bytes) tenant_traffic;
    @name(".backend_conns")
    counter(MAX_BACKENDS, CounterType.packets) backend_conns;
    @name(".backend_traffic")
    counter(MAX_BACKENDS, CounterType.packets_and_bytes) backend_traffic;
    @name(".class_traffic")
    counter(NUM_CLASSES, CounterType.packets_and_bytes) class_traffic;
    @name(".drops")
    counter(NUM_DROP_REASONS, CounterType.packets) drops;
    @name(".reply_bytes")
    counter(MAX_BACKENDS, CounterType.packets_and_bytes) reply_bytes;

    /* bit<32>, the counter's index width: a cast would cost every packet a
     * temporary (BMv2 zeroes each one). */
    @name(".count_reply")
    action count_reply(bit<32> backend_id) {
        reply_bytes.count(backend_id);
    }

    /* The ports backends sit on: one entry per port, for the lowest backend id
     * there (backends sharing a port share a count, as a port's bytes do). */
    @name(".reply_source")
    table reply_source {
        key = { standard_metadata.ingress_port: exact @name("ingress_port"); }
        actions = { count_reply; @defaultonly NoAction; }
        const default_action = NoAction();
        size = MAX_BACKENDS;
    }

    apply {
        /* A forwarded packet of a pinned connection of a known tenant: all its
         * counters in one action. Its backend is below MAX_BACKENDS (Select
         * pins no other) and so is its tenant (set_tenant takes 12 bits). */
        if (meta.pin_state == PIN_HIT && meta.drop_reason == DROP_NONE
                && meta.tenant_id != 0) {
            events.count(EVENT_PIN_HIT);
            class_traffic.count(meta.tclass);
            tenant_traffic.count(meta.tenant_id);
            backend_traffic.count(meta.backend_id);
        } else {
            if (meta.pin_state == PIN_HIT) {
                events.count(EVENT_PIN_HIT);
            } else if (SERVICE) {
                if (meta.pin_state == PIN_NEW) {
                    events.count(EVENT_PIN_NEW);
                } else if (meta.pin_state == PIN_STATELESS) {
                    if (OPENS_FLOW) {
                        events.count(EVENT_PIN_COLLISION);
                    } else {
                        events.count(EVENT_PIN_MISS);
                    }
                }
                if (IS(F_FALLBACK)) {
                    events.count(EVENT_SELECT_FALLBACK);
                }
            }

            /* Drops happen here, after counting (Beacon drops the beacons it
             * consumed; their events are its own). */
            if (meta.drop_reason != DROP_NONE) {
                drops.count(meta.drop_reason);
                mark_to_drop(standard_metadata);
            } else if (NOT(F_CONSUMED)) {
                class_traffic.count(meta.tclass);
                if (meta.tenant_id != 0) {
                    tenant_traffic.count(meta.tenant_id);
                }
                if (SERVICE || IS(F_DECAP)) {
                    if (meta.backend_id < MAX_BACKENDS) {
                        backend_traffic.count(meta.backend_id);
                        if (meta.pin_state == PIN_NEW) {
                            backend_conns.count(meta.backend_id);
                            if (meta.tenant_id != 0) {
                                if (IS(F_OVERFLOW)) {
                                    tenant_overflow.count(meta.tenant_id);
                                    events.count(EVENT_OVERFLOW);
                                } else {
                                    tenant_admitted.count(meta.tenant_id);
                                }
                            }
                        }
                    }
                } else {
                    /* Not to a service: a reply if it came from a backend's
                     * port. Packets to a service (the pinned path above
                     * included) pay for no lookup. */
                    reply_source.apply();
                }
            }
        }
    }
}

#endif
