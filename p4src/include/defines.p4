/* Sizes, constants and the ids shared with the controller (docs/dataplane.md). */
#ifndef TF_DEFINES_P4
#define TF_DEFINES_P4

/* Register and counter sizes: room for 4096 tenants, 1024 backends, 256
 * services (ids are below these) and 65536 pinned connections. */
#define MAX_TENANTS 4096
#define MAX_BACKENDS 1024
#define MAX_SERVICES 256
#define CONN_SLOTS 65536
#define FINGERPRINT_RANGE 0x7FFFFF00  /* protocol + this stays below 2^31 */
/* The connection table is two-way: a connection's first slot is its crc16 (its
 * conn_index), its second the low 16 bits of its fingerprint (no second hash).
 * A FIN marks a pinned slot closing (its fingerprint's top bit, free since the
 * range stays below 2^31): its connection's last packets stay pinned for the
 * close grace (or the idle timeout if shorter), without refreshing it; an RST
 * frees it at once. */
#define CONN_SLOT_MASK 0xFFFF         /* CONN_SLOTS - 1 */
const bit<32> FP_CLOSING = 0x80000000;
const bit<48> CLOSE_GRACE_US = 2000000;
#define NUM_CLASSES 8

/* Table sizes beyond those (entries, not ids). */
#define TENANT_PREFIXES 8192    /* tenant_by_src, tenant_by_dst */
#define DSCP_VALUES 64          /* dscp_class: every 6-bit DSCP */
#define ROCE_CLASSES 2          /* roce_class: data and CNP */
#define BEACON_SOURCES 2048     /* beacon_source: (backend, port, address) */
#define PAIR_SLOTS 16384        /* p2c_pairs: up to 256 slots of a service */
#define ROUTES 4096             /* ipv4_route */
#define METER_POLICIES 8192     /* meter_policy: a yellow and a red per tenant */
#define SELECTOR_MEMBERS 4096   /* backend_selector: members of all groups */
#define SELECTOR_HASH_BITS 16
#define AFFINITY_ENTRIES 4096   /* affinity: learned (service, client address) -> backend */

/* The fabric beacon (tokenfabric/beacon.py): UDP to 169.254.42.1:7420. */
const bit<32> FABRIC_ADDRESS = 0xA9FE2A01;
const bit<16> BEACON_PORT = 7420;
const bit<8> BEACON_VERSION = 1;
const bit<8> BEACON_TYPE_LOAD = 1;
const bit<8> BEACON_TYPE_USAGE = 2;
const bit<8> BEACON_FLAG_NONE = 0;
const bit<8> BEACON_FLAG_DOWN = 1;
const bit<8> BEACON_FLAG_DRAINING = 2;

const bit<16> ETHERTYPE_IPV4 = 0x0800;
const bit<8> PROTO_IPIP = 4;
const bit<8> TUNNEL_TTL = 64;      /* the outer TTL of IP-in-IP */
const bit<16> IPV4_HEADER_BYTES = 20;
const bit<4> IPV4_MIN_IHL = 5;
const bit<8> PROTO_TCP = 6;
const bit<8> PROTO_UDP = 17;
const bit<16> ROCEV2_PORT = 4791;
const bit<8> TCP_FIN = 0x01;
const bit<8> TCP_SYN = 0x02;
const bit<8> TCP_RST = 0x04;
const bit<8> TCP_ACK = 0x10;
const bit<8> BTH_OPCODE_CNP = 0x81;

/* Service selection modes (action data of set_service). */
const bit<8> MODE_HASH = 0;
const bit<8> MODE_P2C = 1;

/* Meter colours (v1model): meta.color, the key of meter_policy. */
const bit<2> COLOR_GREEN = 0;
const bit<2> COLOR_YELLOW = 1;
const bit<2> COLOR_RED = 2;

/* ECN codepoints (RFC 3168). */
const bit<2> ECN_NOT_ECT = 0;
const bit<2> ECN_ECT1 = 1;
const bit<2> ECN_ECT0 = 2;
const bit<2> ECN_CE = 3;

/* Prefix affinity's load bound (steer_affinity's bound_percent): a backend's
 * score times AFFINITY_BOUND_ONE is compared with the pair's best score times
 * bound_percent, so 100 means "no more loaded than the best of the pair". */
const bit<32> AFFINITY_BOUND_ONE = 100;

/* No backend: the sentinel in the connection table and in metadata. */
const bit<32> NO_BACKEND = 0xFFFF;

/* One-bit facts about a packet: bits of meta.flags, one field rather than
 * one each (BMv2 zeroes each metadata field of every packet). */
const bit<8> F_USAGE = 0x01;       /* an accepted USAGE beacon: Admit debits tenant_id */
const bit<8> F_DECAP = 0x02;       /* IP-in-IP terminated here, for backend_id */
const bit<8> F_CONSUMED = 0x04;    /* a beacon: processed here, forwarded nowhere */
const bit<8> F_OVERFLOW = 0x10;    /* a new connection of a tenant over budget */
const bit<8> F_FALLBACK = 0x20;    /* the mode's choice was not eligible */
const bit<8> F_TRUST_DSCP = 0x40;  /* the tenant lets DSCP choose the class */
#define SET(f) meta.flags = meta.flags | (f)
#define IS(f) ((meta.flags & (f)) != 0)
#define NOT(f) ((meta.flags & (f)) == 0)

/* Connection-table states decided by the pin control. */
const bit<2> PIN_NONE = 0;       /* not service traffic (no vip entry) */
const bit<2> PIN_HIT = 1;        /* a packet of a pinned connection */
const bit<2> PIN_NEW = 2;        /* a new connection that owns its slot */
const bit<2> PIN_STATELESS = 3;  /* collision or unpinned mid-connection packet */
/* pin_state >= PIN_NEW: Select chooses a backend (one test for both). */
#define SERVICE (meta.pin_state != PIN_NONE)  /* addressed to a service VIP:port */

/* Drop reasons: index of the `drops` counter (tokenfabric/dataplane.py). */
const bit<32> DROP_NONE = 0;
const bit<32> DROP_TRUNCATED = 1;
const bit<32> DROP_BAD_IPV4_VERSION = 2;
const bit<32> DROP_BAD_IPV4_IHL = 3;
const bit<32> DROP_BAD_TCP_OFFSET = 4;
const bit<32> DROP_BAD_BEACON_VERSION = 5;
const bit<32> DROP_BAD_BEACON_TYPE = 6;
const bit<32> DROP_BEACON_UNAUTHORIZED = 7;
const bit<32> DROP_BEACON_BAD_ID = 8;
const bit<32> DROP_NOT_IPV4 = 9;
const bit<32> DROP_NO_ROUTE = 10;
const bit<32> DROP_TTL_EXPIRED = 11;
const bit<32> DROP_UNKNOWN_BACKEND = 12;
const bit<32> DROP_NO_BACKEND = 13;
const bit<32> DROP_METER_RED = 14;
const bit<32> DROP_PARSER_OTHER = 15;
const bit<32> DROP_BAD_IPV4_CHECKSUM = 16;
#define NUM_DROP_REASONS 32

/* Events: index of the `events` counter. */
const bit<32> EVENT_PIN_NEW = 0;
const bit<32> EVENT_PIN_HIT = 1;
const bit<32> EVENT_PIN_COLLISION = 2;
const bit<32> EVENT_PIN_MISS = 3;
const bit<32> EVENT_PIN_CLEARED = 4;
const bit<32> EVENT_BEACON_LOAD = 5;
const bit<32> EVENT_BEACON_USAGE = 6;
const bit<32> EVENT_SELECT_FALLBACK = 7;
const bit<32> EVENT_METER_YELLOW = 8;
const bit<32> EVENT_METER_RED = 9;
const bit<32> EVENT_OVERFLOW = 10;
const bit<32> EVENT_AFFINITY = 11;             /* a new connection steered by affinity */
const bit<32> EVENT_AFFINITY_OVER_BOUND = 12;  /* an affinity entry passed over: load, state */
const bit<32> EVENT_BEACON_RELAYED = 13;      /* accepted and sent on (beacon plane) */
#define NUM_EVENTS 16

/* Token bucket fixed point: the level is kept in micro-tokens (1 token = 10^6),
 * so that refill = elapsed_us * tokens_per_s is exact, biased by BUCKET_ZERO so
 * that a tenant can owe tokens (usage reported after the fact). */
const bit<64> BUCKET_ZERO = 0x4000000000000000;
const bit<64> MICRO = 1000000;
const bit<48> MAX_REFILL_US = 0xFFFFFFFF;
/* Level 0: a tenant the switch has not seen; a debt stops at BUCKET_FLOOR. */
const bit<64> BUCKET_NEVER_SEEN = 0;
const bit<64> BUCKET_FLOOR = 1;
/* The micro-tokens a USAGE beacon reports. */
#define USAGE_MICRO (((bit<64>)hdr.beacon_usage.prompt_tokens \
                      + (bit<64>)hdr.beacon_usage.completion_tokens) * MICRO)

/* A 4-bit IHL or TCP data offset of 0..3 (a parser select keyset); 4 is the
 * other value below the minimum of 5. */
#define NIBBLE_BELOW_4 4w0 &&& 4w0xC

/* A packet that may open a connection (a TCP SYN without ACK, or anything not
 * TCP) and one that ends it (TCP FIN or RST). Tests, not metadata: BMv2 pays
 * more for an assignment than for a test. */
#define OPENS_FLOW (!hdr.tcp.isValid() || (hdr.tcp.flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
#define ENDS_FLOW (hdr.tcp.isValid() && (hdr.tcp.flags & (TCP_FIN | TCP_RST)) != 0)

#endif
