/* Admit: a token bucket per tenant. The contract (rate, burst) is action data
 * of the tenant's tenant_contract entry; the level lives in registers, refilled
 * lazily from the elapsed time and debited by USAGE beacons. A tenant whose
 * bucket holds less than one token has its new connections steered to the
 * service's overflow responder. */
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
        hdr.slow.contract_rate = (bit<64>)tokens_per_s;
        hdr.slow.contract_full = BUCKET_ZERO + (bit<64>)burst_tokens * MICRO;
    }

    /* A tenant without an entry is not rate limited. */
    @name(".tenant_contract")
    table tenant_contract {
        key = { meta.tenant_id: exact @name("tenant_id"); }
        actions = { set_contract; @defaultonly NoAction; }
        const default_action = NoAction();
        size = MAX_TENANTS;
    }

    /* The bucket's arithmetic works in hdr.slow (no metadata, no bool
     * temporaries: BMv2 zeroes those for every packet); the USAGE test is a
     * macro, evaluated where it is needed. */
#define USAGE_OK (hdr.beacon_usage.isValid() && IS(F_BEACON_OK) \
                  && meta.drop_reason == DROP_NONE)
#define REFILL ((bit<64>)hdr.slow.elapsed * hdr.slow.contract_rate)
    apply {
        /* Only USAGE beacons and new connections touch a bucket: one test on
         * the path of every other packet. */
        if (hdr.beacon_usage.isValid() || meta.pin_state == PIN_NEW) {
            hdr.slow.setValid();
            if (USAGE_OK) {
                meta.tenant_id = (bit<32>)hdr.beacon_usage.tenant_id;
            }
            if (USAGE_OK || (meta.pin_state == PIN_NEW && meta.tenant_id != 0)) {
                if (tenant_contract.apply().hit) {
                    bucket_level.read(hdr.slow.level, meta.tenant_id);
                    bucket_stamp.read(hdr.slow.elapsed, meta.tenant_id);
                    if (hdr.slow.level == BUCKET_NEVER_SEEN) {
                        hdr.slow.level = hdr.slow.contract_full;
                    } else {
                        /* elapsed (us, capped) * rate (tokens/s) = micro-tokens (< 2^64) */
                        hdr.slow.elapsed = standard_metadata.ingress_global_timestamp
                                           - hdr.slow.elapsed;
                        if (hdr.slow.elapsed > MAX_REFILL_US) {
                            hdr.slow.elapsed = MAX_REFILL_US;
                        }
                        if (hdr.slow.level >= hdr.slow.contract_full
                                || REFILL >= hdr.slow.contract_full - hdr.slow.level) {
                            hdr.slow.level = hdr.slow.contract_full;
                        } else {
                            hdr.slow.level = hdr.slow.level + REFILL;
                        }
                    }

                    if (USAGE_OK) {
                        if (hdr.slow.level > BUCKET_FLOOR + USAGE_MICRO) {
                            hdr.slow.level = hdr.slow.level - USAGE_MICRO;
                        } else {
                            hdr.slow.level = BUCKET_FLOOR;
                        }
                    } else if (hdr.slow.level < BUCKET_ZERO + MICRO) {
                        SET(F_OVERFLOW);
                    }
                    bucket_level.write(meta.tenant_id, hdr.slow.level);
                    bucket_stamp.write(meta.tenant_id, standard_metadata.ingress_global_timestamp);
                }
            }
        }
    }
#undef REFILL
#undef USAGE_OK
}

#endif
