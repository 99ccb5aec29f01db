/* Admit: a token bucket per tenant. The contract (rate, burst) is action data
 * of the tenant's tenant_contract entry; the level lives in registers, refilled
 * lazily from the elapsed time. A new connection of a tenant whose bucket
 * holds less than one token is marked for the service's overflow responder; a
 * USAGE beacon that Beacon accepted debits its tenant's bucket. */
#ifndef TF_ADMIT_P4
#define TF_ADMIT_P4

control Admit(inout headers_t hdr,
              inout local_metadata_t meta,
              inout standard_metadata_t standard_metadata) {

    /* Micro-tokens biased by BUCKET_ZERO (defines.p4); a level of 0 means
     * never seen, which starts the tenant with a full bucket. */
    @name(".bucket_level")
    register<bit<64>>(MAX_TENANTS) bucket_level;
    @name(".bucket_stamp")
    register<bit<48>>(MAX_TENANTS) bucket_stamp;

    @name(".set_contract")
    action set_contract(bit<32> tokens_per_s, bit<32> burst_tokens) {
        hdr.bucket.contract_rate = (bit<64>)tokens_per_s;
        hdr.bucket.contract_full = BUCKET_ZERO + (bit<64>)burst_tokens * MICRO;
    }

    /* A tenant without an entry is not rate limited. */
    @name(".tenant_contract")
    table tenant_contract {
        key = { meta.tenant_id: exact @name("tenant_id"); }
        actions = { set_contract; @defaultonly NoAction; }
        const default_action = NoAction();
        size = MAX_TENANTS;
    }

    /* The bucket's arithmetic works in hdr.bucket, this control's own scratch
     * header (no metadata, no temporaries: BMv2 zeroes those for every packet). */
#define REFILL ((bit<64>)hdr.bucket.elapsed * hdr.bucket.contract_rate)
    apply {
        /* Only accepted USAGE beacons and new connections of a tenant touch a
         * bucket: one test on the path of every other packet. */
        if (IS(F_USAGE) || (meta.pin_state == PIN_NEW && meta.tenant_id != 0)) {
            hdr.bucket.setValid();
            if (tenant_contract.apply().hit) {
                bucket_level.read(hdr.bucket.level, meta.tenant_id);
                bucket_stamp.read(hdr.bucket.elapsed, meta.tenant_id);
                if (hdr.bucket.level == BUCKET_NEVER_SEEN) {
                    hdr.bucket.level = hdr.bucket.contract_full;
                } else {
                    /* elapsed (us, capped) * rate (tokens/s) = micro-tokens (< 2^64) */
                    hdr.bucket.elapsed = standard_metadata.ingress_global_timestamp
                                         - hdr.bucket.elapsed;
                    if (hdr.bucket.elapsed > MAX_REFILL_US) {
                        hdr.bucket.elapsed = MAX_REFILL_US;
                    }
                    if (hdr.bucket.level >= hdr.bucket.contract_full
                            || REFILL >= hdr.bucket.contract_full - hdr.bucket.level) {
                        hdr.bucket.level = hdr.bucket.contract_full;
                    } else {
                        hdr.bucket.level = hdr.bucket.level + REFILL;
                    }
                }

                if (IS(F_USAGE)) {
                    if (hdr.bucket.level > BUCKET_FLOOR + USAGE_MICRO) {
                        hdr.bucket.level = hdr.bucket.level - USAGE_MICRO;
                    } else {
                        hdr.bucket.level = BUCKET_FLOOR;
                    }
                } else if (hdr.bucket.level < BUCKET_ZERO + MICRO) {
                    SET(F_OVERFLOW);
                }
                bucket_level.write(meta.tenant_id, hdr.bucket.level);
                bucket_stamp.write(meta.tenant_id, standard_metadata.ingress_global_timestamp);
            }
        }
    }
#undef REFILL
}

#endif
