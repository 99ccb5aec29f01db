/* Pin: whether a packet is to a service VIP:port, and the connection table
 * for those that are. Registers indexed by a 5-tuple hash hold a
 * fingerprint (to tell colliding connections apart), a last-seen time (for
 * the idle timeout) and the backend Select chose.
 * A pinned connection keeps its backend whatever the weights, pool or mode do. */
#ifndef TF_PIN_P4
#define TF_PIN_P4

control Pin(inout headers_t hdr,
            inout local_metadata_t meta,
            inout standard_metadata_t standard_metadata) {

    bit<32> stored;  /* the slot's fingerprint (FP_CLOSING: after a FIN) */
    bit<48> seen;    /* and when it last saw its connection */
    bit<48> now;

    /* A service packet's slot, in the vip entry's action: BMv2 pays for every
     * action, condition and assignment, and this is the path of every packet
     * of an established connection. Two hashes of the 5-tuple, straight into
     * the fields that use them (an index computed from another field would
     * cost p4c's copies): crc16 picks the slot, crc32 offset by the protocol
     * (so never a free slot's 0, and TCP and UDP apart) fingerprints the
     * connection in it. */
    @name(".set_vip")
    action set_vip(bit<32> idle_timeout_us) {
        meta.idle_timeout_us = idle_timeout_us;
        hash(meta.conn_index, HashAlgorithm.crc16, 32w0, hdr.flow, (bit<64>)CONN_SLOTS);
        hash(meta.fingerprint, HashAlgorithm.crc32, hdr.ipv4.protocol, hdr.flow,
             (bit<64>)FINGERPRINT_RANGE);
        conn_fingerprint.read(stored, meta.conn_index);
        conn_last_seen.read(seen, meta.conn_index);
    }

    /* One entry per served model: VIP, IP protocol, port. Only what every
     * packet needs (the pin's idle timeout); how a new connection chooses its
     * backend is the service table's, which Select applies for those alone. */
    @name(".vip")
    table vip {
        key = {
            hdr.ipv4.dst_addr: exact @name("vip");
            hdr.ipv4.protocol: exact @name("protocol");
            hdr.flow.dst_port: exact @name("port");
        }
        actions = { set_vip; @defaultonly NoAction; }
        const default_action = NoAction();
        size = MAX_SERVICES;
    }

    /* A slot that is live for this packet: open and not idled out, or closing
     * (after a FIN; last seen is then the FIN's time, never refreshed) and
     * within the close grace as well. */
#define OPEN_LIVE (meta.idle_timeout_us == 0 || now - seen <= (bit<48>)meta.idle_timeout_us)
#define CLOSING_LIVE (now - seen <= CLOSE_GRACE_US && OPEN_LIVE)
/* A slot a new connection may claim: free, idled out, or closing past its grace. */
#define CLAIMABLE (stored == 0 || !OPEN_LIVE \
                   || ((stored & FP_CLOSING) != 0 && now - seen > CLOSE_GRACE_US))

    /* A pinned packet of an open slot (meta.conn_index): refreshed; a FIN starts
     * the slot's close grace (this write of last seen is its start), an RST
     * frees it. Either counts the pin's end, once. (A macro: an action would be
     * a P4Info entry, and an action's conditions cost BMv2 more. The closing
     * mark goes through meta.fingerprint, which no later stage of a pinned
     * packet reads: an expression as the write's argument is a temporary p4c
     * adds, which every packet pays to zero.) */
#define PINNED_OPEN                                                              \
    meta.pin_state = PIN_HIT;                                                    \
    conn_last_seen.write(meta.conn_index, now);                                  \
    conn_backend.read(meta.backend_id, meta.conn_index);                         \
    if (ENDS_FLOW) {                                                             \
        if ((hdr.tcp.flags & TCP_RST) != 0) {                                    \
            conn_fingerprint.write(meta.conn_index, 0);                          \
        } else {                                                                 \
            meta.fingerprint = meta.fingerprint | FP_CLOSING;                    \
            conn_fingerprint.write(meta.conn_index, meta.fingerprint);           \
        }                                                                        \
        events.count(EVENT_PIN_CLEARED);                                         \
    }

    /* A packet of a closing-live slot (meta.conn_index): its connection's last
     * packets (ACKs, the other FIN) stay pinned, last seen left at the FIN's
     * time so that the grace runs out; an RST frees the slot; a SYN of the same
     * 5-tuple opens it anew. (A macro in both ways' branches: a bit saying which
     * would be a variable every packet pays to zero.) */
#define PINNED_CLOSING                                                           \
    if (OPENS_FLOW) {                                                            \
        meta.pin_state = PIN_NEW;                                                \
    } else {                                                                     \
        meta.pin_state = PIN_HIT;                                                \
        conn_backend.read(meta.backend_id, meta.conn_index);                     \
        if ((hdr.tcp.flags & TCP_RST) != 0) {                                    \
            conn_fingerprint.write(meta.conn_index, 0);                          \
        }                                                                        \
    }

    apply {
        /* TCP and UDP only (a tunnel Decap ended has no flow header: it goes
         * to the backend it names). */
        if (hdr.flow.isValid()) {
            if (vip.apply().hit) {
                now = standard_metadata.ingress_global_timestamp;
                /* A stored fingerprint is never 0, so a match means a live slot
                 * unless it idled out. A slot is only ever live with a backend:
                 * Select frees the slot of a new connection it finds none for.
                 * The common path (pinned in the first way, open) is tested
                 * first and pays nothing for the second way or the grace. */
                if (stored == meta.fingerprint && OPEN_LIVE) {
                    PINNED_OPEN
                } else {
                    /* Whether the first way may be claimed, kept in pin_state
                     * (PIN_NEW: yes) while stored and seen move on to the
                     * second way: no metadata field more for every packet. */
                    meta.pin_state = PIN_STATELESS;
                    if (CLAIMABLE) {
                        meta.pin_state = PIN_NEW;
                    }
                    /* The first way closing with this connection: stay there. */
                    if (stored != (meta.fingerprint | FP_CLOSING) || !CLOSING_LIVE) {
                        /* conn_index moves on to the second way, by a hash into
                         * the field: a variable is one more scalar that BMv2
                         * zeroes for every packet, and an assignment p4c would
                         * propagate, a temporary per use. (The hash's input, a
                         * metadata field, is copied into p4c's one temporary
                         * here; a slice of it would be too.) */
                        hash(meta.conn_index, HashAlgorithm.identity, 32w0,
                             { meta.fingerprint }, (bit<64>)CONN_SLOTS);
                        conn_fingerprint.read(stored, meta.conn_index);
                        conn_last_seen.read(seen, meta.conn_index);
                        if (stored == meta.fingerprint && OPEN_LIVE) {
                            PINNED_OPEN
                        } else if (stored == (meta.fingerprint | FP_CLOSING) && CLOSING_LIVE) {
                            PINNED_CLOSING
                        } else if (OPENS_FLOW && meta.pin_state == PIN_NEW) {
                            /* claims the first way (below): its index again */
                            hash(meta.conn_index, HashAlgorithm.crc16, 32w0, hdr.flow,
                                 (bit<64>)CONN_SLOTS);
                        } else if (OPENS_FLOW && CLAIMABLE) {
                            meta.pin_state = PIN_NEW;
                        } else {
                            /* Both ways live with other connections (a new flow's
                             * collision, counted), or a mid-connection packet
                             * whose pin is gone: Select's stateless choice (one
                             * that weight rewrites do not move). */
                            meta.pin_state = PIN_STATELESS;
                        }
                    } else {
                        PINNED_CLOSING
                    }
                    if (meta.pin_state == PIN_NEW) {
                        conn_fingerprint.write(meta.conn_index, meta.fingerprint);
                        conn_last_seen.write(meta.conn_index, now);
                    }
                }
            }
        }
    }
#undef OPEN_LIVE
#undef CLOSING_LIVE
#undef CLAIMABLE
#undef PINNED_OPEN
#undef PINNED_CLOSING
}

#endif
