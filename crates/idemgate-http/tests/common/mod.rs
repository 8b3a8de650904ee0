//! Response bodies the tests stream.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};

use axum::body::Bytes;

/// `n` zero bytes in 64 KiB frames of one static buffer (producing them allocates nothing);
/// counts one into `done`, if given, at the body's end.
pub(crate) struct Zeros {
    left: u64,
    done: Option<Arc<AtomicU32>>,
}

impl Zeros {
    pub(crate) fn new(n: u64, done: Option<Arc<AtomicU32>>) -> Self {
        Zeros { left: n, done }
    }
}

impl http_body::Body for Zeros {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let n = self.left.min(ZEROS.len() as u64);
        self.left -= n;
        if n == 0
            && let Some(done) = self.done.take()
        {
            done.fetch_add(1, Ordering::SeqCst);
        }
        let frame = &ZEROS[..usize::try_from(n).unwrap()];
        Poll::Ready((n > 0).then(|| Ok(http_body::Frame::data(Bytes::from_static(frame)))))
    }
}
