//! Group commit for the store: claims and completions ready together go as one call.

use super::*;
/// Batches requests that are ready at the same time into one call of the store (`claim_many`,
/// `complete_many`): group commit, with no added latency when only one is ready.
pub(crate) struct Batcher<Req, Res> {
    pub(crate) tx: mpsc::Sender<(Req, oneshot::Sender<idemgate_core::Result<Res>>)>,
}

impl<Req, Res> Clone for Batcher<Req, Res> {
    fn clone(&self) -> Self {
        Batcher {
            tx: self.tx.clone(),
        }
    }
}

impl<Req: Send + 'static, Res: Send + 'static> Batcher<Req, Res> {
    pub(crate) fn spawn<F, Fut>(batch: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + 'static,
        Fut: Future<Output = idemgate_core::Result<Vec<idemgate_core::Result<Res>>>> + Send,
    {
        let (tx, mut rx) = mpsc::channel::<(Req, oneshot::Sender<_>)>(batch * 2);
        tokio::spawn(async move {
            let mut pending = Vec::with_capacity(batch);
            while rx.recv_many(&mut pending, batch).await > 0 {
                let (reqs, waiters): (Vec<_>, Vec<_>) = pending.drain(..).unzip();
                match run(reqs).await {
                    Ok(results) => {
                        for (w, r) in waiters.into_iter().zip(results) {
                            let _ = w.send(r);
                        }
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        for w in waiters {
                            let _ = w.send(Err(idemgate_core::Error::Unavailable {
                                backend: "store",
                                source: msg.clone().into(),
                            }));
                        }
                    }
                }
            }
        });
        Batcher { tx }
    }

    pub(crate) async fn call(&self, req: Req) -> idemgate_core::Result<Res> {
        let (tx, rx) = oneshot::channel();
        let gone = || idemgate_core::Error::Unavailable {
            backend: "store",
            source: "the store batcher stopped".into(),
        };
        self.tx.send((req, tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

/// The claim batcher: `claim_many` (or `claim` for one).
pub(crate) fn claimer<St: Store>(
    store: Arc<St>,
    batch: usize,
    opts: ClaimOptions,
) -> Batcher<(Key, Option<Fingerprint>), Claim> {
    Batcher::spawn(batch, move |claims: Vec<(Key, Option<Fingerprint>)>| {
        let store = Arc::clone(&store);
        async move {
            let claimed = if let [(key, fp)] = &claims[..] {
                vec![store.claim(key, fp.as_ref(), &opts).await?]
            } else {
                store.claim_many(&claims, &opts).await?
            };
            Ok(claimed.into_iter().map(Ok).collect())
        }
    })
}

/// The completion batcher: `complete_many` (or `complete` for one), each result its own.
pub(crate) fn completer<St: Store>(
    store: Arc<St>,
    batch: usize,
    retention: Duration,
) -> Batcher<(Lease, Outcome), ()> {
    Batcher::spawn(batch, move |done: Vec<(Lease, Outcome)>| {
        let store = Arc::clone(&store);
        async move {
            if let [(lease, outcome)] = &done[..] {
                return match store.complete(lease, outcome, retention).await {
                    Err(e @ idemgate_core::Error::LeaseLost) => Ok(vec![Err(e)]),
                    other => other.map(|()| vec![Ok(())]),
                };
            }
            store.complete_many(&done, retention).await
        }
    })
}
