//! The connection: its link to the event loop, reconnection and the event loop's driver.

use super::*;

impl Link {
    pub(crate) fn acks(&self) -> MutexGuard<'_, Acks> {
        lock(&self.acks)
    }

    /// The message that arrived `arrival`th is settled: queues the PUBACKs that may go out now.
    pub(crate) fn settled(self: &Arc<Self>, outbox: &Mutex<Outbox>, arrival: u64, ack: Ack) {
        let mut out = lock(outbox);
        out.order.settled(arrival, ack);
        if out.draining {
            return;
        }
        while let Some(ack) = out.order.ready() {
            if self.client.try_ack(&ack.publish()).is_err() {
                // the event loop's queue is full (or gone): one task waits for room, in order
                out.draining = true;
                tokio::spawn(Arc::clone(self).drain());
                return;
            }
            out.order.take();
        }
    }

    /// Queues the ready PUBACKs in order, waiting for room, until none is ready.
    pub(crate) async fn drain(self: Arc<Self>) {
        let Some(outbox) = &self.in_order else {
            return;
        };
        // the next ready ack, or the end of the drain (under the same lock)
        let take = || {
            let mut out = lock(outbox);
            let next = out.order.take();
            out.draining = next.is_some();
            next
        };
        while let Some(next) = take() {
            if let Err(e) = self.client.ack(&next.publish()).await {
                // the event loop is gone for good (its connection was dropped): no ack can go
                // out any more, and the broker redelivers what was not acked
                tracing::debug!(error = %e, "could not queue a PUBACK");
                let mut out = lock(outbox);
                out.order.lost(u64::MAX);
                out.draining = false;
                break;
            }
        }
        self.drained.notify_waiters();
    }

    /// The connection dropped after `arrived` messages: the broker redelivers every message it
    /// has not had a PUBACK for, so the held and ready PUBACKs are void.
    pub(crate) fn lost(&self, arrived: u64) {
        if let Some(outbox) = &self.in_order {
            lock(outbox).order.lost(arrived);
        }
    }

    /// Waits until every PUBACK that may go out has been queued to the event loop.
    pub(crate) async fn flushed(&self) {
        let Some(outbox) = &self.in_order else {
            return;
        };
        loop {
            let drained = self.drained.notified();
            if !lock(outbox).draining {
                return;
            }
            drained.await;
        }
    }

    /// Publishes at QoS 1 and waits for the PUBACK; `Ok(false)` when no subscriber matched.
    pub(crate) async fn publish(
        &self,
        topic: &str,
        payload: Bytes,
        props: PublishProperties,
    ) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.order.lock().await;
            self.acks().publishes.push_back(tx);
            if let Err(e) = self
                .client
                .publish_bytes_with_properties(topic, QoS::AtLeastOnce, false, payload, props)
                .await
            {
                self.acks().publishes.pop_back();
                return Err(Error::broker(BROKER, "publishing", e));
            }
        }
        match rx.await {
            Ok(Ok(routed)) => Ok(routed),
            Ok(Err(e)) => Err(Error::broker(BROKER, format!("publishing to {topic}"), e)),
            Err(_) => Err(Error::broker(
                BROKER,
                "publishing",
                "the connection closed before the PUBACK",
            )),
        }
    }

    pub(crate) async fn subscribe(&self, filter: &str) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        {
            let _order = self.order.lock().await;
            self.acks().subscribes.push_back(tx);
            if let Err(e) = self.client.subscribe(filter, QoS::AtLeastOnce).await {
                self.acks().subscribes.pop_back();
                return Err(Error::broker(BROKER, "subscribing", e));
            }
        }
        rx.await
            .map_err(|_| "the connection closed before the SUBACK".to_owned())
            .and_then(|r| r)
            .map_err(|e| Error::broker(BROKER, format!("subscribing to {filter}"), e))?;
        lock(&self.filters).push(filter.to_owned());
        Ok(())
    }

    /// The broker reconnected us without our session (a restart without persistence, an
    /// expired session, a clean-start client id): nothing arrives until we subscribe again.
    pub(crate) fn subscribe_again(&self) {
        let filters = lock(&self.filters).clone();
        if filters.is_empty() {
            return;
        }
        tracing::warn!(
            ?filters,
            "the broker has no session for this client: subscribing again (what was sent while disconnected is gone)"
        );
        for f in filters {
            if let Err(e) = self.client.try_subscribe(f, QoS::AtLeastOnce) {
                tracing::warn!(error = %e, "subscribing again failed");
            }
        }
    }

    /// Fails every waiting publish and subscribe (the connection dropped).
    pub(crate) fn fail_all(&self, why: &str) {
        let mut acks = self.acks();
        let acks = &mut *acks;
        let waiting = acks.publishes.drain(..).chain(acks.subscribes.drain(..));
        let sent = acks.by_pkid.drain().chain(acks.subs_by_pkid.drain());
        for w in waiting.chain(sent.map(|(_, w)| w)) {
            let _ = w.send(Err(why.to_owned()));
        }
    }
}

/// A connection to an MQTT 5 broker, driven by its own task: the [`MqttSink`] and
/// [`MqttSource`] made from it share it.
pub struct Mqtt {
    pub(crate) link: Arc<Link>,
    pub(crate) incoming: Mutex<Option<mpsc::UnboundedReceiver<(Publish, u64)>>>,
    pub(crate) driver: JoinHandle<()>,
    pub(crate) session: Session,
}

impl fmt::Debug for Mqtt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mqtt")
            .field("session", &self.session)
            .finish_non_exhaustive()
    }
}

impl Mqtt {
    /// Connects to `host:port` as `client_id` (a persistent session is found again by its
    /// client id) and waits for the broker's `CONNACK`.
    pub async fn connect(host: &str, port: u16, client_id: &str, session: Session) -> Result<Self> {
        let mut opts = MqttOptions::new(client_id, host, port);
        opts.set_keep_alive(Duration::from_secs(10))
            .set_clean_start(!session.persistent)
            .set_manual_acks(true)
            .set_receive_maximum(Some(session.receive_maximum));
        if session.persistent {
            let secs = u32::try_from(session.expiry.as_secs()).unwrap_or(u32::MAX);
            opts.set_session_expiry_interval(Some(secs));
        }
        let (client, mut events) = AsyncClient::new(opts, 256);
        // the first event is the CONNACK, or the reason there is none
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(e) => {
                    return Err(Error::broker(
                        BROKER,
                        format!("connecting to {host}:{port}"),
                        e,
                    ));
                }
            }
        }
        let in_order = session.ordered_acks.then(|| {
            Mutex::new(Outbox {
                order: InOrder::new(),
                draining: false,
            })
        });
        let link = Arc::new(Link {
            client,
            acks: Mutex::default(),
            order: tokio::sync::Mutex::new(()),
            in_order,
            drained: tokio::sync::Notify::new(),
            filters: Mutex::default(),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let driver = tokio::spawn(drive(Arc::clone(&link), events, tx));
        Ok(Mqtt {
            link,
            incoming: Mutex::new(Some(rx)),
            driver,
            session,
        })
    }

    /// A producer on this connection.
    pub fn sink(&self) -> MqttSink {
        MqttSink {
            link: Arc::clone(&self.link),
        }
    }

    /// Subscribes to `filter` at QoS 1 (waiting for the `SUBACK`) and returns the source of
    /// this connection's messages (once per connection). Dead letters go to
    /// `idemgate-dead/<topic>` unless [`MqttSource::with_dead_letter_topic`] says otherwise.
    pub async fn source(&self, filter: &str) -> Result<MqttSource> {
        let incoming = lock(&self.incoming)
            .take()
            .ok_or_else(|| Error::Config("this connection's source was already taken".into()))?;
        if !self.session.persistent {
            tracing::warn!(
                filter,
                "a clean-session source: messages published while it is disconnected are not kept for it, and unacked ones are not redelivered"
            );
        }
        self.link.subscribe(filter).await?;
        let (again_tx, again_rx) = mpsc::unbounded_channel();
        Ok(MqttSource {
            link: Arc::clone(&self.link),
            incoming,
            again_tx,
            again_rx,
            dead_letter_topic: None,
            horizon: Horizon {
                broker: BROKER,
                redelivery: self.session.expiry,
                basis: format!("session expiry interval {:?}", self.session.expiry),
            },
        })
    }

    /// Disconnects cleanly (a persistent session stays on the broker), after the PUBACKs of the
    /// messages settled so far. A PUBACK held behind an unsettled message is not sent: the broker
    /// redelivers both.
    pub async fn disconnect(self) -> Result<()> {
        self.link.flushed().await;
        self.link
            .client
            .disconnect()
            .await
            .map_err(err("disconnecting"))?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(())
    }
}

impl Drop for Mqtt {
    /// Dropping the connection closes it without a `DISCONNECT`, as a crash would.
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Drives the event loop: incoming publishes to the source, numbered in arrival order, acks to
/// their waiters; reconnects after a failure (a persistent session resumes where it was).
pub(crate) async fn drive(
    link: Arc<Link>,
    mut events: EventLoop,
    incoming: mpsc::UnboundedSender<(Publish, u64)>,
) {
    let mut arrived = 0;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = incoming.send((p, arrived));
                arrived += 1;
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                let w = link.acks().by_pkid.remove(&ack.pkid);
                if let Some(w) = w {
                    let r = match ack.reason {
                        PubAckReason::Success => Ok(true),
                        PubAckReason::NoMatchingSubscribers => Ok(false),
                        other => Err(format!("the broker refused the publish: {other:?}")),
                    };
                    let _ = w.send(r);
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let w = link.acks().subs_by_pkid.remove(&ack.pkid);
                if let Some(w) = w {
                    let refused = ack.return_codes.iter().find(|c| {
                        !matches!(
                            c,
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(_)
                        )
                    });
                    let _ = w.send(match refused {
                        None => Ok(true),
                        Some(c) => Err(format!("the broker refused the subscription: {c:?}")),
                    });
                }
            }
            Ok(Event::Outgoing(Sent::Publish(pkid))) => {
                let mut acks = link.acks();
                if let Some(w) = acks.publishes.pop_front() {
                    acks.by_pkid.insert(pkid, w);
                }
            }
            Ok(Event::Outgoing(Sent::Subscribe(pkid))) => {
                let mut acks = link.acks();
                if let Some(w) = acks.subscribes.pop_front() {
                    acks.subs_by_pkid.insert(pkid, w);
                }
            }
            // a reconnection (the first CONNACK was read by `connect`)
            Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                link.subscribe_again();
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "mqtt connection failed; reconnecting");
                link.fail_all(&e.to_string());
                link.lost(arrived);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}
