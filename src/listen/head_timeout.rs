//! Two clocks on an HTTP/1 connection, where hyper has one.
//!
//! hyper's `header_read_timeout` runs from the moment the connection waits for a request head,
//! so an idle keep-alive connection is closed after the same time a client has to send its
//! headers. A peer that keeps a pooled connection open (the upstream delivering call events)
//! then races the close: its next request goes out on a connection the gateway is closing, and
//! is lost. So hyper's timer is given the (longer) keep-alive idle timeout, and this wrapper
//! enforces the header read timeout itself: from a request head's first byte until the blank
//! line that ends it. A slow client that dribbles its headers is still cut off; an idle
//! connection waits its full keep-alive time.
//!
//! A request head starts with the first byte read after a response began (or at the start of
//! the connection), and ends at `\r\n\r\n`. HTTP/2 connections (the client preface) are left to
//! hyper's own HTTP/2 handling.
//!
//! When the listener runs short of connections ([`Pressure`]), a connection that has been idle,
//! or inside one request head, for [`PRESSED_WAIT`] is closed: idle keep-alive connections and
//! clients that trickle their headers cannot hold the connection cap against new clients.
//!
//! While it reads a head, it also refuses the request-smuggling shape hyper tolerates (it drops
//! `Content-Length` when `Transfer-Encoding` is present): a head carrying both has the colon of
//! the second one replaced, so hyper's parser answers `400 Bad Request` and closes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};

/// How long a connection may stay idle, or inside a request head, while the listener is short
/// of connections.
pub const PRESSED_WAIT: Duration = Duration::from_secs(2);

/// Whether a listener is short of connections: at most `reserve` of its permits are left.
#[derive(Debug, Clone)]
pub struct Pressure {
    pub open: Arc<Semaphore>,
    pub reserve: usize,
}

impl Pressure {
    fn high(&self) -> bool {
        self.open.available_permits() <= self.reserve
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for a request's first byte (idle: hyper's keep-alive timer runs).
    Idle,
    /// Inside a request head: `matched` bytes of `\r\n\r\n` seen at its end so far.
    Head { matched: u8 },
    /// After the head (body, handling, answer) until the next response begins.
    Rest,
    /// HTTP/2 (or the check is off): nothing to time here.
    Off,
}

/// See the module docs.
pub struct HeadTimeout<IO> {
    io: IO,
    deadline: Pin<Box<Sleep>>,
    limit: Duration,
    state: State,
    /// Bytes of the connection's start compared with the HTTP/2 preface.
    seen: usize,
    framing: Framing,
    /// When the connection went idle or began its current head.
    since: Instant,
    /// The listener's pressure, and the timer that checks it.
    pressure: Option<(Pressure, Pin<Box<Sleep>>)>,
}

/// The framing headers of the head being read.
#[derive(Debug, Default)]
struct Framing {
    /// At the start of a header line.
    line_start: bool,
    /// The header name being read (lower case; long names are cut, they match nothing).
    name: [u8; 17],
    name_len: usize,
    in_name: bool,
    content_length: bool,
    transfer_encoding: bool,
}

impl Framing {
    /// Feed one byte of a head; `true` when this byte (a header's colon) must be spoiled.
    fn feed(&mut self, byte: u8) -> bool {
        if byte == b'\n' {
            self.line_start = true;
            self.in_name = false;
            return false;
        }
        if self.line_start {
            self.line_start = false;
            self.in_name = true;
            self.name_len = 0;
        }
        if !self.in_name {
            return false;
        }
        if byte == b':' {
            self.in_name = false;
            let name = &self.name[..self.name_len];
            let (cl, te) = (name == b"content-length", name == b"transfer-encoding");
            let spoil = (cl && self.transfer_encoding) || (te && self.content_length);
            self.content_length |= cl;
            self.transfer_encoding |= te;
            return spoil;
        }
        if self.name_len < self.name.len() {
            self.name[self.name_len] = byte.to_ascii_lowercase();
            self.name_len += 1;
        } else {
            self.in_name = false; // longer than any name we look for
        }
        false
    }
}

impl<IO> HeadTimeout<IO> {
    /// Wrap `io`: each request head must arrive within `limit` of its first byte.
    pub fn new(io: IO, limit: Duration) -> Self {
        HeadTimeout {
            io,
            deadline: Box::pin(tokio::time::sleep(limit)),
            limit,
            state: State::Idle,
            seen: 0,
            framing: Framing::default(),
            since: Instant::now(),
            pressure: None,
        }
    }

    /// Also close the connection after [`PRESSED_WAIT`] idle or in a head while `pressure` is
    /// high.
    pub fn with_pressure(mut self, pressure: Pressure) -> Self {
        self.pressure = Some((pressure, Box::pin(tokio::time::sleep(PRESSED_WAIT))));
        self
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for HeadTimeout<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let read = &mut buf.filled_mut()[before..];
            if this.seen < PREFACE.len() && this.state != State::Off {
                let n = read.len().min(PREFACE.len() - this.seen);
                if read[..n] != PREFACE[this.seen..this.seen + n] {
                    this.seen = PREFACE.len(); // not HTTP/2: stop looking
                } else {
                    this.seen += n;
                    if this.seen == PREFACE.len() {
                        this.state = State::Off;
                    }
                }
            }
            let mut at = 0;
            while at < read.len() {
                match this.state {
                    State::Off | State::Rest => break,
                    State::Idle => {
                        this.since = Instant::now();
                        this.deadline.as_mut().reset(this.since + this.limit);
                        this.framing = Framing::default();
                        this.state = State::Head {
                            matched: u8::from(read[at] == b'\r'),
                        };
                        at += 1;
                    }
                    State::Head { matched } => {
                        if matched == 0 && !this.framing.in_name && !this.framing.line_start {
                            // Inside the request line or a header's value: only a `\r` (the end
                            // of the head may start there) or a `\n` matters, so skip to it.
                            match memchr::memchr2(b'\r', b'\n', &read[at..]) {
                                Some(skip) => at += skip,
                                None => break,
                            }
                        }
                        let byte = &mut read[at];
                        if this.framing.feed(*byte) {
                            *byte = b'(';
                        }
                        let byte = *byte;
                        let expected = b"\r\n\r\n"[usize::from(matched)];
                        let matched = if byte == expected {
                            matched + 1
                        } else {
                            u8::from(byte == b'\r')
                        };
                        this.state = if matched == 4 {
                            State::Rest
                        } else {
                            State::Head { matched }
                        };
                        at += 1;
                    }
                }
            }
            return polled;
        }
        if polled.is_pending()
            && matches!(this.state, State::Head { .. })
            && this.deadline.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request head was not received in time",
            )));
        }
        if polled.is_pending()
            && matches!(this.state, State::Idle | State::Head { .. })
            && let Some((pressure, check)) = &mut this.pressure
        {
            // Woken now and then to look: a connection that waits is closed when others
            // need its place.
            while check.as_mut().poll(cx).is_ready() {
                if pressure.high() && this.since.elapsed() >= PRESSED_WAIT {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "closed to make room: the listener is short of connections",
                    )));
                }
                check.as_mut().reset(Instant::now() + PRESSED_WAIT / 2);
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for HeadTimeout<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // A response has begun: the next byte read starts the next request's head.
        if this.state != State::Off && !data.is_empty() {
            if this.state != State::Idle {
                this.since = Instant::now();
            }
            this.state = State::Idle;
        }
        Pin::new(&mut this.io).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.state != State::Off && bufs.iter().any(|b| !b.is_empty()) {
            if this.state != State::Idle {
                this.since = Instant::now();
            }
            this.state = State::Idle;
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_head_must_arrive_in_time_but_idle_waits_are_free() {
        let (client, server) = tokio::io::duplex(1024);
        let mut server = HeadTimeout::new(server, Duration::from_secs(1));
        let mut client = client;
        let mut buf = [0u8; 256];
        // Idle for a long time: no timeout (hyper's keep-alive timer is in charge).
        let idle = tokio::time::timeout(Duration::from_secs(30), server.read(&mut buf)).await;
        assert!(idle.is_err(), "an idle read is not cut off");
        // A whole head in time.
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let n = server.read(&mut buf).await.unwrap();
        assert_eq!(n, 27);
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").await.unwrap();
        // The next head starts and stalls: cut off after the limit.
        client.write_all(b"GET / HTTP/1.1\r\nho").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 18);
        let stalled = server.read(&mut buf).await;
        assert_eq!(stalled.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_head_with_both_framing_headers_is_spoiled_for_the_parser() {
        for (head, spoiled) in [
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length( 5\r\n\r\n",
            ),
            (
                "POST / HTTP/1.1\r\ncontent-length: 5\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n",
                "POST / HTTP/1.1\r\ncontent-length: 5\r\nhost: x\r\ntransfer-encoding( chunked\r\n\r\n",
            ),
            // Lines may end with a bare `\n`.
            (
                "POST / HTTP/1.1\ntransfer-encoding: chunked\ncontent-length: 5\r\n\r\n",
                "POST / HTTP/1.1\ntransfer-encoding: chunked\ncontent-length( 5\r\n\r\n",
            ),
            (
                "POST / HTTP/1.1\r\ncontent-length: 5\r\nx-transfer-encoding: y\r\n\r\n",
                "POST / HTTP/1.1\r\ncontent-length: 5\r\nx-transfer-encoding: y\r\n\r\n",
            ),
        ] {
            // In pieces of every size: a name, a value or the head's end may be cut between two
            // reads.
            for size in 1..=head.len() {
                let (mut client, server) = tokio::io::duplex(1024);
                let mut server = HeadTimeout::new(server, Duration::from_secs(1));
                let mut out = Vec::new();
                let mut buf = [0u8; 1024];
                for piece in head.as_bytes().chunks(size) {
                    client.write_all(piece).await.unwrap();
                    let n = server.read(&mut buf).await.unwrap();
                    out.extend_from_slice(&buf[..n]);
                }
                // What follows the head (a body that looks like a header) is passed through untouched.
                client.write_all(b"content-length: 1\r\n").await.unwrap();
                drop(client);
                server.read_to_end(&mut out).await.unwrap();
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    format!("{spoiled}content-length: 1\r\n"),
                    "pieces of {size}"
                );
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn under_pressure_idle_and_trickling_connections_are_closed() {
        let open = Arc::new(Semaphore::new(10));
        let pressure = Pressure {
            open: open.clone(),
            reserve: 1,
        };
        let mut buf = [0u8; 256];
        // Plenty of room: an idle connection waits.
        let (_idle_client, server) = tokio::io::duplex(1024);
        let mut idle =
            HeadTimeout::new(server, Duration::from_secs(10)).with_pressure(pressure.clone());
        let waited = tokio::time::timeout(Duration::from_secs(30), idle.read(&mut buf)).await;
        assert!(waited.is_err(), "not closed while there is room");
        // Short of connections: the idle one goes within a check's period.
        let _held = open.clone().acquire_many_owned(9).await.unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf)).await;
        assert_eq!(closed.unwrap().unwrap_err().kind(), io::ErrorKind::TimedOut);
        // A head trickled byte by byte goes after PRESSED_WAIT, long before its own limit.
        let (mut client, server) = tokio::io::duplex(1024);
        let mut slow = HeadTimeout::new(server, Duration::from_secs(10)).with_pressure(pressure);
        let started = Instant::now();
        let result = loop {
            client.write_all(b"G").await.unwrap();
            if let Err(e) = slow.read(&mut buf).await {
                break e;
            }
            // Waiting for the next byte, as hyper does.
            if let Ok(Err(e)) =
                tokio::time::timeout(Duration::from_millis(900), slow.read(&mut buf)).await
            {
                break e;
            }
        };
        assert_eq!(result.kind(), io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn http2_is_left_alone() {
        let (mut client, server) = tokio::io::duplex(1024);
        let mut server = HeadTimeout::new(server, Duration::from_secs(1));
        let mut buf = [0u8; 256];
        client
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00")
            .await
            .unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 26);
        server.write_all(b"\x00\x00\x00").await.unwrap();
        client.write_all(b"\x00\x01").await.unwrap();
        assert_eq!(server.read(&mut buf).await.unwrap(), 2);
        let quiet = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf)).await;
        assert!(quiet.is_err(), "no head timer on HTTP/2");
    }
}
