//! The invite handshake. The joiner dials the inviter (pinned to the NodeId in the invite)
//! with ALPN `tandem-join/5`, opens a stream of kind `Join`, and proves the invite's secret;
//! the inviter checks it (known, unused, unexpired), commits the admission through Raft, and
//! answers with the joiner's Raft id and the member list. The connection carries nothing else.

use std::net::SocketAddr;
use std::time::Duration;

use tandem_crdt::NodeId;
use tandem_crdt::members::MemberList;
use tandem_crdt::proto::{JoinMsg, StreamKind};

use super::driver::connect;
use super::wire::{self, WireError};
use super::{Invite, InviteError, JoinError, Net, NetError, Redeem, Shared, close};

fn protocol(e: impl std::fmt::Display) -> NetError {
    NetError::Protocol(e.to_string())
}

/// Inviter side.
pub(crate) async fn serve(
    shared: &Shared,
    conn: &quinn::Connection,
    peer: NodeId,
) -> Result<(), NetError> {
    let (mut send, mut recv) = tokio::time::timeout(Duration::from_secs(10), conn.accept_bi())
        .await
        .map_err(|_| protocol("join timed out"))?
        .map_err(protocol)?;
    let request = async {
        let mut kind = [0u8; 1];
        recv.read_exact(&mut kind).await.map_err(WireError::from)?;
        if StreamKind::from_byte(kind[0]) != Some(StreamKind::Join) {
            return Err(WireError::Unexpected("stream kind"));
        }
        wire::read::<JoinMsg>(&mut recv).await
    };
    let msg = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .map_err(|_| protocol("join timed out"))?;
    let Ok(Some((
        JoinMsg::Request {
            secret,
            mut addrs,
            name,
            prefer_voter,
        },
        _,
    ))) = msg
    else {
        conn.close(close::PROTOCOL.into(), b"expected a join request");
        return Err(protocol("expected a join request"));
    };
    let observed = conn.remote_address().to_string();
    if !addrs.contains(&observed) {
        addrs.push(observed);
    }
    let req = Redeem {
        secret,
        by: peer,
        addrs,
        name,
        prefer_voter,
    };
    let reply = match shared.host.redeem_invite(req).await {
        Ok((raft_id, list)) => JoinMsg::Accepted { raft_id, list },
        Err(reason) => JoinMsg::Refused { reason },
    };
    let refused = matches!(reply, JoinMsg::Refused { .. });
    wire::write(&mut send, &reply).await.map_err(protocol)?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
    conn.close(close::NORMAL.into(), b"join done");
    if refused {
        return Err(NetError::Refused("invalid invite".into()));
    }
    tracing::info!(peer = %peer.short(), "new member joined");
    Ok(())
}

/// Joiner side: returns its Raft id, the member list and the address the inviter answered at.
/// Tries the invite's addresses, then, if those are stale and mDNS is on, wherever mDNS sees
/// the inviter within 3 s.
pub(crate) async fn join(
    shared: &Shared,
    invite: &Invite,
    mdns: Option<&Net>,
) -> Result<(u64, MemberList, SocketAddr), JoinError> {
    if invite.expired(shared.clock.wall_ms()) {
        return Err(InviteError::Expired.into());
    }
    let mut last = NetError::Unreachable("the invite lists no addresses".into());
    let listed: Vec<SocketAddr> = invite.addrs.iter().filter_map(|a| a.parse().ok()).collect();
    for addr in &listed {
        match join_at(shared, invite, *addr).await {
            Err(NetError::Unreachable(e)) => last = NetError::Unreachable(e),
            other => return Ok(other.map(|(id, list)| (id, list, *addr))?),
        }
    }
    if let Some(net) = mdns {
        let deadline = shared.clock.now() + Duration::from_secs(3);
        loop {
            let seen: Vec<SocketAddr> = net
                .nearby()
                .into_iter()
                .filter(|(id, _, _)| *id == invite.inviter)
                .flat_map(|(_, a, _)| a)
                .filter(|a| !listed.contains(a))
                .collect();
            if !seen.is_empty() || shared.clock.now() > deadline {
                for addr in seen {
                    match join_at(shared, invite, addr).await {
                        Err(NetError::Unreachable(e)) => last = NetError::Unreachable(e),
                        other => return Ok(other.map(|(id, list)| (id, list, addr))?),
                    }
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Err(last.into())
}

/// One join attempt at one address. `Unreachable` means: try another address.
async fn join_at(
    shared: &Shared,
    invite: &Invite,
    addr: SocketAddr,
) -> Result<(u64, MemberList), NetError> {
    let conn = connect(shared, &shared.join_client, invite.inviter, addr).await?;
    let result = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(protocol)?;
        wire::announce(&mut send, StreamKind::Join)
            .await
            .map_err(protocol)?;
        let req = JoinMsg::Request {
            secret: invite.secret,
            addrs: shared.advertised_addrs(),
            name: shared.host.name(),
            prefer_voter: shared.host.prefer_voter(),
        };
        wire::write(&mut send, &req).await.map_err(protocol)?;
        let _ = send.finish();
        match wire::read::<JoinMsg>(&mut recv).await.map_err(protocol)? {
            Some((JoinMsg::Accepted { raft_id, list }, _)) => Ok((raft_id, list)),
            Some((JoinMsg::Refused { reason }, _)) => Err(NetError::Refused(reason)),
            _ => Err(protocol("unexpected reply to join")),
        }
    }
    .await;
    conn.close(close::NORMAL.into(), b"join done");
    result
}
