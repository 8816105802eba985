//! Reclaimable sets a holder may not offer: malformed ids, too many of them, each named in the
//! refusal (bounded however many there are); and what a valid set with unknown ids leaves
//! offered.

use std::time::Duration;

use proto::memory::v1::{KeepAliveRequest, ReclaimableSet};
use tonic::Code;

use super::{Holder, filled};

#[tokio::test]
async fn bad_reclaimable_sets_are_refused_with_every_violation() {
    let (server, mut a, leases) = filled(Duration::from_secs(1)).await;
    let mut stream = Holder::open(&mut a).await;
    let mut ids = vec!["nope".to_owned(), leases[0].clone(), "ABC".to_owned()];
    ids.extend(std::iter::repeat_n(leases[1].clone(), 1024));
    stream
        .tx
        .send(KeepAliveRequest { reclaimable: Some(ReclaimableSet { lease_ids: ids }), ..Default::default() })
        .await
        .unwrap();
    let err = stream.replies.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        e2e::bad_request_fields(&err),
        ["reclaimable.lease_ids", "reclaimable.lease_ids[0]", "reclaimable.lease_ids[2]"]
    );
    // However many ids are malformed, the refusal fits in the trailers: the first 16 violations
    // and a count of the rest.
    let mut stream = Holder::open(&mut a).await;
    let bad: Vec<String> = (0..1024).map(|i| format!("not-a-lease-{i}-{}", "x".repeat(64))).collect();
    let set = ReclaimableSet { lease_ids: bad.clone() };
    stream
        .tx
        .send(KeepAliveRequest { lease_ids: bad, reclaimable: Some(set), ..Default::default() })
        .await
        .unwrap();
    let err = stream.replies.message().await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert_eq!(e2e::bad_request_fields(&err).len(), 17);
    assert!(err.message().contains("2032 more violation(s)"), "{}", err.message());
    // An empty set is valid on its own, and unknown ids are reported, not offered.
    let mut stream = Holder::open(&mut a).await;
    assert_eq!(stream.offer(&[]).await.reclaimable_leases, 0);
    let gone = "0".repeat(32);
    let reply = stream.offer(&[leases[0].clone(), gone.clone()]).await;
    assert_eq!((reply.reclaimable_leases, reply.not_found), (1, vec![gone]));
    server.stop().await;
}
