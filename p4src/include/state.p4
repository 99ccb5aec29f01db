/* Externs more than one control uses, so declared at the top level. */
#ifndef TF_STATE_P4
#define TF_STATE_P4

/* The connection table, shared by Pin (which finds and refreshes a slot) and
 * Select (which fills a new connection's slot). A fingerprint of 0
 * marks a free slot. */
@name(".conn_fingerprint")
register<bit<32>>(CONN_SLOTS) conn_fingerprint;
@name(".conn_last_seen")
register<bit<48>>(CONN_SLOTS) conn_last_seen;
@name(".conn_backend")
register<bit<32>>(CONN_SLOTS) conn_backend;

/* Each backend's last LOAD beacon, written by Beacon and read by Select
 * (which also counts the connections it sends there since). */
@name(".backend_load")
register<bit<32>>(MAX_BACKENDS) backend_load;        /* load of the last beacon */
@name(".backend_pending")
register<bit<32>>(MAX_BACKENDS) backend_pending;     /* connections since then */
@name(".backend_seen")
register<bit<48>>(MAX_BACKENDS) backend_seen;        /* time of the last beacon */
@name(".backend_flags")
register<bit<8>>(MAX_BACKENDS) backend_flags;        /* DOWN, DRAINING */

/* Events (defines.p4 EVENT_*), counted where they happen. */
@name(".events")
counter(NUM_EVENTS, CounterType.packets) events;

#endif
