/* Pin: the connection table. Registers indexed by a 5-tuple hash hold a
 * fingerprint (to tell colliding connections apart), a last-seen time (for
 * the idle timeout) and the backend Select chose.
 * A pinned connection keeps its backend whatever the weights, pool or mode do. */
#ifndef TF_PIN_P4
#define TF_PIN_P4

control Pin(inout headers_t hdr,
            inout local_metadata_t meta,
            inout standard_metadata_t standard_metadata) {

    apply {
        /* BMv2 pays for every assignment, condition and action: this is the
         * path of every packet of an established connection, so it is kept
         * short. Two hashes of the 5-tuple, straight into the fields that use
         * them (an index computed from another field would cost p4c's copies):
         * crc16 picks the slot, crc32 offset by the protocol (so never a free
         * slot's 0, and TCP and UDP apart) fingerprints the connection in it. */
        if (IS(F_SERVICE)) {
            hash(meta.conn_index, HashAlgorithm.crc16, 32w0, hdr.flow, (bit<64>)CONN_SLOTS);
            hash(meta.fingerprint, HashAlgorithm.crc32, hdr.ipv4.protocol, hdr.flow,
                 (bit<64>)FINGERPRINT_RANGE);

            bit<32> stored;
            bit<48> seen;
            conn_fingerprint.read(stored, meta.conn_index);
            conn_last_seen.read(seen, meta.conn_index);
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
                /* A collision with a live connection, or a mid-connection packet
                 * whose pin is gone: the stateless choice of the weighted hash. */
                meta.pin_state = PIN_STATELESS;
            }
        }
    }
}

#endif
