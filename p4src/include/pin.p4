/* Pin: the connection table. Registers indexed by a 5-tuple hash hold a
 * fingerprint (to tell colliding connections apart) and a last-seen time (for
 * the idle timeout); the select control keeps the chosen backend beside them.
 * A pinned connection keeps its backend whatever the weights, pool or mode do. */
#ifndef TF_PIN_P4
#define TF_PIN_P4

control Pin(inout headers_t hdr,
            inout local_metadata_t meta,
            inout standard_metadata_t standard_metadata) {

    /* 0 = free slot; a stored fingerprint always has bit 0 set. */
    @name(".conn_fingerprint")
    register<bit<32>>(CONN_SLOTS) conn_fingerprint;
    @name(".conn_last_seen")
    register<bit<48>>(CONN_SLOTS) conn_last_seen;

    apply {
        /* BMv2 pays for every assignment and condition: this is the path of
         * every packet of an established connection, so it is kept short.
         * One hash: its low bits index the slot; its high bits and the client
         * port xor address low bits fingerprint the connection in that slot. */
        if (meta.service_hit == 1) {
            hash(meta.flow_hash, HashAlgorithm.crc32, 32w0,
                 { hdr.ipv4.src_addr, hdr.ipv4.dst_addr, hdr.ipv4.protocol,
                   meta.l4_src_port, meta.l4_dst_port },
                 64w0x100000000);
            meta.conn_index = meta.flow_hash & (CONN_SLOTS - 1);
            meta.fingerprint = (meta.flow_hash & 0xFFFF0000)
                               | (bit<32>)(meta.l4_src_port ^ hdr.ipv4.src_addr[15:0]) | 1;

            bit<32> stored;
            bit<48> seen;
            conn_fingerprint.read(stored, meta.conn_index);
            conn_last_seen.read(seen, meta.conn_index);
            bit<48> now = standard_metadata.ingress_global_timestamp;

            /* A stored fingerprint has bit 0 set, so a match means a live slot
             * unless it idled out. */
            if (stored == meta.fingerprint && (meta.idle_timeout_us == 0
                    || now - seen <= (bit<48>)meta.idle_timeout_us)) {
                meta.pin_state = PIN_HIT;
                if (ENDS_FLOW) {
                    conn_fingerprint.write(meta.conn_index, 0);
                } else {
                    conn_last_seen.write(meta.conn_index, now);
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
