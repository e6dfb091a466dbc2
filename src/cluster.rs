//! What the rest of the server may know of the cluster: this node's role, epoch and
//! leader, read together under one lock, and the serving rules that follow from them.
//!
//! The cluster driver (the node's thread) publishes a new [`RoleInfo`] after every step
//! that changes it ([`ClusterState::publish`]); connection threads read it
//! ([`ClusterState::write_gate`], [`ClusterState::read_gate`], [`ClusterState::info`])
//! to decide whether to serve a request or redirect it, and INFO / ROLE render it. A
//! cluster of one has no `ClusterState` (`Context::cluster` is `None`): it always leads.
//!
//! The lease is an instant, not a flag: the driver publishes until when a majority's
//! acknowledgements let this leader serve, and a read checks the clock against it, so
//! a leader cut off from its majority stops serving reads at that instant even if its
//! node thread is late to notice.

use parking_lot::Mutex;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Why a request is not served here, and where to go instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The leader's client address (`host:port`).
    Moved(String),
    /// No leader right now (an election is under way): retry.
    NoLeader,
    /// This node leads (or was just elected) but may not serve now; the text says why.
    Unavailable(&'static str),
}

impl Redirect {
    /// The error reply, without the leading `-` (Redis Cluster's wording and shape; the
    /// slot is always 0: one shard).
    pub fn reply(&self) -> String {
        match self {
            Redirect::Moved(addr) => format!("MOVED 0 {addr}"),
            Redirect::NoLeader => "CLUSTERDOWN no leader elected".to_string(),
            Redirect::Unavailable(why) => format!("CLUSTERDOWN {why}: retry"),
        }
    }
}

impl fmt::Display for Redirect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.reply())
    }
}

/// This node's role as the outside sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Leads and serves (its epoch's no-op is committed).
    Leader,
    /// Follows `RoleInfo::leader` (or nobody yet).
    Follower,
    /// Electing, or a leader-elect still catching up: serves nothing.
    Candidate,
}

/// One follower as the leader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FollowerInfo {
    pub id: u64,
    /// Its client address (as configured).
    pub addr: String,
    /// The link to it is up.
    pub connected: bool,
    /// Its log equals ours and is durable through here.
    pub acked: u64,
    /// Our last index minus `acked`.
    pub lag: u64,
}

/// Everything INFO, ROLE and the serving rules need, published as one value so that
/// role and epoch are always read together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleInfo {
    pub node_id: u64,
    pub role: Role,
    pub epoch: u64,
    /// The leader's id: this node when it leads; `None` when no leader is known.
    pub leader: Option<u64>,
    /// The leader's client address (`host:port`), when known.
    pub leader_addr: Option<String>,
    /// The link from the leader is up (a follower's `master_link_status`).
    pub leader_link_up: bool,
    pub commit: u64,
    /// The local log's last index.
    pub last_index: u64,
    /// On a leader: its followers.
    pub followers: Vec<FollowerInfo>,
    /// On a leader: until when it may serve (its lease). `None`: not serving.
    pub lease_until: Option<Instant>,
    /// A leader handing over to a returning higher id accepts no writes.
    pub handing_over: bool,
}

impl RoleInfo {
    /// A node that has just started: a follower of nobody in `epoch`.
    pub fn starting(node_id: u64, epoch: u64) -> RoleInfo {
        RoleInfo {
            node_id,
            role: Role::Follower,
            epoch,
            leader: None,
            leader_addr: None,
            leader_link_up: false,
            commit: 0,
            last_index: 0,
            followers: Vec::new(),
            lease_until: None,
            handing_over: false,
        }
    }

    /// Where a request this node cannot serve should go.
    fn redirect(&self) -> Redirect {
        match (&self.leader, &self.leader_addr) {
            (Some(l), Some(addr)) if *l != self.node_id => Redirect::Moved(addr.clone()),
            // Saying "no leader elected" here would send an operator looking for an
            // election that is not happening.
            (Some(l), _) if *l == self.node_id => Redirect::Unavailable(match self.role {
                Role::Leader if self.handing_over => {
                    "this leader is handing over to a returning node"
                }
                Role::Leader => "this leader cannot reach a majority (its lease lapsed)",
                _ => "this node was elected but is not serving yet",
            }),
            _ => Redirect::NoLeader,
        }
    }

    fn serving(&self, now: Instant) -> bool {
        self.role == Role::Leader && self.lease_until.is_some_and(|t| now < t)
    }
}

/// The published [`RoleInfo`] of a cluster member.
#[derive(Debug)]
pub struct ClusterState {
    info: Mutex<RoleInfo>,
    /// Times this node became a candidate / the leader (metrics), counted by
    /// [`ClusterState::publish`] from the role changes it sees.
    elections_started: AtomicU64,
    elections_won: AtomicU64,
    /// Ticks the driver has given its node: a health check (the systemd watchdog,
    /// `src/sdnotify.rs`) sees the node thread alive when this advances.
    ticks: AtomicU64,
}

impl ClusterState {
    pub fn new(info: RoleInfo) -> ClusterState {
        ClusterState {
            info: Mutex::new(info),
            elections_started: AtomicU64::new(0),
            elections_won: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
        }
    }

    /// The driver gave its node a tick (called by the node thread after each).
    pub fn note_tick(&self) {
        self.ticks.fetch_add(1, Ordering::Relaxed);
    }

    /// Ticks given so far; 0 until the driver runs.
    pub fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }

    /// Replaces what the node thread last published.
    pub fn publish(&self, info: RoleInfo) {
        let mut cur = self.info.lock();
        if info.role != cur.role {
            // A node can go from follower to leader in one step (the node publishes
            // after a step, not after every change inside it): that was an election too.
            if info.role == Role::Candidate
                || info.role == Role::Leader && cur.role != Role::Candidate
            {
                self.elections_started.fetch_add(1, Ordering::Relaxed);
            }
            if info.role == Role::Leader {
                self.elections_won.fetch_add(1, Ordering::Relaxed);
            }
        }
        *cur = info;
    }

    /// (elections started, elections won) by this node since it started.
    pub fn elections(&self) -> (u64, u64) {
        (
            self.elections_started.load(Ordering::Relaxed),
            self.elections_won.load(Ordering::Relaxed),
        )
    }

    /// A copy of the current state (role and epoch consistent with each other).
    pub fn info(&self) -> RoleInfo {
        self.info.lock().clone()
    }

    /// Whether this node may take a write now. Advisory (the log writer checks again
    /// with the log locked): an error here is a promise that the write was not applied.
    pub fn write_gate(&self) -> Result<(), Redirect> {
        let info = self.info.lock();
        if info.serving(Instant::now()) && !info.handing_over {
            Ok(())
        } else {
            Err(info.redirect())
        }
    }

    /// Whether this node may answer a linearizable read now: it leads and its lease
    /// holds (so no other node can have been elected meanwhile).
    pub fn read_gate(&self) -> Result<(), Redirect> {
        let info = self.info.lock();
        if info.serving(Instant::now()) {
            Ok(())
        } else {
            Err(info.redirect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn gates_follow_role_lease_and_hand_over() {
        let st = ClusterState::new(RoleInfo::starting(2, 0));
        assert_eq!(st.write_gate(), Err(Redirect::NoLeader));
        assert_eq!(
            st.read_gate().unwrap_err().reply(),
            "CLUSTERDOWN no leader elected"
        );
        let mut info = RoleInfo::starting(2, 3);
        info.leader = Some(3);
        info.leader_addr = Some("127.0.0.1:7003".into());
        st.publish(info.clone());
        assert_eq!(
            st.write_gate().unwrap_err().reply(),
            "MOVED 0 127.0.0.1:7003"
        );
        info.role = Role::Leader;
        info.leader = Some(2);
        info.lease_until = Some(Instant::now() + Duration::from_secs(60));
        st.publish(info.clone());
        assert_eq!(st.write_gate(), Ok(()));
        assert_eq!(st.read_gate(), Ok(()));
        info.handing_over = true;
        st.publish(info.clone());
        assert_eq!(
            st.write_gate().unwrap_err().reply(),
            "CLUSTERDOWN this leader is handing over to a returning node: retry"
        );
        assert_eq!(st.read_gate(), Ok(()));
        // A lapsed lease serves nothing, whatever the role says, and says why.
        info.handing_over = false;
        info.lease_until = Some(Instant::now() - Duration::from_millis(1));
        st.publish(info);
        let lapsed = "CLUSTERDOWN this leader cannot reach a majority (its lease lapsed): retry";
        assert_eq!(st.read_gate().unwrap_err().reply(), lapsed);
        assert_eq!(st.write_gate().unwrap_err().reply(), lapsed);
    }
}
