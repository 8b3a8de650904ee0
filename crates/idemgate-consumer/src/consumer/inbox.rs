//! Inbox mode: the key row and the effect in one transaction, then the ack.

use super::*;

pub(crate) struct InboxProcess<I: Inbox, H> {
    pub(crate) rt: Arc<Runtime>,
    pub(crate) inbox: Arc<I>,
    pub(crate) handler: Arc<H>,
}

/// Where one try of an Inbox-mode delivery ended.
pub(crate) enum Tried {
    Settle(Settle),
    /// The store or the database failed at `what`: nothing committed, try again.
    Unavailable(&'static str, idemgate_core::Error),
    /// The handler failed (attempt number, failure): rolled back.
    Failed(u32, Failure),
}

/// Where one message of a committed batch ended.
pub(crate) enum InBatch {
    /// Its handler ran and committed.
    New,
    /// Its key was recorded before: acked without running the handler.
    Duplicate,
    /// Its handler failed (attempt number, failure): rolled back to its savepoint.
    Failed(u32, Failure),
    /// It waits behind a failed message of its ordering key, or is a later copy of a failed
    /// message: not run, not recorded.
    Later,
}

impl<I, H, D> Process<D> for InboxProcess<I, H>
where
    I: Inbox,
    H: InboxHandler<I::Tx, Message>,
    D: Delivery,
{
    async fn process_many(&self, ds: Vec<D>) -> Vec<bool> {
        if ds.len() < 2 {
            let mut settled = Vec::with_capacity(1);
            for d in ds {
                settled.push(self.process(d).await);
            }
            return settled;
        }
        let rt = &*self.rt;
        let mut settled = vec![true; ds.len()];
        let (mut batch, mut keys) = (Vec::with_capacity(ds.len()), Vec::with_capacity(ds.len()));
        for (i, d) in ds.into_iter().enumerate() {
            match rt.key(d.message()) {
                Ok(key) => {
                    keys.push(key);
                    batch.push((i, d));
                }
                Err(reason) => {
                    let reason = format!("poison message: {reason}");
                    settled[i] = self.dead_letter(d, None, Why::Poison, reason).await;
                }
            }
        }
        let ds: Vec<&D> = batch.iter().map(|(_, d)| d).collect();
        let committed = tokio::select! {
            r = self.run_batch(&ds, &keys) => r,
            never = rt.broker_ticks(&ds) => match never {},
        };
        drop(ds);
        let outcomes = match committed {
            Ok(outcomes) => outcomes,
            Err(why) => {
                tracing::debug!(%why, n = batch.len(), "batch rolled back; one transaction each");
                let mut queue: std::collections::VecDeque<(usize, D)> = batch.into();
                while let Some((i, d)) = queue.pop_front() {
                    // the broker hears from the deliveries waiting their turn, too
                    let waiting: Vec<&D> = queue.iter().map(|(_, d)| d).collect();
                    settled[i] = tokio::select! {
                        s = self.process(d) => s,
                        never = rt.broker_ticks(&waiting) => match never {},
                    };
                }
                return settled;
            }
        };
        let (mut done, mut rest) = (Vec::with_capacity(batch.len()), Vec::new());
        let (mut handled, mut duplicates) = (0, 0);
        for (((i, d), key), outcome) in batch.into_iter().zip(keys).zip(outcomes) {
            match outcome {
                InBatch::New => {
                    handled += 1;
                    rt.forget(&key);
                    done.push(d);
                }
                InBatch::Duplicate => {
                    duplicates += 1;
                    done.push(d);
                }
                outcome => rest.push((i, d, key, outcome)),
            }
        }
        let counters = &rt.counters;
        counters.handled.fetch_add(handled, Ordering::Relaxed);
        counters.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        // one settlement for what committed: its acks go in order, from one task
        self.rt.ack_all_behind(done).await;
        // then, in order, each failed message as a failed run, and the ones that waited behind
        // it on their own. Like the lane, the batch gives a key's later messages back after it
        // only when the consumer stops: otherwise they would come again after the messages of
        // their key the lane holds, and be applied after them
        let hasher = RandomState::new();
        let mut given_back: HashSet<u64> = HashSet::new();
        let mut queue: std::collections::VecDeque<_> = rest.into();
        while let Some((i, d, key, outcome)) = queue.pop_front() {
            let ordering = d
                .message()
                .ordering_key
                .as_ref()
                .map(|k| hasher.hash_one(k));
            if rt.stopping() && ordering.is_some_and(|k| given_back.contains(&k)) {
                self.rt.nack(d, Duration::ZERO).await;
                settled[i] = false;
                continue;
            }
            // the broker hears from the deliveries waiting their turn, too
            let waiting: Vec<&D> = queue.iter().map(|(_, d, _, _)| d).collect();
            let ticks = rt.broker_ticks(&waiting);
            let settle = async {
                match outcome {
                    InBatch::Failed(attempt, error) => {
                        match rt.after_failure(d.message(), &key, attempt, error) {
                            // an ordered message is retried in place, the rest of its key behind it
                            Ok(delay) => {
                                if rt.pause(delay).await {
                                    self.process(d).await
                                } else {
                                    self.rt.settle(d, Settle::Nack(Duration::ZERO)).await
                                }
                            }
                            Err(settle) => self.finish(d, &key, settle).await,
                        }
                    }
                    _ => self.process(d).await,
                }
            };
            settled[i] = tokio::select! {
                s = settle => s,
                never = ticks => match never {},
            };
            if let (Some(k), false) = (ordering, settled[i]) {
                given_back.insert(k);
            }
        }
        settled
    }

    async fn process(&self, d: D) -> bool {
        let rt = &self.rt;
        let key = match rt.key(d.message()) {
            Ok(key) => key,
            Err(reason) => {
                let reason = format!("poison message: {reason}");
                return self.dead_letter(d, None, Why::Poison, reason).await;
            }
        };
        // one ticker for every try: the broker hears from a held delivery
        let settle = tokio::select! {
            s = self.resolve(d.message(), &key) => s,
            never = rt.broker_tick(&d) => match never {},
        };
        self.finish(d, &key, settle).await
    }
}

impl<I: Inbox, H: InboxHandler<I::Tx, Message>> InboxProcess<I, H> {
    /// Settles `d` as `settle` says; an exhausted message's dead letter records its key.
    async fn finish<D: Delivery>(&self, d: D, key: &Key, settle: Settle) -> bool {
        match settle {
            Settle::DeadLetter(why @ Why::Exhausted, reason) => {
                self.dead_letter(d, Some(key), why, reason).await
            }
            Settle::DeadLetter(why, reason) => self.dead_letter(d, None, why, reason).await,
            settle => self.rt.settle(d, settle).await,
        }
    }

    /// Tries `msg` until it settles: a failing database is retried with a growing delay, and so
    /// is a failed run of an ordered message, with the delivery held.
    pub(crate) async fn resolve(&self, msg: &Message, key: &Key) -> Settle {
        let rt = &*self.rt;
        let mut failures = 0;
        loop {
            let go_on = match self.try_once(msg, key).await {
                Tried::Settle(settle) => return settle,
                Tried::Unavailable(what, e) => rt.unavailable(what, &e, &mut failures).await,
                Tried::Failed(attempt, error) => match rt.after_failure(msg, key, attempt, error) {
                    Ok(delay) => rt.pause(delay).await,
                    Err(settle) => return settle,
                },
            };
            if !go_on {
                return Settle::Nack(Duration::ZERO);
            }
        }
    }

    /// One transaction: the key, the position, the handler (for a new key), the commit.
    pub(crate) async fn try_once(&self, msg: &Message, key: &Key) -> Tried {
        let rt = &*self.rt;
        let mut tx = match self.inbox.begin().await {
            Ok(tx) => tx,
            Err(e) => return Tried::Unavailable("opening the inbox transaction", e),
        };
        // a concurrent duplicate waits here for the first transaction, then sees `false`
        let first = match self.inbox.first_time(&mut tx, key).await {
            Ok(first) => first,
            Err(e) => return Tried::Unavailable("the inbox insert", e),
        };
        // a partitioned log's position moves in the same transaction, duplicate or not
        if let Some(position) = &msg.position {
            match self.inbox.advance(&mut tx, position).await {
                Ok(()) => {}
                Err(e @ idemgate_core::Error::Fenced { .. }) => {
                    count!(rt, fenced);
                    tracing::warn!(error = %e, "position fenced; resuming from the stored one");
                    return Tried::Settle(Settle::Reposition);
                }
                Err(e) => return Tried::Unavailable("the position update", e),
            }
        }
        if !first {
            if msg.position.is_some()
                && let Err(e) = self.inbox.commit(tx).await
            {
                return Tried::Unavailable("the commit of the position", e);
            }
            count!(rt, duplicates);
            return Tried::Settle(Settle::Ack);
        }
        let attempt = rt.attempt(key, None, Some(msg));
        // a panic or a timeout of the handler is caught here: the transaction rolls back, the
        // lane lives on
        let ran = rt
            .run_handler(key, msg, attempt, self.handler.handle(&mut tx, msg))
            .await;
        if let Some(error) = rt.failure(ran) {
            drop(tx);
            return Tried::Failed(attempt, error);
        }
        match self.inbox.commit(tx).await {
            Ok(()) => {
                rt.forget(key);
                count!(rt, handled);
                Tried::Settle(Settle::Ack)
            }
            // nothing committed (the next try runs the handler again), or it did and the
            // error came after (the next try sees a duplicate)
            Err(e) => Tried::Unavailable("the commit", e),
        }
    }

    /// Dead-letters `d`, in a transaction that commits once the dead letter is stored: it
    /// records `key` (a copy of the event is then acked as a duplicate, not dead-lettered again)
    /// and moves a message's stored position past it (the partition goes on, and a restart does
    /// not dead-letter it again).
    pub(crate) async fn dead_letter<D: Delivery>(
        &self,
        d: D,
        key: Option<&Key>,
        why: Why,
        reason: String,
    ) -> bool {
        let rt = &self.rt;
        let position = d.message().position.clone();
        if key.is_none() && position.is_none() {
            return rt.dead_letter(d, why, reason).await;
        }
        // the broker hears from the delivery while a failing database is waited out: without
        // it, SQS shows the message again and, past its redrive budget, dead-letters it itself,
        // without the reason
        let moved = tokio::select! {
            m = self.dead_letter_tx(key, position.as_ref()) => m,
            never = rt.broker_tick(&d) => match never {},
        };
        let tx = match moved {
            Moved::Tx(tx) => tx,
            Moved::Settle(settle) => return rt.settle(d, settle).await,
        };
        if !rt.dead_letter(d, why, reason).await {
            return false;
        }
        if let Err(e) = self.inbox.commit(tx).await {
            tracing::warn!(error = %e, "the dead letter is stored, its key and position are not yet");
            self.record_dead_letter(key, position.as_ref()).await;
        }
        true
    }

    /// Records a stored dead letter's key and moves its position after their commit failed,
    /// trying every [`RECORD_RETRY`] until done: unrecorded, the key lets a copy of the event
    /// (or the partition, resuming from the stored position) be dead-lettered again, so this
    /// must win the race with a copy once the database is back. A copy recorded first, a fenced
    /// position or the consumer stopping ends it.
    async fn record_dead_letter(
        &self,
        key: Option<&Key>,
        position: Option<&idemgate_core::Position>,
    ) {
        let recorded = self
            .rt
            .until_recorded(|| async {
                let (tx, _) = self.moved_tx(key, position).await?;
                self.inbox.commit(tx).await
            })
            .await;
        match recorded {
            Ok(()) | Err(idemgate_core::Error::Fenced { .. }) => {}
            Err(e) => tracing::warn!(
                error = %e,
                key = ?key,
                "a stored dead letter stays unrecorded: a copy of it can be dead-lettered again"
            ),
        }
    }

    /// A transaction that records `key` (whether it is new) and moves `position`.
    async fn moved_tx(
        &self,
        key: Option<&Key>,
        position: Option<&idemgate_core::Position>,
    ) -> idemgate_core::Result<(I::Tx, bool)> {
        let mut tx = self.inbox.begin().await?;
        let fresh = match key {
            Some(key) => self.inbox.first_time(&mut tx, key).await?,
            None => true,
        };
        if let Some(position) = position {
            self.inbox.advance(&mut tx, position).await?;
        }
        Ok((tx, fresh))
    }

    /// Opens the dead letter's transaction: `key` recorded and the position moved, retried
    /// while the database fails. A copy of the event settled first, a fenced position and a
    /// database that stays away settle the delivery instead.
    async fn dead_letter_tx(
        &self,
        key: Option<&Key>,
        position: Option<&idemgate_core::Position>,
    ) -> Moved<I::Tx> {
        let rt = &self.rt;
        let mut failures = 0;
        loop {
            match self.moved_tx(key, position).await {
                Ok((tx, true)) => return Moved::Tx(tx),
                Ok((tx, false)) => {
                    // another copy of the event was dead-lettered (or handled) first
                    if let Err(e) = self.inbox.commit(tx).await {
                        tracing::warn!(error = %e, "the commit of the position failed");
                        return Moved::Settle(Settle::Nack(rt.cfg.retry_delay));
                    }
                    count!(rt, duplicates);
                    return Moved::Settle(Settle::Ack);
                }
                Err(e @ idemgate_core::Error::Fenced { .. }) => {
                    count!(rt, fenced);
                    tracing::warn!(error = %e, "position fenced; resuming from the stored one");
                    return Moved::Settle(Settle::Reposition);
                }
                Err(e) => {
                    if !rt
                        .unavailable("the position update", &e, &mut failures)
                        .await
                    {
                        return Moved::Settle(Settle::Nack(Duration::ZERO));
                    }
                }
            }
        }
    }

    /// One transaction for `batch`: its keys in one statement, then in order each message's
    /// position and, for a new one, its handler under a savepoint of its own; then one commit.
    ///
    /// A failing handler (an error, a panic, the timeout) rolls back to its savepoint and its
    /// key is un-recorded: the others commit, and it is `Failed`. The later messages of its
    /// ordering key, and the later copies of its own key, are not run (`Later`): the ordering
    /// key keeps its order, and no copy is acked while the event is not done. `Err` says why
    /// nothing committed: the database failed (a savepoint that cannot be rolled back to is the
    /// whole transaction failing), or the inbox keeps no savepoints and a handler failed.
    pub(crate) async fn run_batch<D: Delivery>(
        &self,
        batch: &[&D],
        keys: &[Key],
    ) -> std::result::Result<Vec<InBatch>, String> {
        let text = |e: idemgate_core::Error| e.to_string();
        let mut tx = self.inbox.begin().await.map_err(text)?;
        let firsts = self
            .inbox
            .first_time_many(&mut tx, keys)
            .await
            .map_err(text)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        // ordering keys (hashed) whose message failed in this batch
        let hasher = RandomState::new();
        let mut blocked: HashSet<u64> = HashSet::new();
        // keys this batch leaves unrecorded: a later copy of one (a publish-side duplicate, or
        // the same message received again, as SQS does once a visibility timeout passes) is
        // not a duplicate of anything committed, and acking it could delete the message
        let mut unrecorded: HashSet<&Key> = HashSet::new();
        for (n, ((d, key), first)) in (0u32..).zip(batch.iter().zip(keys).zip(firsts)) {
            let msg = d.message();
            let ordering = msg.ordering_key.as_ref().map(|k| hasher.hash_one(k));
            if ordering.is_some_and(|k| blocked.contains(&k)) || unrecorded.contains(key) {
                if first {
                    self.inbox.forget(&mut tx, key).await.map_err(text)?;
                }
                unrecorded.insert(key);
                outcomes.push(InBatch::Later);
                continue;
            }
            if !first {
                if let Some(position) = &msg.position {
                    self.inbox.advance(&mut tx, position).await.map_err(text)?;
                }
                outcomes.push(InBatch::Duplicate);
                continue;
            }
            let isolated = self.inbox.savepoint(&mut tx, n).await.map_err(text)?;
            if let Some(position) = &msg.position {
                self.inbox.advance(&mut tx, position).await.map_err(text)?;
            }
            let attempt = self.rt.attempt(key, None, Some(msg));
            // a panic or a timeout is caught here
            let ran = self
                .rt
                .run_handler(key, msg, attempt, self.handler.handle(&mut tx, msg))
                .await;
            let Some(error) = self.rt.failure(ran) else {
                outcomes.push(InBatch::New);
                continue;
            };
            if !isolated {
                return Err(error.error);
            }
            self.inbox.rollback_to(&mut tx, n).await.map_err(text)?;
            self.inbox.forget(&mut tx, key).await.map_err(text)?;
            if let Some(k) = ordering {
                blocked.insert(k);
            }
            unrecorded.insert(key);
            outcomes.push(InBatch::Failed(attempt, error));
        }
        self.inbox.commit(tx).await.map_err(text)?;
        Ok(outcomes)
    }
}

/// What opening a dead letter's transaction came to.
enum Moved<Tx> {
    /// The key is recorded and the position moved: store the dead letter, then commit.
    Tx(Tx),
    /// Settle the delivery so instead.
    Settle(Settle),
}
