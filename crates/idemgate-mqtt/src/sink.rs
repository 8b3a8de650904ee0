//! The producer: publishes at QoS 1 and waits for the PUBACK.

use super::*;

pub(crate) fn properties(event_id: Option<&str>, headers: &[(String, Bytes)]) -> PublishProperties {
    let mut user_properties = Vec::with_capacity(headers.len() + 1);
    if let Some(id) = event_id {
        user_properties.push((EVENT_ID.to_owned(), id.to_owned()));
    }
    user_properties.extend(
        headers
            .iter()
            .filter(|(k, _)| k != EVENT_ID)
            .map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned())),
    );
    PublishProperties {
        user_properties,
        ..PublishProperties::default()
    }
}

/// A QoS 1 producer: see the [crate docs](crate).
#[derive(Clone)]
pub struct MqttSink {
    pub(crate) link: Arc<Link>,
}

impl fmt::Debug for MqttSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MqttSink").finish_non_exhaustive()
    }
}

impl Sink for MqttSink {
    async fn publish(&self, msg: &Outgoing) -> Result<()> {
        let mut props = properties(Some(&msg.event_id), &msg.headers);
        if let Some(k) = &msg.ordering_key {
            props
                .user_properties
                .push((ORDERING_KEY.to_owned(), k.clone()));
        }
        // a topic nobody subscribes to yet is the application's business (MQTT has no queues)
        self.link
            .publish(&msg.destination, msg.payload.clone(), props)
            .await
            .map(drop)
    }
}
