//! LAN discovery over mDNS: advertises `_tandem._udp.local.` with our NodeId and port in TXT
//! records and browses for others. mDNS is untrusted: a discovery only suggests addresses for
//! a NodeId, the TLS handshake proves the identity, and membership decides what it gets. A
//! discovered non-member is only listed as seen nearby.

use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use std::net::{IpAddr, SocketAddr};
use tandem_crdt::NodeId;

/// The service type tandem advertises.
pub const SERVICE: &str = "_tandem._udp.local.";

/// A running advertiser and browser.
pub(crate) struct Discovery {
    daemon: ServiceDaemon,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

/// Called with each member or non-member seen; returning false stops the browser.
pub(crate) type OnFound = Box<dyn Fn(NodeId, Vec<SocketAddr>) -> bool + Send>;

/// Starts mDNS on `interfaces` (names like `eth0` or addresses; empty means all).
pub(crate) fn start(
    found: OnFound,
    id: NodeId,
    port: u16,
    interfaces: &[String],
) -> Result<Discovery, String> {
    let daemon = ServiceDaemon::new().map_err(|e| format!("mdns: {e}"))?;
    if !interfaces.is_empty() {
        daemon
            .disable_interface(IfKind::All)
            .map_err(|e| format!("mdns: {e}"))?;
        for i in interfaces {
            let kind = match i.parse::<IpAddr>() {
                Ok(ip) => IfKind::Addr(ip),
                Err(_) => IfKind::Name(i.clone()),
            };
            daemon
                .enable_interface(kind)
                .map_err(|e| format!("mdns interface {i}: {e}"))?;
        }
    }
    let name = id.to_string();
    let host = format!("{}.local.", id.short());
    let info = ServiceInfo::new(
        SERVICE,
        &name,
        &host,
        "",
        port,
        [("id", name.as_str())].as_slice(),
    )
    .map_err(|e| format!("mdns: {e}"))?
    .enable_addr_auto();
    daemon.register(info).map_err(|e| format!("mdns: {e}"))?;
    let events = daemon.browse(SERVICE).map_err(|e| format!("mdns: {e}"))?;
    std::thread::Builder::new()
        .name("tandem-mdns".into())
        .spawn(move || {
            // Ends when the daemon shuts down and the channel closes.
            while let Ok(event) = events.recv() {
                let ServiceEvent::ServiceResolved(info) = event else {
                    continue;
                };
                let Some(peer) = info
                    .get_property_val_str("id")
                    .and_then(|s| s.parse::<NodeId>().ok())
                else {
                    continue;
                };
                if peer == id {
                    continue;
                }
                let addrs: Vec<SocketAddr> = info
                    .get_addresses()
                    .iter()
                    .map(|ip| SocketAddr::new(*ip, info.get_port()))
                    .collect();
                if !found(peer, addrs) {
                    break;
                }
            }
        })
        .map_err(|e| format!("mdns thread: {e}"))?;
    Ok(Discovery { daemon })
}
