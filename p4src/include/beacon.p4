/* Beacon: what the host agents tell their edge switch (tokenfabric/beacon.py).
 * Ingress applies this to beacons alone, and consumes them here: each counts
 * only from the port and address registered for its backend (beacon_source).
 * A LOAD beacon is stored in the backend's registers (Select reads them); a
 * USAGE beacon names the tenant whose bucket Admit debits (the tenant's
 * contract is Admit's table, and a table has one place in the program). */
#ifndef TF_BEACON_P4
#define TF_BEACON_P4

control Beacon(inout headers_t hdr,
               inout local_metadata_t meta,
               inout standard_metadata_t standard_metadata) {

    @name(".accept_beacon")
    action accept_beacon() {
        meta.backend_id = (bit<32>)hdr.beacon.backend_id;  /* the registers' index */
    }

    @name(".reject_beacon")
    action reject_beacon() {
        meta.drop_reason = DROP_BEACON_UNAUTHORIZED;
    }

    @name(".beacon_source")
    table beacon_source {
        key = {
            hdr.beacon.backend_id: exact @name("backend_id");
            standard_metadata.ingress_port: exact @name("ingress_port");
            hdr.ipv4.src_addr: exact @name("src_addr");
        }
        actions = { accept_beacon; @defaultonly reject_beacon; }
        const default_action = reject_beacon();
        size = BEACON_SOURCES;
    }

    apply {
        SET(F_CONSUMED);
        if (hdr.beacon_load.isValid() && hdr.beacon.backend_id >= MAX_BACKENDS) {
            meta.drop_reason = DROP_BEACON_BAD_ID;
        } else if (hdr.beacon_usage.isValid() && hdr.beacon_usage.tenant_id >= MAX_TENANTS) {
            meta.drop_reason = DROP_BEACON_BAD_ID;
        } else if (beacon_source.apply().hit) {
            if (hdr.beacon_load.isValid()) {
                /* A beacon at time 0 would read as never seen; the switch is
                 * configured long after. */
                backend_load.write(meta.backend_id, hdr.beacon_load.load);
                backend_pending.write(meta.backend_id, 0);
                backend_seen.write(meta.backend_id, standard_metadata.ingress_global_timestamp);
                backend_flags.write(meta.backend_id, hdr.beacon.flags);
                events.count(EVENT_BEACON_LOAD);
            } else {
                meta.tenant_id = (bit<32>)hdr.beacon_usage.tenant_id;
                SET(F_USAGE);
                events.count(EVENT_BEACON_USAGE);
            }
            mark_to_drop(standard_metadata);  /* consumed: forwarded nowhere */
        }
    }
}

#endif
