//! HTTP/1.1 to one daemon's API listener: hyper's client connection over a loopback TCP
//! stream, a few idle connections kept for reuse, and a retry only where it cannot repeat a
//! write (the request was never sent).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, Response, header};
use hyper_util::rt::TokioIo;

/// Time allowed to open a connection to the daemon.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection older than this is not reused: the daemon closes connections that stay
/// idle past its header timeout (5 s), and one about to close would fail the request.
const REUSE_WITHIN: Duration = Duration::from_secs(2);
/// Idle connections kept.
const MAX_IDLE: usize = 8;

/// Why a request got no response.
#[derive(Debug)]
pub(super) enum SendError {
    /// No connection could be opened: nothing was sent (the daemon may have moved).
    Connect(String),
    /// The request was sent, or may have been, and the connection failed.
    Failed(String),
}

/// One daemon's listener, its token, and the connections open to it.
pub(super) struct Endpoint {
    pub addr: String,
    pub token: String,
    idle: Mutex<Vec<(SendRequest<Full<Bytes>>, Instant)>>,
}

impl Endpoint {
    pub fn new(addr: String, token: String) -> Endpoint {
        Endpoint {
            addr,
            token,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn request(
        &self,
        method: &Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &Bytes,
    ) -> Result<Request<Full<Bytes>>, SendError> {
        let mut b = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::HOST, &self.addr)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token));
        if !body.is_empty() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(body.clone()))
            .map_err(|e| SendError::Failed(format!("cannot make the request: {e}")))
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, SendError> {
        let fail = |e: String| SendError::Connect(e);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.addr))
            .await
            .map_err(|_| fail("timed out connecting".into()))?
            .map_err(|e| fail(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let (send, conn) = http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| fail(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(send)
    }

    /// An idle connection young enough to reuse, ready for a request.
    async fn reuse(&self) -> Option<SendRequest<Full<Bytes>>> {
        loop {
            let (mut s, at) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if at.elapsed() < REUSE_WITHIN && !s.is_closed() && s.ready().await.is_ok() {
                return Some(s);
            }
        }
    }

    /// Sends a request; returns the response and the connection it came on (give it back with
    /// [`Endpoint::put_back`] once the body is read).
    pub async fn send(
        &self,
        method: &Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &Bytes,
    ) -> Result<(Response<Incoming>, SendRequest<Full<Bytes>>), SendError> {
        let mut req = self.request(method, path, headers, body)?;
        if let Some(mut s) = self.reuse().await {
            match s.try_send_request(req).await {
                Ok(resp) => return Ok((resp, s)),
                // The connection closed before the request went out: send it on a new one.
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(SendError::Failed(e.into_error().to_string())),
                },
            }
        }
        let mut s = self.connect().await?;
        match s.send_request(req).await {
            Ok(resp) => Ok((resp, s)),
            Err(e) => Err(SendError::Failed(e.to_string())),
        }
    }

    /// Keeps a connection whose response was read whole, for the next request.
    pub fn put_back(&self, s: SendRequest<Full<Bytes>>) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((s, Instant::now()));
        }
    }
}
