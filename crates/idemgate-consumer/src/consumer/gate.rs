//! Gate mode: claim, run, complete, ack.

use super::*;
pub(crate) struct GateProcess<St, H> {
    pub(crate) rt: Arc<Runtime>,
    // handlers running at once (`concurrency`); twice as many lanes claim ahead of them
    pub(crate) running: Semaphore,
    pub(crate) store: Arc<St>,
    pub(crate) claims: Batcher<(Key, Option<Fingerprint>), Claim>,
    pub(crate) completions: Batcher<(Lease, Outcome), ()>,
    pub(crate) handler: H,
}

/// Where a Gate-mode delivery's claim and run ended.
pub(crate) enum Resolved<'a> {
    Settle(Settle),
    /// The handler ran to its end under `Lease`: complete the key, then ack. The handler's
    /// slot is kept until the completion has a settle slot, so at most `concurrency` effects
    /// wait for one and `concurrency` are being completed: the Gate's window.
    Ran(Key, Lease, Option<tokio::sync::SemaphorePermit<'a>>),
    /// Out of attempts under `Lease`: dead-letter, then record the key as failed.
    Exhausted(Lease, String),
}

impl<St, H, Fut, E, D> Process<D> for GateProcess<St, H>
where
    St: Store,
    H: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
    D: Delivery,
{
    async fn process(&self, d: D) -> bool {
        let rt = &self.rt;
        // one ticker for the whole claim and run: the broker hears from a held delivery
        let resolved = tokio::select! {
            r = self.resolve(&d) => r,
            never = rt.broker_tick(&d) => match never {},
        };
        let (key, lease, slot) = match resolved {
            Resolved::Settle(settle) => return rt.settle(d, settle).await,
            Resolved::Ran(key, lease, slot) => (key, lease, slot),
            Resolved::Exhausted(lease, reason) => {
                // the key is recorded as a stored failure once the dead letter is stored, so a
                // copy of the event (a producer's re-publish) is acked, not dead-lettered again
                let failed = Outcome::new(Outcome::FAILED, Bytes::from(reason.clone()));
                let stored = rt.dead_letter(d, Why::Exhausted, reason).await;
                let recorded = if stored {
                    // tried again at a short pace while the store fails, the lease kept alive:
                    // a copy that takes the key over would be dead-lettered again
                    let complete = rt
                        .until_recorded(|| self.store.complete(&lease, &failed, rt.cfg.retention));
                    keep_alive(&*self.store, &lease, rt.cfg.lease, complete)
                        .await
                        .0
                } else {
                    self.store.release(lease).await
                };
                if let Err(e) = recorded {
                    tracing::warn!(error = %e, "recording a dead-lettered key failed");
                }
                return stored;
            }
        };
        // the completion and the ack run behind the lane; the lease is renewed while the run
        // waits for a settle slot and for its completion batch
        let (rt2, completions) = (Arc::clone(rt), self.completions.clone());
        let (store, held, length) = (Arc::clone(&self.store), lease.clone(), rt.cfg.lease);
        let settle = async move {
            let completing = complete(rt2, completions, d, key, held.clone());
            let _ = keep_alive(&*store, &held, length, completing).await;
        };
        let _ = keep_alive(&*self.store, &lease, length, rt.behind(settle)).await;
        drop(slot);
        true
    }
}

impl<St, H, Fut, E> GateProcess<St, H>
where
    St: Store,
    H: Fn(Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(), E>> + Send + 'static,
    E: fmt::Display + Send + 'static,
{
    /// Claims the key and runs the handler, holding the delivery while the store is down, the
    /// key is busy elsewhere, or a failed run of an ordered message waits for its retry.
    pub(crate) async fn resolve<D: Delivery>(&self, d: &D) -> Resolved<'_> {
        let rt = &*self.rt;
        let msg = d.message();
        let key = match rt.key(msg) {
            Ok(key) => key,
            Err(reason) => {
                let reason = format!("poison message: {reason}");
                return Resolved::Settle(Settle::DeadLetter(Why::Poison, reason));
            }
        };
        let fp = match rt.fingerprint(msg) {
            Ok(fp) => fp,
            Err(reason) => {
                let reason = format!("poison message: {reason}");
                return Resolved::Settle(Settle::DeadLetter(Why::Poison, reason));
            }
        };
        let mut waits = 0;
        loop {
            let lease = match self.claim(&key, fp, &mut waits).await {
                Ok(lease) => lease,
                Err(settle) => return Resolved::Settle(settle),
            };
            // a slot for the handler; the lease is kept while the claim waits for one
            let (slot, lost) =
                keep_alive(&*self.store, &lease, rt.cfg.lease, self.running.acquire()).await;
            if lost {
                // taken over while it waited: wait for the new holder instead
                count!(rt, fenced);
                continue;
            }
            let attempt = rt.attempt(&key, Some(lease.attempt()), None);
            if lease.attempt() > rt.local_runs(&key) {
                // the store counts runs this consumer did not start: another's lease ran out
                count!(rt, takeovers);
            }
            // a panic or a timeout of the handler is caught here: a failed attempt, not a dead
            // lane
            let run = rt.run_handler(&key, msg, attempt, (self.handler)(msg.clone()));
            let (ran, lost) = keep_alive(&*self.store, &lease, rt.cfg.lease, run).await;
            let failure = rt.failure(ran);
            if failure.is_none() && !lost {
                return Resolved::Ran(key, lease, slot.ok());
            }
            drop(slot);
            match failure {
                None => {
                    // another consumer took the key over while this one ran: wait for it to
                    // complete, then ack this delivery as a duplicate
                    count!(rt, fenced);
                    tracing::warn!(%key, "lease lost while the handler ran");
                }
                Some(error) => {
                    let next = rt.after_failure(msg, &key, attempt, error);
                    if let Err(Settle::DeadLetter(Why::Exhausted, reason)) = next {
                        return Resolved::Exhausted(lease, reason);
                    }
                    let _ = self.store.release(lease).await;
                    match next {
                        Ok(delay) if rt.pause(delay).await => {}
                        Ok(_) => return Resolved::Settle(Settle::Nack(Duration::ZERO)),
                        Err(settle) => return Resolved::Settle(settle),
                    }
                }
            }
        }
    }

    /// Claims `key`: a lease, or how the delivery ends. A busy key is waited for (up to its
    /// holder's lease, so a dead holder's key is taken over when its lease runs out), and a
    /// failing store is retried with a growing delay; neither is nacked into the broker's
    /// delivery count.
    pub(crate) async fn claim(
        &self,
        key: &Key,
        fp: Fingerprint,
        waits: &mut u32,
    ) -> std::result::Result<Lease, Settle> {
        let rt = &*self.rt;
        let mut failures = 0;
        loop {
            let delay = match self.claims.call((key.clone(), Some(fp))).await {
                Ok(Claim::Acquired(lease)) => return Ok(lease),
                Ok(Claim::Completed(_)) => {
                    count!(rt, duplicates);
                    return Err(Settle::Ack);
                }
                Ok(Claim::InProgress { lease_until, .. }) => {
                    count!(rt, in_progress);
                    let left = lease_until
                        .duration_since(SystemTime::now())
                        .unwrap_or_default();
                    let wait = backoff(rt.cfg.busy_delay, *waits);
                    *waits = waits.saturating_add(1);
                    wait.min(left + Duration::from_millis(20))
                }
                Ok(Claim::Mismatch { .. }) => {
                    let reason = format!(
                        "fingerprint mismatch: key {key} was first handled with a different payload"
                    );
                    return Err(Settle::DeadLetter(Why::Mismatch, reason));
                }
                Err(e) => {
                    if rt.unavailable("the claim", &e, &mut failures).await {
                        continue;
                    }
                    return Err(Settle::Nack(Duration::ZERO));
                }
            };
            if !rt.pause(delay).await {
                return Err(Settle::Nack(Duration::ZERO));
            }
        }
    }
}

/// Records a run's completion, then acks. A failing store is retried with the delivery held
/// (and the lease renewed by the caller); a lost lease nacks.
pub(crate) async fn complete<D: Delivery>(
    rt: Arc<Runtime>,
    completions: Batcher<(Lease, Outcome), ()>,
    d: D,
    key: Key,
    lease: Lease,
) {
    let done = Outcome::new(Outcome::OK, Bytes::new());
    let recorded = tokio::select! {
        r = async {
            let mut failures = 0;
            loop {
                match completions.call((lease.clone(), done.clone())).await {
                    Err(idemgate_core::Error::LeaseLost) => break Err(()),
                    Err(e) => {
                        // until it is recorded a redelivery would run the effect again: keep
                        // trying while the lease is renewed
                        if !rt.unavailable("recording the completion", &e, &mut failures).await {
                            break Ok(false);
                        }
                    }
                    Ok(()) => break Ok(true),
                }
            }
        } => r,
        never = rt.broker_tick(&d) => match never {},
    };
    match recorded {
        Ok(true) => {
            rt.forget(&key);
            count!(rt, handled);
            rt.ack(d).await;
        }
        Ok(false) => {
            // stopping with the completion unrecorded: a redelivery runs the effect again (the
            // Gate window; pass `Key::derive` downstream to close it)
            tracing::warn!(%key, "stopping before the completion was recorded");
            rt.nack(d, Duration::ZERO).await;
        }
        Err(()) => {
            count!(rt, fenced);
            tracing::warn!(%key, "completion fenced: another consumer took the key over");
            rt.nack(d, rt.cfg.busy_delay).await;
        }
    }
}
