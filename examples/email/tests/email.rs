//! Duplicates, a crash between the send and its completion, and a consumer that dies before
//! its acks: every user gets exactly one welcome email.

use idemgate::postgres::PostgresStore;
use idemgate_example_email::{Emails, MailStub, run};
use idemgate_testkit::service;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_user_gets_exactly_one_welcome_email() {
    let name = format!("email_test_{}", std::process::id());
    let store = PostgresStore::builder()
        .with_url(service::url(
            "IDEMGATE_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        ))
        .with_table(format!("{name}_sent_emails"))
        .build()
        .unwrap();
    let Some(()) = service::connect("PostgreSQL", store.migrate()).await else {
        return;
    };
    let (stub, addr) = MailStub::start().await.unwrap();
    let emails = Emails::new(store, addr);
    let users = 120;
    let crashes: Vec<String> = (0..users)
        .step_by(10)
        .map(|u| format!("user-{u}"))
        .collect();
    emails.crash_after_sending_to(crashes.clone());
    let nats = service::url("NATS_URL", "nats://127.0.0.1:4222");
    let (published, first, second) = run(&nats, &emails, &name, users).await.unwrap();

    let sent = stub.sent();
    assert_eq!(sent.len(), users, "{first:?} {second:?}");
    assert!(sent.values().all(|n| *n == 1), "an email went out twice");
    // every user's key is completed: nothing was left behind (the counts of a crashed consumer
    // are lost with it, so the store is the witness)
    for u in 0..users {
        let user = format!("user-{u}");
        assert!(
            emails.recorded(&user).await.unwrap(),
            "{user} not completed"
        );
    }
    // the crashed handlers ran again and called the mail service again: it sent nothing new
    assert!(stub.calls() >= (users + crashes.len()) as u64);
    assert!(second.retried > 0, "{second:?}");
    // duplicates: 30 by a second producer and 30 re-published, each recognised
    assert!(published >= users + 60);
    assert!(
        first.duplicates + second.duplicates >= (published - users) as u64,
        "{first:?} {second:?}"
    );
}
