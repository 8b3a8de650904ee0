//! Runs the email service against the local NATS and PostgreSQL with the stub mail service:
//! duplicates, a crash between the send and the completion, a consumer that crashes after its
//! first email. `NATS_URL`, `IDEMGATE_POSTGRES_URL` override the local defaults.

use idemgate::postgres::PostgresStore;
use idemgate_example_email::{BoxError, Emails, MailStub, run};

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let name = format!("email_demo_{}", std::process::id());
    let store = PostgresStore::builder()
        .with_url(env(
            "IDEMGATE_POSTGRES_URL",
            "postgres://postgres@127.0.0.1:5432/test",
        ))
        .with_table(format!("{name}_sent_emails"))
        .build()?;
    store.migrate().await?;
    let (stub, addr) = MailStub::start().await?;
    let emails = Emails::new(store, addr);
    let users = 200;
    emails.crash_after_sending_to((0..users).step_by(10).map(|u| format!("user-{u}")));
    let nats = env("NATS_URL", "nats://127.0.0.1:4222");
    let (published, first, second) = run(&nats, &emails, &name, users).await?;
    let sent = stub.sent();
    let total: u32 = sent.values().sum();
    println!("{published} messages published for {users} registrations (with duplicates)");
    println!("first consumer (crashed after its first email): {first:?}");
    println!("second consumer: {second:?}");
    println!(
        "mail service: {} calls, {total} emails to {} users",
        stub.calls(),
        sent.len()
    );
    if sent.len() == users && sent.values().all(|n| *n == 1) {
        println!("every user got exactly one welcome email");
        Ok(())
    } else {
        Err("some user got no welcome email, or more than one".into())
    }
}
