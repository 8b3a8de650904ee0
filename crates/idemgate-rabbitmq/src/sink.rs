//! The producer: publishes with confirms.

use super::*;

/// A RabbitMQ producer: persistent messages, publisher confirms, the event id as `message-id`.
#[derive(Debug)]
pub struct RabbitSink {
    pub(crate) channel: Channel,
}

impl Sink for RabbitSink {
    async fn publish(&self, out: &Outgoing) -> Result<()> {
        let mut headers = FieldTable::default();
        headers.insert(EVENT_ID.into(), long_string(out.event_id.as_bytes()));
        if let Some(k) = &out.ordering_key {
            headers.insert(ORDERING_KEY.into(), long_string(k.as_bytes()));
        }
        for (name, value) in &out.headers {
            headers.insert(name.as_str().into(), long_string(value));
        }
        let props = BasicProperties::default()
            .with_message_id(ShortString::from(out.event_id.clone()))
            .with_delivery_mode(2)
            .with_headers(headers);
        publish(&self.channel, &out.destination, &out.payload, props).await
    }
}
