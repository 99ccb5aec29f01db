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

    /* Micro-tokens biased by BUCKET_ZERO (defines.p4); 0 in bucket_stamp means
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

    apply {
        /* Only USAGE beacons and new connections touch a bucket: one test on
         * the path of every other packet. */
        if (hdr.beacon_usage.isValid() || meta.pin_state == PIN_NEW) {
            bool usage = hdr.beacon_usage.isValid() && meta.beacon_ok == 1
                         && meta.drop_reason == DROP_NONE;
            if (usage) {
                meta.tenant_id = (bit<32>)hdr.beacon_usage.tenant_id;
            }
            if ((usage || (meta.pin_state == PIN_NEW && meta.tenant_id != 0))
                    && tenant_contract.apply().hit) {
                bit<64> level;
                bit<48> stamp;
                bucket_level.read(level, meta.tenant_id);
                bucket_stamp.read(stamp, meta.tenant_id);
                bit<48> now = standard_metadata.ingress_global_timestamp;
                if (stamp == 0) {
                    level = meta.contract_full;
                } else {
                    bit<48> elapsed = now - stamp;
                    if (elapsed > MAX_REFILL_US) {
                        elapsed = MAX_REFILL_US;
                    }
                    /* elapsed (us) * rate (tokens/s) = micro-tokens; < 2^64 by the caps. */
                    bit<64> refill = (bit<64>)elapsed * meta.contract_rate;
                    if (level >= meta.contract_full
                            || refill >= meta.contract_full - level) {
                        level = meta.contract_full;
                    } else {
                        level = level + refill;
                    }
                }

                if (usage) {
                    bit<64> used = ((bit<64>)hdr.beacon_usage.prompt_tokens
                                    + (bit<64>)hdr.beacon_usage.completion_tokens) * MICRO;
                    if (level > used) {
                        level = level - used;
                    } else {
                        level = 0;
                    }
                } else if (level < BUCKET_ZERO + MICRO) {
                    meta.overflow = 1;
                }
                bucket_level.write(meta.tenant_id, level);
                bucket_stamp.write(meta.tenant_id, now == 0 ? 48w1 : now);
            }
        }
    }
}

#endif
