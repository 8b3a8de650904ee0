//! `idemgate bench cache --store URL`: replays of a hot key set, through `CachedStore` and
//! straight to the store, in the same rounds.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use idemgate::core::{CachedStore, Claim, ClaimOptions, Fingerprint, Key, Outcome, Store};

use crate::{BoxError, median};

/// `bench cache`: the replay rate of a hot key set with and without `CachedStore`.
#[derive(Debug, Args)]
pub struct CacheBench {
    /// The store: `redis://…`, `redis+cluster://…`, `postgres://…`, `mysql://…`, `sqlite:PATH`.
    #[arg(long)]
    store: String,
    /// Hot keys, each completed once and then replayed.
    #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    keys: u64,
    /// Bytes of each stored outcome's body.
    #[arg(long, default_value_t = 1_024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1_048_576))]
    body: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 32, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4_096))]
    clients: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Rounds; each figure is the median of its rounds, the ratio the median of the rounds'.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
}

/// Runs `bench cache`.
pub(crate) async fn run(b: CacheBench) -> Result<ExitCode, BoxError> {
    if !(b.seconds > 0.0 && b.seconds <= 3600.0) {
        return Err("--seconds must be in (0, 3600]".into());
    }
    let store = idemgate::open(&b.store).await?;
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let keys: Arc<[Key]> = (0..b.keys)
        .map(|i| Key::new("bench-cache", format!("{}-{run}-{i}", std::process::id())))
        .collect::<Result<Vec<_>, _>>()?
        .into();
    let fp = Fingerprint::of(b"bench");
    let outcome = Outcome::new(200, vec![b'x'; b.body]);
    for key in keys.iter() {
        match store.claim(key, Some(&fp), &ClaimOptions::DEFAULT).await? {
            Claim::Acquired(lease) => {
                store
                    .complete(&lease, &outcome, Duration::from_secs(3_600))
                    .await?
            }
            other => return Err(format!("{key}: expected a fresh key, got {other:?}").into()),
        }
    }
    let cached = CachedStore::new(store.clone()).with_ttl(Duration::from_secs(3_600));
    let seconds = Duration::from_secs_f64(b.seconds);
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for round in 0..b.rounds {
        // alternate which goes first, so a slow phase of the machine hits both alike
        let (d, c) = if round % 2 == 0 {
            let d = replays(&store, &keys, fp, b.clients, seconds).await?;
            (d, replays(&cached, &keys, fp, b.clients, seconds).await?)
        } else {
            let c = replays(&cached, &keys, fp, b.clients, seconds).await?;
            (replays(&store, &keys, fp, b.clients, seconds).await?, c)
        };
        direct.push(d);
        through.push(c);
    }
    let ratio = median(direct.iter().zip(&through).map(|(d, c)| c / d));
    println!(
        "{} hot keys, {}-byte outcomes, {} clients, {} rounds of {:.1} s",
        b.keys, b.body, b.clients, b.rounds, b.seconds
    );
    println!("{:<34} {:>14}", "replays of a hot key set", "replays/s");
    println!(
        "{:<34} {:>14.0}",
        "the store",
        median(direct.iter().copied())
    );
    println!(
        "{:<34} {:>14.0}",
        "CachedStore over the store",
        median(through.iter().copied())
    );
    println!("{:<34} {:>13.1}x", "cached / uncached", ratio);
    Ok(ExitCode::SUCCESS)
}

static RUN: AtomicU64 = AtomicU64::new(0);

/// Replays keys round-robin on `clients` tasks for `time`; replays per second. Anything but a
/// replay of the stored outcome is an error.
async fn replays<S: Store + Clone>(
    store: &S,
    keys: &Arc<[Key]>,
    fp: Fingerprint,
    clients: usize,
    time: Duration,
) -> Result<f64, BoxError> {
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + time;
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (store, keys, next) = (store.clone(), Arc::clone(keys), Arc::clone(&next));
            tokio::spawn(async move {
                let len = keys.len() as u64;
                while Instant::now() < deadline {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let key = &keys[usize::try_from(i % len).unwrap_or(0)];
                    match store.claim(key, Some(&fp), &ClaimOptions::DEFAULT).await? {
                        Claim::Completed(_) => {}
                        other => {
                            return Err::<_, BoxError>(
                                format!("{key}: expected a replay, got {other:?}").into(),
                            );
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    Ok(next.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64())
}
