//! The hub's numbering, replay, snapshot and refusals.

use tokio_stream::StreamExt;

use super::*;

fn stored(hash: BlockHash, parent: Option<BlockHash>) -> KvEvent {
    KvEvent::Stored { hash, parent, ids: vec![hash as u32; 2].into() }
}

async fn take(sub: &mut KvSubscription, n: usize) -> Vec<Arc<KvBatch>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(sub.next().await.expect("open").expect("in order"));
    }
    out
}

#[tokio::test]
async fn numbers_have_no_gaps_and_a_resume_replays_what_followed() {
    let hub = Arc::new(KvEventHub::new(4, 2));
    let mut live = hub.subscribe(0).expect("from now");
    let snapshot = take(&mut live, 1).await;
    assert_eq!(snapshot[0].events, vec![KvEvent::Cleared], "nothing cached yet");
    hub.publish(vec![stored(1, None)]);
    hub.publish(vec![]); // nothing happened: no batch
    hub.publish(vec![stored(2, Some(1)), KvEvent::Removed(vec![1])]);
    let batches = take(&mut live, 2).await;
    assert_eq!(batches[0].sequence + 1, batches[1].sequence);
    assert_eq!(batches[0].sequence, snapshot[0].sequence + 1, "the snapshot is numbered as the latest");
    // A router that saw the first resumes from its number: it gets it again (and skips it), then
    // the second.
    let mut resumed = hub.subscribe(batches[0].sequence).expect("kept");
    let again = take(&mut resumed, 2).await;
    assert_eq!(
        again.iter().map(|b| b.sequence).collect::<Vec<_>>(),
        [batches[0].sequence, batches[1].sequence]
    );
    // From nothing: the current content only (2, whose parent 1 was removed since).
    let mut fresh = hub.subscribe(0).expect("from now");
    let now = take(&mut fresh, 1).await;
    assert_eq!(now[0].events, vec![KvEvent::Cleared, stored(2, Some(1))]);
}

#[tokio::test]
async fn a_resume_past_the_buffer_or_ahead_of_it_is_refused_with_the_numbers() {
    let hub = Arc::new(KvEventHub::new(2, 2));
    let first = hub.subscribe(0).expect("now");
    drop(first);
    for h in 0..5 {
        hub.publish(vec![stored(h, None)]);
    }
    let latest = *hub.latest.borrow();
    match hub.subscribe(latest - 4) {
        Err(ResumeError::TooOld { oldest, .. }) => assert_eq!(oldest, latest - 1),
        other => panic!("expected TooOld, got {:?}", other.map(|_| ())),
    }
    assert!(hub.subscribe(latest - 2).is_ok(), "all after latest-2 are kept");
    assert!(matches!(hub.subscribe(latest + 5), Err(ResumeError::Ahead { .. })));
}

#[tokio::test]
async fn a_subscriber_that_falls_behind_the_buffer_is_told_not_skipped() {
    let hub = Arc::new(KvEventHub::new(2, 2));
    let mut slow = hub.subscribe(0).expect("now");
    take(&mut slow, 1).await;
    for h in 0..5 {
        hub.publish(vec![stored(h, None)]);
    }
    let err = slow.next().await.expect("an item").expect_err("fell behind");
    assert!(matches!(err, ResumeError::TooOld { .. }), "{err}");
}
