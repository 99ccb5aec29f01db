/* tokenfabric edge switch (P4_16, v1model): steer LLM inference connections to
 * backends by load and QoS contract. Read top to bottom with docs/dataplane.md;
 * each concern is one control in include/. */
#include <core.p4>
#include <v1model.p4>

#include "include/defines.p4"
#include "include/headers.p4"
#include "include/parser.p4"
#include "include/state.p4"
#include "include/beacon.p4"
#include "include/classify.p4"
#include "include/pin.p4"
#include "include/admit.p4"
#include "include/select.p4"
#include "include/qos.p4"
#include "include/deliver.p4"
#include "include/count.p4"

/* The stages in this order are controller/compile's STAGES, each a module
 * named as its file here (docs/dataplane.md, "Pipeline"). */
control TokenIngress(inout headers_t hdr,
                     inout local_metadata_t meta,
                     inout standard_metadata_t standard_metadata) {

    Beacon() beacon;
    Decap() decap;
    Classify() classify;
    Pin() pin;
    Admit() admit;
    SelectBackend() select_backend;
    Qos() qos;
    Deliver() deliver;
    Count() count;

    apply {
        /* BMv2 pays for every condition it evaluates: the common path (a
         * well-formed packet of a pinned connection) takes as few as it can. */
        if (standard_metadata.parser_error == error.NoError
                && standard_metadata.checksum_error == 0) {
            if (hdr.ipv4.isValid() && !hdr.beacon.isValid()) {
                decap.apply(hdr, meta, standard_metadata);    /* a tunnel that ends here */
                classify.apply(hdr, meta, standard_metadata); /* tenant, class */
                pin.apply(hdr, meta, standard_metadata);      /* service? new, pinned, stateless */
            } else if (hdr.beacon.isValid()) {
                beacon.apply(hdr, meta, standard_metadata);   /* source, LOAD, USAGE: consumed */
            } else {
                meta.drop_reason = DROP_NOT_IPV4;
            }
            if (meta.pin_state != PIN_HIT) {
                admit.apply(hdr, meta, standard_metadata);    /* token bucket, overflow, USAGE debit */
                select_backend.apply(hdr, meta, standard_metadata); /* which backend */
            }
            /* Not dropped and not a beacon: IPv4 to forward. */
            if (meta.drop_reason == DROP_NONE && NOT(F_CONSUMED)) {
                qos.apply(hdr, meta, standard_metadata);      /* DSCP, priority, meter */
                deliver.apply(hdr, meta, standard_metadata);  /* DSR, IP-in-IP or route */
            }
        /* Malformed input: dropped and counted by reason. */
        } else if (standard_metadata.parser_error == error.NoError) {
            meta.drop_reason = DROP_BAD_IPV4_CHECKSUM;
        } else if (standard_metadata.parser_error == error.PacketTooShort) {
            meta.drop_reason = DROP_TRUNCATED;
        } else if (standard_metadata.parser_error == error.BadIpv4Version) {
            meta.drop_reason = DROP_BAD_IPV4_VERSION;
        } else if (standard_metadata.parser_error == error.BadIpv4Ihl) {
            meta.drop_reason = DROP_BAD_IPV4_IHL;
        } else if (standard_metadata.parser_error == error.BadTcpDataOffset) {
            meta.drop_reason = DROP_BAD_TCP_OFFSET;
        } else if (standard_metadata.parser_error == error.BadBeaconVersion) {
            meta.drop_reason = DROP_BAD_BEACON_VERSION;
        } else if (standard_metadata.parser_error == error.BadBeaconType) {
            meta.drop_reason = DROP_BAD_BEACON_TYPE;
        } else {
            meta.drop_reason = DROP_PARSER_OTHER;
        }
        count.apply(hdr, meta, standard_metadata);            /* counters, drops */
    }
}

V1Switch(TokenParser(),
         TokenVerifyChecksum(),
         TokenIngress(),
         TokenEgress(),
         TokenComputeChecksum(),
         TokenDeparser()) main;
