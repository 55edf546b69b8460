//! Gossip over UDP, every datagram sealed (`lichen_core::seal`): chitchat
//! writes its message, this seals the bytes under the cluster secret and
//! sends them; what arrives is opened, checked against replay, and only
//! then decoded by chitchat. A datagram that fails any step is dropped and
//! counted in `lichen_gossip_rejected_total{reason}`; chitchat never sees
//! it.
//!
//! During a rotation a host holds two secrets. It answers each peer under
//! the secret that peer last sealed with ([`PeerKeys`]) and uses the current
//! one with peers it has not heard from, so hosts rotated and not yet
//! rotated keep talking in both directions; the same choice signs internal
//! HTTP requests to that peer.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport};
use lichen_core::seal::{self, Keyring, ReplayGuard, Session, Which};
use prometheus::IntCounterVec;

use super::now_ms;

/// The largest datagram: UDP's limit.
const MAX_DATAGRAM: usize = 65_507;

/// How long a peer not heard from keeps its entry in [`PeerKeys`] (a
/// peer back later is learnt again from its first datagram).
const PEER_KEY_KEPT: std::time::Duration = std::time::Duration::from_secs(3600);

/// Which secret each peer (by gossip address) last sealed with, and when
/// it was last heard; peers gone for [`PEER_KEY_KEPT`] are forgotten.
#[derive(Default)]
pub struct PeerKeys {
    by_addr: Mutex<HashMap<SocketAddr, (Which, std::time::Instant)>>,
}

impl PeerKeys {
    /// The secret to use with the peer at `addr`: the one it speaks, or
    /// the current one.
    pub fn for_peer(&self, addr: SocketAddr) -> Which {
        let by_addr = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        by_addr
            .get(&addr)
            .map_or(Which::Current, |(which, _)| *which)
    }

    fn heard(&self, addr: SocketAddr, which: Which) {
        let now = std::time::Instant::now();
        let mut by_addr = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        let new = by_addr.insert(addr, (which, now)).is_none();
        if new {
            by_addr.retain(|_, (_, heard)| now.duration_since(*heard) < PEER_KEY_KEPT);
        }
    }
}

pub struct SealedTransport {
    pub keyring: Arc<Keyring>,
    pub peer_keys: Arc<PeerKeys>,
    pub rejected: IntCounterVec,
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen_addr)
            .await
            .with_context(|| format!("binding {listen_addr}/UDP for gossip"))?;
        Ok(Box::new(SealedSocket {
            socket,
            keyring: Arc::clone(&self.keyring),
            peer_keys: Arc::clone(&self.peer_keys),
            rejected: self.rejected.clone(),
            session: Session::new()?,
            guard: ReplayGuard::default(),
            recv_buf: vec![0; MAX_DATAGRAM].into_boxed_slice(),
            plain: Vec::with_capacity(MAX_DATAGRAM),
            sealed: Vec::with_capacity(MAX_DATAGRAM),
            last_warned: None,
        }))
    }
}

struct SealedSocket {
    socket: tokio::net::UdpSocket,
    keyring: Arc<Keyring>,
    peer_keys: Arc<PeerKeys>,
    rejected: IntCounterVec,
    session: Session,
    guard: ReplayGuard,
    recv_buf: Box<[u8]>,
    plain: Vec<u8>,
    sealed: Vec<u8>,
    /// When a rejection was last logged: at most one line a minute, the
    /// counter says how many.
    last_warned: Option<Instant>,
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        self.socket
            .local_addr()
            .context("the gossip socket's address")
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        self.plain.clear();
        envelope.serialize(&mut self.plain);
        let secret = self.keyring.get(self.peer_keys.for_peer(to));
        seal::seal_datagram(
            secret,
            &mut self.session,
            now_ms(),
            &self.plain,
            &mut self.sealed,
        )?;
        let num_bytes_sent = self
            .socket
            .send_to(&self.sealed, to)
            .await
            .context("sending a gossip datagram")?;
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancellable: nothing is kept between awaits but the buffers.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let (len, from) = match self.socket.recv_from(&mut self.recv_buf).await {
                Ok(received) => received,
                Err(error) if is_transient(&error) => continue,
                Err(error) => return Err(error).context("receiving gossip"),
            };
            let opened = seal::open_datagram(
                &self.keyring,
                &mut self.guard,
                now_ms(),
                &mut self.recv_buf[..len],
            );
            let reason = match opened {
                Ok(opened) => {
                    let mut plaintext = opened.plaintext;
                    match ChitchatEnvelope::deserialize(&mut plaintext) {
                        Ok(envelope) => {
                            self.peer_keys.heard(from, opened.which);
                            return Ok(RecvOutcome {
                                from_addr: from,
                                envelope,
                                num_bytes_received: len,
                            });
                        }
                        Err(_) => crate::metrics::UNDECODABLE,
                    }
                }
                Err(rejected) => rejected.reason(),
            };
            self.rejected.with_label_values(&[reason]).inc();
            if self
                .last_warned
                .is_none_or(|at| at.elapsed() > Duration::from_secs(60))
            {
                self.last_warned = Some(Instant::now());
                tracing::warn!(from = %from, reason, "dropped a gossip datagram (lichen_gossip_rejected_total counts them; logged at most once a minute)");
            }
        }
    }
}

fn is_transient(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::OutOfMemory
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
    )
}
