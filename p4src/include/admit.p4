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
        meta.contract_rate = (bit<64>)tokens_per_s;
        meta.contract_full = BUCKET_ZERO + (bit<64>)burst_tokens * MICRO;
    }

    /* A tenant without an entry is not rate limited. */
    @name(".tenant_contract")
    table tenant_contract {
        key = { meta.tenant_id: exact @name("tenant_id"); }
        actions = { set_contract; @defaultonly NoAction; }
        const default_action = NoAction();
        size = MAX_TENANTS;
    }

    /* BMv2 zeroes every metadata field and temporary of the program for every
     * packet, so this path keeps to two variables and no bool temporaries:
     * the USAGE test is a macro, evaluated where it is needed. */
#define USAGE_OK (hdr.beacon_usage.isValid() && IS(F_BEACON_OK) \
                  && meta.drop_reason == DROP_NONE)
    apply {
        /* Only USAGE beacons and new connections touch a bucket: one test on
         * the path of every other packet. */
        if (hdr.beacon_usage.isValid() || meta.pin_state == PIN_NEW) {
            if (USAGE_OK) {
                meta.tenant_id = (bit<32>)hdr.beacon_usage.tenant_id;
            }
            if (USAGE_OK || (meta.pin_state == PIN_NEW && meta.tenant_id != 0)) {
                if (tenant_contract.apply().hit) {
                    bit<64> level;
                    bit<48> elapsed;
                    bucket_level.read(level, meta.tenant_id);
                    bucket_stamp.read(elapsed, meta.tenant_id);
                    if (level == BUCKET_NEVER_SEEN) {
                        level = meta.contract_full;
                    } else {
                        elapsed = standard_metadata.ingress_global_timestamp - elapsed;
                        if (elapsed > MAX_REFILL_US) {
                            elapsed = MAX_REFILL_US;
                        }
                        /* elapsed (us) * rate (tokens/s) = micro-tokens; < 2^64 by the caps. */
                        if (level >= meta.contract_full || (bit<64>)elapsed * meta.contract_rate
                                                           >= meta.contract_full - level) {
                            level = meta.contract_full;
                        } else {
                            level = level + (bit<64>)elapsed * meta.contract_rate;
                        }
                    }

                    if (USAGE_OK) {
                        if (level > BUCKET_FLOOR + USAGE_MICRO) {
                            level = level - USAGE_MICRO;
                        } else {
                            level = BUCKET_FLOOR;
                        }
                    } else if (level < BUCKET_ZERO + MICRO) {
                        SET(F_OVERFLOW);
                    }
                    bucket_level.write(meta.tenant_id, level);
                    bucket_stamp.write(meta.tenant_id, standard_metadata.ingress_global_timestamp);
                }
            }
        }
    }
#undef USAGE_OK
}

#endif
