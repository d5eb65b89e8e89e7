//! Time limits on the admin API's connections beyond the request header's (see
//! `super::serve`): a request's body must arrive whole within [`BODY_TIMEOUT`], and a
//! response the client takes nothing of for [`WRITE_STALL`] ends its connection. Without them
//! a client sending a body one byte at a time, or pipelining requests and never reading the
//! answers, would hold one of the API's few connection slots for as long as it liked.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How long a request's body may take to arrive whole once its header is in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request body taken, in bytes (the API's bodies are a few bytes of JSON).
pub const MAX_BODY: usize = 64 * 1024;
/// How long a response may wait with no byte of it taken by the client.
pub const WRITE_STALL: Duration = Duration::from_secs(10);

/// Middleware: reads the request's body whole, within [`BODY_TIMEOUT`] and [`MAX_BODY`],
/// before the route (and the guard) see the request. Answers 408 when the body is late, 400
/// when it is too long or cannot be read.
pub async fn whole_body(request: Request, next: Next) -> Response {
    let (parts, body) = request.into_parts();
    match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(e)) => refuse(
            StatusCode::BAD_REQUEST,
            format!("the request body (at most {MAX_BODY} bytes) could not be read: {e}"),
        ),
        Err(_) => refuse(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request body did not arrive within {}",
                humantime::format_duration(BODY_TIMEOUT)
            ),
        ),
    }
}

fn refuse(code: StatusCode, why: String) -> Response {
    (code, axum::Json(serde_json::json!({ "error": why }))).into_response()
}

/// A connection whose writes fail with `TimedOut` once one has waited `stall` with nothing
/// taken by the peer; reads pass through.
pub struct WriteStall<IO> {
    io: IO,
    stall: Duration,
    /// Armed by the first write that waits; disarmed by any write that goes through.
    since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> WriteStall<IO> {
    /// `io` with writes limited to `stall` without progress (the API uses [`WRITE_STALL`]).
    pub fn new(io: IO, stall: Duration) -> Self {
        WriteStall {
            io,
            stall,
            since: None,
        }
    }

    fn watch<T>(
        &mut self,
        polled: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.since = None;
            return polled;
        }
        let stall = self.stall;
        let timer = (self.since).get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took nothing of the response for {}",
                    humantime::format_duration(stall)
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for WriteStall<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for WriteStall<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(polled, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_write_nobody_takes_fails_after_the_stall_and_one_taken_goes_on() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        // A stall of 1 s against a reader taking 16 bytes every 200 ms: each wait is a fifth
        // of the stall, and the whole write takes four times it.
        let stall = Duration::from_secs(1);
        let mut conn = WriteStall::new(ours, stall);
        conn.write_all(&[7; 64])
            .await
            .expect("the pipe takes 64 bytes");
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(Duration::from_secs(5), conn.write_all(&[7; 64]))
            .await
            .expect("the stalled write never failed")
            .expect_err("a write nobody takes must fail");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= stall);

        // A peer that takes bytes, however slowly, keeps the connection.
        let reader = tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut buf = [0; 16];
            let mut n = 0;
            while n < 64 + 256 {
                tokio::time::sleep(Duration::from_millis(200)).await;
                n += theirs.read(&mut buf).await.expect("read");
            }
        });
        let mut conn = WriteStall::new(conn.io, stall);
        conn.write_all(&[7; 256])
            .await
            .expect("a write the peer takes slowly must go on");
        reader.await.expect("reader");
    }
}
