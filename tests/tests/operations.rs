//! What operators do to a SQL log that grew: retire a group that is gone, page through dead
//! letters (a damaged one among them), and let retention take the attempt counts nobody needs.
//! The PostgreSQL review's defect 5: none of these was bounded.

use std::time::Duration;

use eda::cli::Command;
use eda::sql::{sqlx, SqlTransport};
use eda::{event, handler, DeadLetterStore, Page, Registry, Runtime, Transport};
use serde::{Deserialize, Serialize};

#[event(topic = "ledger", key = account)]
#[derive(Serialize, Deserialize)]
struct Booked {
    account: String,
    n: u32,
}

#[handler(group = "bookkeeping")]
async fn book(_ev: Booked) {}

fn registry() -> Registry {
    Registry::builder().handler::<book>().publishes::<Booked>().build()
}

async fn publish(db: &SqlTransport, n: u32) {
    let booked = Booked { account: format!("a{n}"), n };
    let envelope = eda::Envelope::root("test", eda::PendingEvent::new(&booked).expect("encoded"), None);
    db.publish(&envelope).await.expect("publish");
}

/// A group that stopped for good kept its position, and its position kept every event it had
/// not read from retention, for ever (the clean-up removed 0 rows). `group retire` forgets it —
/// refused while one of its instances is live, or while this build still has its handlers.
async fn a_retired_group_no_longer_keeps_the_log_from_retention(postgres: bool) {
    let log = eda_tests::TestDb::new(postgres).await;
    let aged = log.options().retention(Some(Duration::ZERO)).connect().await.expect("opens");
    for n in 0..5 {
        publish(&aged, n).await;
    }
    let subscription = eda::Subscription { group: "old-billing".into(), topic: "ledger".into(), prefetch: 1 };
    let consumer = aged.subscribe(&subscription).await.expect("subscribes");
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(aged.clean_up().await.expect("clean up").log, 0, "the group has read none of them");

    let commands = || Runtime::builder(registry()).transport(aged.clone());
    let retire = |group: &str| Command::GroupRetire { group: group.into() };
    let live = eda::cli::run(commands(), retire("old-billing")).await.err().map(|e| e.to_string());
    assert!(live.as_deref().is_some_and(|e| e.contains("stop every instance")), "{live:?}");
    let ours = eda::cli::run(commands(), retire("bookkeeping")).await.err().map(|e| e.to_string());
    assert!(ours.as_deref().is_some_and(|e| e.contains("still has handlers in this build")), "{ours:?}");

    // The group's last instance stops; a lease later it counts as gone.
    drop(consumer);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(aged.clean_up().await.expect("clean up").log, 0, "stopped is not retired");
    let said = eda::cli::run(commands(), retire("old-billing")).await.expect("retired");
    assert!(said.contains("group `old-billing` retired"), "{said}");
    let prefix = &log.prefix;
    assert_eq!(log.count(&format!("SELECT COUNT(*) FROM {prefix}offsets WHERE grp = 'old-billing'")).await, 0);
    assert_eq!(aged.clean_up().await.expect("clean up").log, 5, "nothing keeps the log now");
}

/// `dlq list` read every letter at once, and one letter whose stored event could not be read
/// failed the whole listing. It pages, and shows a damaged letter as what it is.
async fn dead_letters_are_listed_a_page_at_a_time_and_a_damaged_one_does_not_hide_the_rest(postgres: bool) {
    let log = eda_tests::TestDb::new(postgres).await;
    let db = log.open().await;
    let prefix = &log.prefix;
    for n in 0..5u32 {
        let booked = Booked { account: format!("a{n}"), n };
        let envelope = eda::Envelope::root("test", eda::PendingEvent::new(&booked).expect("encoded"), None);
        let stored = serde_json::to_string(&envelope).expect("serialises");
        sqlx::query(&format!(
            "INSERT INTO {prefix}dead_letters (grp, topic, seq, envelope, attempts, handler, error, permanent, at)
             VALUES ('bookkeeping', 'ledger', $1, $2, 3, 'bookkeeping/book', 'gave up', 1, 0)"
        ))
        .bind(i64::from(n) + 1)
        .bind(stored)
        .execute(db.pool())
        .await
        .expect("a letter");
    }
    log.execute(&format!("UPDATE {prefix}dead_letters SET envelope = '{{not json' WHERE seq = 2")).await;

    let all = db.dead_letters(None).await.expect("a damaged letter does not fail the listing");
    assert_eq!(all.len(), 5);
    let damaged = &all[1].letter;
    assert!(damaged.reason.error.contains("cannot be read") && damaged.reason.error.contains("gave up"));
    assert_eq!(damaged.envelope.data, b"{not json");

    let list = |page| Command::DlqList { group: Some("bookkeeping".into()), page };
    let commands = || Runtime::builder(registry()).transport(db.clone());
    let first = eda::cli::run(commands(), list(Page { after: 0, limit: 2 })).await.expect("lists");
    let next = format!("more: dlq list bookkeeping --after {} --limit 2", all[1].id);
    assert!(first.contains(&next), "{first}");
    assert_eq!(first.lines().filter(|l| l.contains("bookkeeping/book")).count(), 2, "{first}");
    let last = eda::cli::run(commands(), list(Page { after: all[3].id, limit: 2 })).await.expect("lists");
    assert_eq!(last.lines().filter(|l| l.contains("bookkeeping/book")).count(), 1, "{last}");
    assert!(!last.contains("more:"), "{last}");
    // Replaying a damaged letter would hand its group something it cannot read.
    let replayed = eda::cli::run(commands(), Command::DlqReplay { id: all[1].id, force: false }).await;
    let refused = replayed.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(refused.contains("`unreadable` event"), "{refused}");
}

/// A failed attempt's count outlived its event when the commit that passed the event lost its
/// reply (the count is cleared in that commit only when the consumer knew of it). Retention
/// removes counts of events their group has passed, and of events that are gone.
async fn retention_removes_attempt_counts_nobody_needs(postgres: bool) {
    let log = eda_tests::TestDb::new(postgres).await;
    let db = log.open().await;
    let rt = Runtime::builder(registry()).transport(db.clone()).start().await.expect("start");
    publish(&db, 1).await;
    rt.settled(Duration::from_secs(30)).await.expect("settled");
    rt.shutdown().await;
    let prefix = &log.prefix;
    // Left behind: a count of the event the group passed, and one of an event that is gone.
    log.execute(&format!(
        "INSERT INTO {prefix}attempts (grp, topic, seq, attempts)
         SELECT 'bookkeeping', 'ledger', MAX(seq), 2 FROM {prefix}log"
    ))
    .await;
    log.execute(&format!(
        "INSERT INTO {prefix}attempts (grp, topic, seq, attempts) VALUES ('bookkeeping', 'ledger', 999999, 1)"
    ))
    .await;
    // One the group still needs: an event it has not passed.
    publish(&db, 2).await;
    log.execute(&format!(
        "INSERT INTO {prefix}attempts (grp, topic, seq, attempts)
         SELECT 'bookkeeping', 'ledger', MAX(seq), 1 FROM {prefix}log"
    ))
    .await;
    let done = db.clean_up().await.expect("clean up");
    assert_eq!(done.attempts, 2, "{done:?}");
    assert_eq!(log.count(&format!("SELECT COUNT(*) FROM {prefix}attempts")).await, 1, "the needed one stays");
}

eda_tests::on_sql_databases! {
    a_retired_group_no_longer_keeps_the_log_from_retention,
    dead_letters_are_listed_a_page_at_a_time_and_a_damaged_one_does_not_hide_the_rest,
    retention_removes_attempt_counts_nobody_needs,
}
