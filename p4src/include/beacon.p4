/* Beacon: what the host agents tell their edge switch (tokenfabric/beacon.py),
 * and the beacon plane that carries it to every switch that needs it.
 * Ingress applies this to beacons alone: each counts only from the port and
 * address registered for its backend (beacon_source). A LOAD beacon is stored
 * in the backend's registers (Select reads them); a USAGE beacon names the
 * tenant whose bucket Admit debits (the tenant's contract is Admit's table,
 * and a table has one place in the program).
 *
 * The beacon plane (docs/fabric.md, "The beacon plane"): the backend's own
 * switch accepts a beacon from the backend's port and address and relays it
 * (relay_beacon) to a multicast group the controller built (one per port set):
 * the fabric ports of a tree that reaches every switch selecting for the
 * backend's services. The relayed copy carries the backend switch's fabric_ip
 * as its source, and another switch accepts it only on the fabric port facing
 * that tree and with that source, by an entry of the same table: a host cannot
 * forge one (its port is no fabric port), and a switch in the middle of the
 * tree relays it on unchanged. Every switch stores what it accepts with its
 * own receive time, so a beacon's age is measured where it is read. */
#ifndef TF_BEACON_P4
#define TF_BEACON_P4

control Beacon(inout headers_t hdr,
               inout local_metadata_t meta,
               inout standard_metadata_t standard_metadata) {

    @name(".accept_beacon")
    action accept_beacon() {
        meta.backend_id = (bit<32>)hdr.beacon.backend_id;  /* the registers' index */
    }

    /* Accept and send on to the PRE group `group` (the fabric ports of the
     * backend's tree on this switch), sourced from `relay_src`: the fabric_ip
     * of the backend's own switch (it rewrites the backend's address; a switch
     * further down the tree writes the same value). The UDP checksum would
     * cover the rewritten address: 0 says there is none (IPv4 allows it). */
    @name(".relay_beacon")
    action relay_beacon(bit<16> group, ipv4_t relay_src) {
        meta.backend_id = (bit<32>)hdr.beacon.backend_id;
        standard_metadata.mcast_grp = group;
        hdr.ipv4.src_addr = relay_src;
        hdr.udp.checksum = 0;
    }

    @name(".reject_beacon")
    action reject_beacon() {
        meta.drop_reason = DROP_BEACON_UNAUTHORIZED;
    }

    /* (backend, port, source): a backend's own port and address on its switch;
     * elsewhere the fabric port towards the backend's switch and its fabric_ip. */
    @name(".beacon_source")
    table beacon_source {
        key = {
            hdr.beacon.backend_id: exact @name("backend_id");
            standard_metadata.ingress_port: exact @name("ingress_port");
            hdr.ipv4.src_addr: exact @name("src_addr");
        }
        actions = { accept_beacon; relay_beacon; @defaultonly reject_beacon; }
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
            if (standard_metadata.mcast_grp == 0) {
                mark_to_drop(standard_metadata);  /* consumed: forwarded nowhere */
            } else {
                events.count(EVENT_BEACON_RELAYED);  /* the PRE copies it to the group */
            }
        }
    }
}

#endif
