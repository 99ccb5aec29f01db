/* Select: the backend of each packet to a service.
 *   new connection  -> the overflow responder if admit said so, else by the
 *                      service's mode (weighted hash or power of two choices),
 *                      remembered in conn_backend for the pin;
 *   pinned          -> conn_backend of its slot (Pin read it; Select is not applied);
 *   stateless       -> the first candidate of the connection's P2C pair slot
 *                      (same 5-tuple, same answer), which the controller rewrites
 *                      only when the service's eligible backends change, never
 *                      with the weights; the weighted hash where the service has
 *                      no pair table.
 * P2C and eligibility read the per-backend registers that Beacon writes
 * (state.p4). Its scratch state is hdr.choice. hdr.flow is valid here (Pin
 * set pin_state only for a packet with one), which p4c cannot tell: hence
 * its "potentially invalid header" warnings. */
#ifndef TF_SELECT_P4
#define TF_SELECT_P4

control SelectBackend(inout headers_t hdr,
                      inout local_metadata_t meta,
                      inout standard_metadata_t standard_metadata) {

    @name(".set_service")
    action set_service(bit<16> service_id, bit<8> mode, bit<16> overflow_backend,
                       bit<8> pair_mask, bit<32> beacon_max_age_us, bit<16> conn_cost) {
        hdr.choice.service_id = service_id;
        hdr.choice.mode = mode;
        hdr.choice.overflow_backend = (bit<32>)overflow_backend;
        hdr.choice.pair_mask = pair_mask;
        hdr.choice.beacon_max_age_us = beacon_max_age_us;
        hdr.choice.conn_cost = (bit<32>)conn_cost;
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
    action_selector(HashAlgorithm.crc16, SELECTOR_MEMBERS, SELECTOR_HASH_BITS) backend_selector;

    @name(".set_pool_backend")
    action set_pool_backend(bit<16> backend_id) {
        hdr.choice.pool_backend = (bit<32>)backend_id;
    }

    /* Weighted hash: one group per service, members weighted by the controller. */
    @name(".service_pool")
    table service_pool {
        key = {
            hdr.choice.service_id: exact @name("service_id");
            hdr.flow.client: selector @name("client");
            hdr.flow.dst_port: selector @name("dst_port");
        }
        actions = { set_pool_backend; }
        implementation = backend_selector;
        size = MAX_SERVICES;
    }

    @name(".set_candidates")
    action set_candidates(bit<16> first_backend, bit<16> second_backend) {
        hdr.choice.first = (bit<32>)first_backend;
        hdr.choice.second = (bit<32>)second_backend;
    }

    /* Power of two choices: the controller fills pair_mask + 1 slots per service
     * with pairs of distinct backends; the flow hash picks the slot. */
    @name(".p2c_pairs")
    table p2c_pairs {
        key = {
            hdr.choice.service_id: exact @name("service_id");
            hdr.choice.pair_slot: exact @name("slot");
        }
        actions = { set_candidates; @defaultonly NoAction; }
        const default_action = NoAction();
        size = PAIR_SLOTS;
    }

    /* Prefix affinity (docs/dataplane.md, "Select: prefix affinity"): the
     * controller learns "this client's prompts are cached on that backend" from
     * the bridges' handoff decisions and installs it here, per service. */
    @name(".steer_affinity")
    action steer_affinity(bit<16> backend_id, bit<16> bound_percent) {
        hdr.choice.affinity = (bit<32>)backend_id;
        hdr.choice.affinity_bound = (bit<32>)bound_percent;
    }

    @name(".affinity")
    table affinity {
        key = {
            hdr.choice.service_id: exact @name("service_id");
            hdr.ipv4.src_addr: exact @name("client");
        }
        actions = { steer_affinity; @defaultonly NoAction; }
        const default_action = NoAction();
        size = AFFINITY_ENTRIES;
    }

    /* Eligible: known, not DOWN or DRAINING, and (when the service sets a
     * maximum age) a beacon no older than that age; of the backend whose
     * flags and seen were just read. */
#define ELIGIBLE ((hdr.choice.flags & (BEACON_FLAG_DOWN | BEACON_FLAG_DRAINING)) == 0 \
                  && (hdr.choice.beacon_max_age_us == 0 || (hdr.choice.seen != 0 \
                      && standard_metadata.ingress_global_timestamp - hdr.choice.seen \
                         <= (bit<48>)hdr.choice.beacon_max_age_us)))
    apply {
        /* New connections and stateless choices choose. (Ingress skips this
         * control for pinned packets.) */
        if (meta.pin_state >= PIN_NEW) {
            hdr.choice.setValid();
            service.apply();
            /* The connection's pair slot: P2C's two candidates, and the first
             * the stateless answer. A stateless packet must find the backend its
             * connection's first packet found: the weighted hash follows the
             * load reports (the controller rewrites its weights several times
             * a second), the pair table only the set of eligible backends. */
            hdr.choice.first = NO_BACKEND;
            hdr.choice.second = NO_BACKEND;
            hdr.choice.pair_slot = meta.fingerprint[23:16] & hdr.choice.pair_mask;
            p2c_pairs.apply();
            /* The weighted hash: the mode or P2C's fallback for a new
             * connection; the stateless answer only without a pair table. */
            hdr.choice.pool_backend = NO_BACKEND;
            if (meta.pin_state == PIN_NEW || hdr.choice.first == NO_BACKEND) {
                service_pool.apply();
            }

            if (meta.pin_state == PIN_STATELESS) {
                /* Whatever the backend's state: a connection already there
                 * would be reset anywhere else. */
                meta.backend_id = hdr.choice.first;
                if (hdr.choice.first == NO_BACKEND) {
                    meta.backend_id = hdr.choice.pool_backend;
                }
                if (meta.backend_id == NO_BACKEND) {
                    meta.drop_reason = DROP_NO_BACKEND;
                }
            } else {
                /* A new connection. */
                if (IS(F_OVERFLOW)) {
                    meta.backend_id = hdr.choice.overflow_backend;
                } else {
                    /* By the pair (into backend_id): the eligible one of lower load,
                     * the first on a tie. */
                    meta.backend_id = NO_BACKEND;
                    if (hdr.choice.first < MAX_BACKENDS) {
                        backend_flags.read(hdr.choice.flags, hdr.choice.first);
                        backend_seen.read(hdr.choice.seen, hdr.choice.first);
                        if (ELIGIBLE) {
                            backend_load.read(hdr.choice.load, hdr.choice.first);
                            backend_pending.read(hdr.choice.pending, hdr.choice.first);
                            meta.backend_id = hdr.choice.first;
                            hdr.choice.by_pair_load = hdr.choice.load
                                                    + hdr.choice.pending * hdr.choice.conn_cost;
                        }
                    }
                    if (hdr.choice.second < MAX_BACKENDS) {
                        backend_flags.read(hdr.choice.flags, hdr.choice.second);
                        backend_seen.read(hdr.choice.seen, hdr.choice.second);
                        if (ELIGIBLE) {
                            backend_load.read(hdr.choice.load, hdr.choice.second);
                            backend_pending.read(hdr.choice.pending, hdr.choice.second);
                            if (meta.backend_id == NO_BACKEND
                                    || hdr.choice.load + hdr.choice.pending * hdr.choice.conn_cost
                                       < hdr.choice.by_pair_load) {
                                meta.backend_id = hdr.choice.second;
                                /* the pair's best score: prefix affinity's reference */
                                hdr.choice.by_pair_load = hdr.choice.load
                                                        + hdr.choice.pending * hdr.choice.conn_cost;
                            }
                        }
                    }

                    /* The weighted hash's choice: flags and seen of the pool's backend. */
                    hdr.choice.flags = BEACON_FLAG_DOWN;
                    if (hdr.choice.pool_backend < MAX_BACKENDS) {
                        backend_flags.read(hdr.choice.flags, hdr.choice.pool_backend);
                        backend_seen.read(hdr.choice.seen, hdr.choice.pool_backend);
                    }
                    if (hdr.choice.mode == MODE_P2C) {
                        if (meta.backend_id == NO_BACKEND && ELIGIBLE) {
                            meta.backend_id = hdr.choice.pool_backend;
                            SET(F_FALLBACK);
                        }
                    } else if (ELIGIBLE) {
                        meta.backend_id = hdr.choice.pool_backend;
                    } else {
                        SET(F_FALLBACK);  /* the pair's choice stands */
                    }

                    /* Prefix affinity, bounded by load: a new connection whose
                     * client has an entry goes to its backend while that backend
                     * is eligible and its score is within bound_percent of the
                     * pair's best score plus one connection's cost (an idle pool
                     * must not refuse it); else the mode's choice stands. */
                    /* (a switch on the action, not `.hit &&`: p4c would add
                     * metadata temporaries that every packet pays to zero) */
                    switch (affinity.apply().action_run) {
                        steer_affinity: {
                            if (hdr.choice.affinity < MAX_BACKENDS) {
                                backend_flags.read(hdr.choice.flags, hdr.choice.affinity);
                                backend_seen.read(hdr.choice.seen, hdr.choice.affinity);
                                backend_load.read(hdr.choice.load, hdr.choice.affinity);
                                backend_pending.read(hdr.choice.pending, hdr.choice.affinity);
                                if (ELIGIBLE && (hdr.choice.load
                                                 + hdr.choice.pending * hdr.choice.conn_cost)
                                                * AFFINITY_BOUND_ONE
                                        <= hdr.choice.by_pair_load * hdr.choice.affinity_bound
                                           + hdr.choice.conn_cost * AFFINITY_BOUND_ONE) {
                                    meta.backend_id = hdr.choice.affinity;
                                    events.count(EVENT_AFFINITY);
                                } else {
                                    events.count(EVENT_AFFINITY_OVER_BOUND);
                                }
                            }
                        }
                    }
                }

                /* Only a backend the per-backend registers and counters cover
                 * is pinned (the controller numbers them below MAX_BACKENDS). */
                if (meta.backend_id < MAX_BACKENDS) {
                    conn_backend.write(meta.conn_index, meta.backend_id);
                    backend_pending.read(hdr.choice.pending, meta.backend_id);
                    hdr.choice.pending = hdr.choice.pending + 1;
                    backend_pending.write(meta.backend_id, hdr.choice.pending);
                } else {
                    meta.drop_reason = DROP_NO_BACKEND;
                    /* Free the slot: the connection's next packet chooses anew. */
                    conn_fingerprint.write(meta.conn_index, 0);
                }
            }
        }
    }
#undef ELIGIBLE
}

#endif
