/* Select: the backend of each packet to a service.
 *   new connection  -> the overflow responder if admit said so, else by the
 *                      service's mode (weighted hash or power of two choices),
 *                      remembered in conn_backend for the pin;
 *   pinned          -> conn_backend of its slot;
 *   stateless       -> the weighted hash (same 5-tuple, same answer).
 * LOAD beacons feed the per-backend registers that P2C and eligibility read. */
#ifndef TF_SELECT_P4
#define TF_SELECT_P4

control SelectBackend(inout headers_t hdr,
                      inout local_metadata_t meta,
                      inout standard_metadata_t standard_metadata) {

    @name(".backend_load")
    register<bit<32>>(MAX_BACKENDS) backend_load;        /* load of the last beacon */
    @name(".backend_pending")
    register<bit<32>>(MAX_BACKENDS) backend_pending;     /* connections since then */
    @name(".backend_seen")
    register<bit<48>>(MAX_BACKENDS) backend_seen;        /* time of the last beacon */
    @name(".backend_flags")
    register<bit<8>>(MAX_BACKENDS) backend_flags;        /* DOWN, DRAINING */

    @name(".set_service")
    action set_service(bit<16> service_id, bit<8> mode, bit<16> overflow_backend,
                       bit<8> pair_mask, bit<32> beacon_max_age_us, bit<16> conn_cost) {
        meta.service_id = service_id;
        meta.mode = mode;
        meta.overflow_backend = overflow_backend;
        meta.pair_mask = pair_mask;
        meta.beacon_max_age_us = beacon_max_age_us;
        meta.conn_cost = conn_cost;
    }

    /* The service behind a VIP:port (same key as vip) and how it chooses. */
    @name(".service")
    table service {
        key = {
            hdr.ipv4.dst_addr: exact @name("vip");
            hdr.ipv4.protocol: exact @name("protocol");
            hdr.flow.dst_port: exact @name("port");
        }
        actions = { set_service; @defaultonly NoAction; }
        const default_action = NoAction();
        size = MAX_SERVICES;
    }

    @name(".backend_selector")
    action_selector(HashAlgorithm.crc16, 32w4096, 32w16) backend_selector;

    /* Set on the path of a new connection only (initializing them for every
     * packet would cost BMv2 three assignments each time). */
    bit<16> pool_backend;
    bit<16> first;
    bit<16> second;

    @name(".set_pool_backend")
    action set_pool_backend(bit<16> backend_id) {
        pool_backend = backend_id;
    }

    /* Weighted hash: one group per service, members weighted by the controller. */
    @name(".service_pool")
    table service_pool {
        key = {
            meta.service_id: exact @name("service_id");
            hdr.flow.src_addr: selector @name("src_addr");
            hdr.flow.dst_addr: selector @name("dst_addr");
            hdr.flow.src_port: selector @name("src_port");
            hdr.flow.dst_port: selector @name("dst_port");
        }
        actions = { set_pool_backend; }
        implementation = backend_selector;
        size = MAX_SERVICES;
    }

    @name(".set_candidates")
    action set_candidates(bit<16> first_backend, bit<16> second_backend) {
        first = first_backend;
        second = second_backend;
    }

    /* Power of two choices: the controller fills pair_mask + 1 slots per service
     * with pairs of distinct backends; the flow hash picks the slot. */
    @name(".p2c_pairs")
    table p2c_pairs {
        key = {
            meta.service_id: exact @name("service_id");
            meta.pair_slot: exact @name("slot");
        }
        actions = { set_candidates; @defaultonly NoAction; }
        const default_action = NoAction();
        size = 16384;
    }

    apply {
        /* Pinned packets (Pin read their backend) pass with one test. */
        if (meta.pin_state >= PIN_NEW) {
            service.apply();
            pool_backend = NO_BACKEND;
            first = NO_BACKEND;
            second = NO_BACKEND;
            /* Every path may need the weighted hash: as the mode, as the
             * stateless answer, or as the fallback of P2C. */
            meta.pair_slot = meta.fingerprint[23:16] & meta.pair_mask;
            service_pool.apply();

            if (meta.pin_state == PIN_STATELESS) {
                meta.backend_id = (bit<32>)pool_backend;
                if (pool_backend == NO_BACKEND) {
                    meta.drop_reason = DROP_NO_BACKEND;
                }
            } else {
                /* A new connection. */
                bit<48> now = standard_metadata.ingress_global_timestamp;
                bit<16> chosen = NO_BACKEND;
                if (meta.overflow == 1) {
                    chosen = meta.overflow_backend;
                } else {
                    p2c_pairs.apply();

                    /* Eligible: known, not DOWN or DRAINING, and (when the service
                     * sets a maximum age) a beacon no older than that age. */
                    bit<32> load_a = 0;
                    bit<32> load_b = 0;
                    bit<32> load_p = 0;
                    bit<32> pend;
                    bit<48> seen;
                    bit<8> flags;
                    bool ok_a = false;
                    bool ok_b = false;
                    bool ok_p = false;
                    bit<48> max_age = (bit<48>)meta.beacon_max_age_us;

                    if (first < MAX_BACKENDS) {
                        backend_flags.read(flags, (bit<32>)first);
                        backend_seen.read(seen, (bit<32>)first);
                        backend_load.read(load_a, (bit<32>)first);
                        backend_pending.read(pend, (bit<32>)first);
                        load_a = load_a + pend * (bit<32>)meta.conn_cost;
                        ok_a = (flags & 3) == 0
                               && (max_age == 0 || (seen != 0 && now - seen <= max_age));
                    }
                    if (second < MAX_BACKENDS) {
                        backend_flags.read(flags, (bit<32>)second);
                        backend_seen.read(seen, (bit<32>)second);
                        backend_load.read(load_b, (bit<32>)second);
                        backend_pending.read(pend, (bit<32>)second);
                        load_b = load_b + pend * (bit<32>)meta.conn_cost;
                        ok_b = (flags & 3) == 0
                               && (max_age == 0 || (seen != 0 && now - seen <= max_age));
                    }
                    if (pool_backend < MAX_BACKENDS) {
                        backend_flags.read(flags, (bit<32>)pool_backend);
                        backend_seen.read(seen, (bit<32>)pool_backend);
                        ok_p = (flags & 3) == 0
                               && (max_age == 0 || (seen != 0 && now - seen <= max_age));
                    }

                    bit<16> by_pair = NO_BACKEND;
                    if (ok_a && ok_b) {
                        by_pair = load_a <= load_b ? first : second;
                    } else if (ok_a) {
                        by_pair = first;
                    } else if (ok_b) {
                        by_pair = second;
                    }

                    if (meta.mode == MODE_P2C) {
                        chosen = by_pair;
                        if (chosen == NO_BACKEND && ok_p) {
                            chosen = pool_backend;
                            meta.select_fallback = 1;
                        }
                    } else {
                        if (ok_p) {
                            chosen = pool_backend;
                        } else {
                            chosen = by_pair;
                            meta.select_fallback = 1;
                        }
                    }
                }

                /* Only a backend the per-backend registers and counters cover
                 * is pinned (the controller numbers them below MAX_BACKENDS). */
                meta.backend_id = (bit<32>)chosen;
                if (chosen < MAX_BACKENDS) {
                    conn_backend.write(meta.conn_index, meta.backend_id);
                    bit<32> pending;
                    backend_pending.read(pending, (bit<32>)chosen);
                    backend_pending.write((bit<32>)chosen, pending + 1);
                } else {
                    meta.drop_reason = DROP_NO_BACKEND;
                    /* Free the slot: the connection's next packet chooses anew. */
                    conn_fingerprint.write(meta.conn_index, 0);
                }
            }
        } else if (hdr.beacon_load.isValid()) {
            if (meta.beacon_ok == 1 && meta.drop_reason == DROP_NONE) {
                bit<48> now = standard_metadata.ingress_global_timestamp;
                bit<32> b = (bit<32>)hdr.beacon.backend_id;
                backend_load.write(b, hdr.beacon_load.load);
                backend_pending.write(b, 0);
                backend_seen.write(b, now == 0 ? 48w1 : now);
                backend_flags.write(b, hdr.beacon.flags);
            }
        }
    }
}

#endif
