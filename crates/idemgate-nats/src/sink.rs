//! The producer: publishes with `Nats-Msg-Id` and waits for the stream's ack.

use super::*;

pub(crate) fn to_headers(pairs: &[(String, Bytes)]) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = std::str::from_utf8(v) {
            headers.append(k.as_str(), v);
        }
    }
    headers
}

pub(crate) async fn publish(
    js: &jetstream::Context,
    subject: String,
    publish: Publish,
) -> Result<()> {
    js.send_publish(subject, publish)
        .await
        .map_err(err("publishing"))?
        .await
        .map_err(err("waiting for the stream's ack"))?;
    Ok(())
}

/// A JetStream producer.
#[derive(Debug, Clone)]
pub struct NatsSink {
    pub(crate) js: jetstream::Context,
}

impl Sink for NatsSink {
    async fn publish(&self, out: &Outgoing) -> Result<()> {
        let mut headers = to_headers(&out.headers);
        headers.insert(EVENT_ID, out.event_id.as_str());
        if let Some(k) = &out.ordering_key {
            headers.insert(ORDERING_KEY, k.as_str());
        }
        let mut p = Publish::build()
            .payload(out.payload.clone())
            .headers(headers);
        if !out.event_id.is_empty() {
            p = p.message_id(&out.event_id);
        }
        publish(&self.js, out.destination.clone(), p).await
    }
}
