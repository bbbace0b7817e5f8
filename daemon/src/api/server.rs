//! The HTTP server under the API: hyper's HTTP/1 with limits a hostile local process cannot
//! starve. Any process on the machine can open connections to 127.0.0.1, so:
//! - request headers must arrive within [`HEADER_TIMEOUT`], and a request (its body read and
//!   its handler run, not a streamed response) must finish within [`REQUEST_TIMEOUT`];
//! - at most [`MAX_CONNECTIONS`] connections are open; when a new one arrives at the cap, the
//!   oldest connection that never sent a complete request is closed to make room (a half-sent
//!   request is the cheap attack), else the oldest one idle between requests (a streamed
//!   response such as an event stream counts as idle; its client resumes), and only if every
//!   connection is in the middle of a request is the new one turned away.
//!
//! A graceful stop closes idle connections, lets in-flight requests finish and waits for them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::response::IntoResponse;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

/// Time allowed for a request's headers to arrive.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time allowed to read a request's body and run its handler.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 256;

struct Conn {
    id: u64,
    /// Set once a complete request has arrived.
    served: Arc<AtomicBool>,
    /// Requests being handled now.
    busy: Arc<AtomicUsize>,
    abort: tokio::task::AbortHandle,
    opened: Instant,
}

/// Counts a request as finished when dropped (also when its future is cancelled).
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops gracefully.
pub async fn run(
    listener: TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let open: Arc<Mutex<VecDeque<Conn>>> = Arc::new(Mutex::new(VecDeque::new()));
    let next_id = AtomicU64::new(0);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut turned_away = 0u64;
    loop {
        let (tcp, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: wait instead of spinning.
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        while tasks.try_join_next().is_some() {}
        {
            let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
            open.retain(|c| !c.abort.is_finished());
            if open.len() >= MAX_CONNECTIONS {
                // Make room: the oldest connection still waiting for its first request, else
                // the oldest one between requests.
                let victim = open
                    .iter()
                    .position(|c| !c.served.load(Ordering::Relaxed))
                    .or_else(|| {
                        open.iter()
                            .position(|c| c.busy.load(Ordering::Relaxed) == 0)
                    });
                match victim {
                    Some(i) => {
                        if let Some(c) = open.remove(i) {
                            tracing::debug!(conn = c.id, age = ?c.opened.elapsed(), "API connection closed to make room");
                            c.abort.abort();
                        }
                    }
                    None => {
                        turned_away += 1;
                        if turned_away.is_power_of_two() {
                            tracing::warn!(
                                turned_away,
                                limit = MAX_CONNECTIONS,
                                "API at its connection limit; turning connections away"
                            );
                        }
                        continue; // dropping `tcp` closes it
                    }
                }
            }
        }
        // Small JSON replies: send them now rather than waiting to coalesce (Nagle).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::trace!(error = %e, "TCP_NODELAY not set");
        }
        let served = Arc::new(AtomicBool::new(false));
        let busy = Arc::new(AtomicUsize::new(0));
        let (flag, count) = (served.clone(), busy.clone());
        let app = app.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                flag.store(true, Ordering::Relaxed);
                count.fetch_add(1, Ordering::Relaxed);
                let done = Busy(count.clone());
                let app = app.clone();
                async move {
                    let _done = done;
                    let req = req.map(axum::body::Body::new);
                    let resp = match tokio::time::timeout(REQUEST_TIMEOUT, app.oneshot(req)).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(never)) => match never {},
                        Err(_) => (
                            axum::http::StatusCode::REQUEST_TIMEOUT,
                            axum::Json(serde_json::json!({
                                "code": "timeout",
                                "message": format!("the request took over {REQUEST_TIMEOUT:?}"),
                            })),
                        )
                            .into_response(),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
        let mut stop = stop_rx.clone();
        let abort = tasks.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(tcp), service)
                // The automerge-repo endpoint upgrades to a WebSocket.
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => { let _ = r; }
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        open.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(Conn {
                id,
                served,
                busy,
                abort,
                opened: Instant::now(),
            });
    }
    let _ = stop_tx.send(true);
    while tasks.join_next().await.is_some() {}
    Ok(())
}
