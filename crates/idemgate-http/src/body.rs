//! The bodies the layer hands on: any `http_body::Body` in, one boxed body out.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;

use crate::BoxError;

/// The response body of the layer's service: the wrapped service's own body, a stored response
/// replayed, or a problem document.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// `bytes` as a [`ResponseBody`].
pub(crate) fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Any body as a [`ResponseBody`].
pub(crate) fn boxed<B>(body: B) -> ResponseBody
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

pin_project_lite::pin_project! {
    /// The request body the layer hands to the service it wraps: the bytes of a guarded
    /// request (read in full to fingerprint it), or the original body of a request it passes
    /// through. Any service generic over its request body takes it (axum's `Router` does).
    #[derive(Debug)]
    pub struct GuardedBody<B> {
        #[pin]
        inner: Inner<B>,
    }
}

pin_project_lite::pin_project! {
    #[project = InnerProj]
    #[derive(Debug)]
    enum Inner<B> {
        Full { bytes: Option<Bytes> },
        Stream { #[pin] body: B },
    }
}

impl<B> GuardedBody<B> {
    pub(crate) fn full(bytes: Bytes) -> Self {
        GuardedBody {
            inner: Inner::Full {
                bytes: Some(bytes).filter(|b| !b.is_empty()),
            },
        }
    }

    pub(crate) fn stream(body: B) -> Self {
        GuardedBody {
            inner: Inner::Stream { body },
        }
    }
}

impl<B> HttpBody for GuardedBody<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project().inner.project() {
            InnerProj::Full { bytes } => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            InnerProj::Stream { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Full { bytes } => bytes.is_none(),
            Inner::Stream { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Full { bytes } => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            Inner::Stream { body } => body.size_hint(),
        }
    }
}
