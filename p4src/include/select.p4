/* Select: the backend of each packet to a service.
 *   new connection  -> the overflow responder if admit said so, else by the
 *                      service's mode (weighted hash or power of two choices),
 *                      remembered in conn_backend for the pin;
 *   pinned          -> conn_backend of its slot (Pin read it; Select is not applied);
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
        hdr.slow.service_id = service_id;
        hdr.slow.mode = mode;
        hdr.slow.overflow_backend = (bit<32>)overflow_backend;
        hdr.slow.pair_mask = pair_mask;
        hdr.slow.beacon_max_age_us = beacon_max_age_us;
        hdr.slow.conn_cost = (bit<32>)conn_cost;
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

    @name(".set_pool_backend")
    action set_pool_backend(bit<16> backend_id) {
        hdr.slow.pool_backend = (bit<32>)backend_id;
    }

    /* Weighted hash: one group per service, members weighted by the controller. */
    @name(".service_pool")
    table service_pool {
        key = {
            hdr.slow.service_id: exact @name("service_id");
            hdr.flow.client: selector @name("client");
            hdr.flow.dst_port: selector @name("dst_port");
        }
        actions = { set_pool_backend; }
        implementation = backend_selector;
        size = MAX_SERVICES;
    }

    @name(".set_candidates")
    action set_candidates(bit<16> first_backend, bit<16> second_backend) {
        hdr.slow.first = (bit<32>)first_backend;
        hdr.slow.second = (bit<32>)second_backend;
    }

    /* Power of two choices: the controller fills pair_mask + 1 slots per service
     * with pairs of distinct backends; the flow hash picks the slot. */
    @name(".p2c_pairs")
    table p2c_pairs {
        key = {
            hdr.slow.service_id: exact @name("service_id");
            hdr.slow.pair_slot: exact @name("slot");
        }
        actions = { set_candidates; @defaultonly NoAction; }
        const default_action = NoAction();
        size = 16384;
    }

    /* Eligible: known, not DOWN or DRAINING, and (when the service sets a
     * maximum age) a beacon no older than that age; of the backend whose
     * flags and seen were just read. */
#define ELIGIBLE ((hdr.slow.flags & (BEACON_FLAG_DOWN | BEACON_FLAG_DRAINING)) == 0 \
                  && (hdr.slow.beacon_max_age_us == 0 || (hdr.slow.seen != 0 \
                      && standard_metadata.ingress_global_timestamp - hdr.slow.seen \
                         <= (bit<48>)hdr.slow.beacon_max_age_us)))
    apply {
        /* New connections and stateless choices choose; LOAD beacons feed the
         * registers. (Ingress skips this control for pinned packets.) */
        if (meta.pin_state >= PIN_NEW) {
            hdr.slow.setValid();
            service.apply();
            hdr.slow.pool_backend = NO_BACKEND;
            /* Every path may need the weighted hash: as the mode, as the
             * stateless answer, or as the fallback of P2C. */
            service_pool.apply();

            if (meta.pin_state == PIN_STATELESS) {
                meta.backend_id = hdr.slow.pool_backend;
                if (hdr.slow.pool_backend == NO_BACKEND) {
                    meta.drop_reason = DROP_NO_BACKEND;
                }
            } else {
                /* A new connection. */
                if (IS(F_OVERFLOW)) {
                    meta.backend_id = hdr.slow.overflow_backend;
                } else {
                    /* By the pair (into backend_id): the eligible one of lower load,
                     * the first on a tie. */
                    hdr.slow.first = NO_BACKEND;
                    hdr.slow.second = NO_BACKEND;
                    hdr.slow.pair_slot = meta.fingerprint[23:16] & hdr.slow.pair_mask;
                    p2c_pairs.apply();
                    meta.backend_id = NO_BACKEND;
                    if (hdr.slow.first < MAX_BACKENDS) {
                        backend_flags.read(hdr.slow.flags, hdr.slow.first);
                        backend_seen.read(hdr.slow.seen, hdr.slow.first);
                        if (ELIGIBLE) {
                            backend_load.read(hdr.slow.load, hdr.slow.first);
                            backend_pending.read(hdr.slow.pending, hdr.slow.first);
                            meta.backend_id = hdr.slow.first;
                            hdr.slow.by_pair_load = hdr.slow.load
                                                    + hdr.slow.pending * hdr.slow.conn_cost;
                        }
                    }
                    if (hdr.slow.second < MAX_BACKENDS) {
                        backend_flags.read(hdr.slow.flags, hdr.slow.second);
                        backend_seen.read(hdr.slow.seen, hdr.slow.second);
                        if (ELIGIBLE) {
                            backend_load.read(hdr.slow.load, hdr.slow.second);
                            backend_pending.read(hdr.slow.pending, hdr.slow.second);
                            if (meta.backend_id == NO_BACKEND
                                    || hdr.slow.load + hdr.slow.pending * hdr.slow.conn_cost
                                       < hdr.slow.by_pair_load) {
                                meta.backend_id = hdr.slow.second;
                            }
                        }
                    }

                    /* The weighted hash's choice: flags and seen of the pool's backend. */
                    hdr.slow.flags = BEACON_FLAG_DOWN;
                    if (hdr.slow.pool_backend < MAX_BACKENDS) {
                        backend_flags.read(hdr.slow.flags, hdr.slow.pool_backend);
                        backend_seen.read(hdr.slow.seen, hdr.slow.pool_backend);
                    }
                    if (hdr.slow.mode == MODE_P2C) {
                        if (meta.backend_id == NO_BACKEND && ELIGIBLE) {
                            meta.backend_id = hdr.slow.pool_backend;
                            SET(F_FALLBACK);
                        }
                    } else if (ELIGIBLE) {
                        meta.backend_id = hdr.slow.pool_backend;
                    } else {
                        SET(F_FALLBACK);  /* the pair's choice stands */
                    }
                }

                /* Only a backend the per-backend registers and counters cover
                 * is pinned (the controller numbers them below MAX_BACKENDS). */
                if (meta.backend_id < MAX_BACKENDS) {
                    conn_backend.write(meta.conn_index, meta.backend_id);
                    backend_pending.read(hdr.slow.pending, meta.backend_id);
                    hdr.slow.pending = hdr.slow.pending + 1;
                    backend_pending.write(meta.backend_id, hdr.slow.pending);
                } else {
                    meta.drop_reason = DROP_NO_BACKEND;
                    /* Free the slot: the connection's next packet chooses anew. */
                    conn_fingerprint.write(meta.conn_index, 0);
                }
            }
        } else if (hdr.beacon_load.isValid()) {
            /* beacon_source's accept_beacon set backend_id. A beacon at time 0
             * would read as never seen; the switch is configured long after. */
            if (IS(F_BEACON_OK) && meta.drop_reason == DROP_NONE) {
                backend_load.write(meta.backend_id, hdr.beacon_load.load);
                backend_pending.write(meta.backend_id, 0);
                backend_seen.write(meta.backend_id, standard_metadata.ingress_global_timestamp);
                backend_flags.write(meta.backend_id, hdr.beacon.flags);
            }
        }
    }
#undef ELIGIBLE
}

#endif
