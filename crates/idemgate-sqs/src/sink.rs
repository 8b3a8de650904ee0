//! The producer: sends with the event id as an attribute (and the deduplication id on FIFO queues).

use super::*;

/// A producer: see the [crate docs](crate).
#[derive(Debug, Clone)]
pub struct SqsSink {
    pub(crate) client: Client,
}

pub(crate) fn string_attr(v: &str) -> Result<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .map_err(err("building a message attribute"))
}

/// A FIFO deduplication id: the event id itself when SQS accepts it (≤ 128 printable ASCII
/// characters), else its BLAKE3 hash.
pub(crate) fn dedup_id(event_id: &str) -> String {
    if event_id.len() <= 128 && event_id.bytes().all(|b| b.is_ascii_graphic()) {
        event_id.to_owned()
    } else {
        blake3::hash(event_id.as_bytes()).to_hex().to_string()
    }
}

pub(crate) async fn send(
    client: &Client,
    url: &str,
    body: &[u8],
    event_id: Option<&str>,
    headers: &[(String, Bytes)],
    group: Option<&str>,
    extra: Option<(&str, &str)>,
) -> Result<()> {
    let body = std::str::from_utf8(body).map_err(|_| {
        Error::Config("SQS message bodies are text: the payload is not UTF-8".into())
    })?;
    let mut req = client.send_message().queue_url(url).message_body(body);
    if let Some(id) = event_id {
        req = req.message_attributes(EVENT_ID, string_attr(id)?);
    }
    for (k, v) in headers.iter().filter(|(k, _)| k != EVENT_ID) {
        req = req.message_attributes(k, string_attr(&String::from_utf8_lossy(v))?);
    }
    if let Some((k, v)) = extra {
        req = req.message_attributes(k, string_attr(v)?);
    }
    if fifo(url) {
        req = req.message_group_id(group.unwrap_or("default"));
        if let Some(id) = event_id {
            req = req.message_deduplication_id(dedup_id(id));
        }
    }
    req.send().await.map_err(err("sending"))?;
    Ok(())
}

impl Sink for SqsSink {
    async fn publish(&self, msg: &Outgoing) -> Result<()> {
        send(
            &self.client,
            &msg.destination,
            &msg.payload,
            Some(&msg.event_id),
            &msg.headers,
            msg.ordering_key.as_deref(),
            None,
        )
        .await
    }
}
