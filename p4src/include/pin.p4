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

    bit<32> stored;  /* the slot's fingerprint */
    bit<48> seen;    /* and when it last saw its connection */

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

    apply {
        /* TCP and UDP only (a tunnel Decap ended has no flow header: it goes
         * to the backend it names). */
        if (hdr.flow.isValid()) {
            if (vip.apply().hit) {
                bit<48> now = standard_metadata.ingress_global_timestamp;
                /* A stored fingerprint is never 0, so a match means a live slot
                 * unless it idled out. A slot is only ever live with a backend:
                 * Select frees the slot of a new connection it finds none for. */
                if (stored == meta.fingerprint && (meta.idle_timeout_us == 0
                        || now - seen <= (bit<48>)meta.idle_timeout_us)) {
                    meta.pin_state = PIN_HIT;
                    conn_last_seen.write(meta.conn_index, now);
                    conn_backend.read(meta.backend_id, meta.conn_index);
                    if (ENDS_FLOW) {
                        conn_fingerprint.write(meta.conn_index, 0);
                        events.count(EVENT_PIN_CLEARED);
                    }
                } else if (OPENS_FLOW && (stored == 0 || (meta.idle_timeout_us != 0
                        && now - seen > (bit<48>)meta.idle_timeout_us))) {
                    meta.pin_state = PIN_NEW;
                    conn_fingerprint.write(meta.conn_index, meta.fingerprint);
                    conn_last_seen.write(meta.conn_index, now);
                } else {
                    /* A collision with a live connection, or a mid-connection
                     * packet whose pin is gone: the stateless choice of the
                     * weighted hash. */
                    meta.pin_state = PIN_STATELESS;
                }
            }
        }
    }
}

#endif
