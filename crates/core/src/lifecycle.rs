//! The bunker lifecycle: states and the only place transitions are decided.
//!
//! ```text
//! pending → provisioning → running ⇄ paused
//!                          running → snapshotting → running
//! any non-terminal → terminated | failed   (terminal: a bunker never comes back)
//! ```

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BunkerStatus {
    Pending,
    Provisioning,
    Running,
    Paused,
    Snapshotting,
    Terminated,
    Failed,
}

impl BunkerStatus {
    pub const ALL: [BunkerStatus; 7] = [
        Self::Pending,
        Self::Provisioning,
        Self::Running,
        Self::Paused,
        Self::Snapshotting,
        Self::Terminated,
        Self::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Provisioning => "provisioning",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Snapshotting => "snapshotting",
            Self::Terminated => "terminated",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Terminated | Self::Failed)
    }
}

impl fmt::Display for BunkerStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Something that moves a bunker between states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleEvent {
    /// A worker was asked to boot it.
    Provision,
    /// The guest agent answered: ready for exec.
    Ready,
    Pause,
    Resume,
    SnapshotBegin,
    SnapshotEnd,
    Terminate,
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidTransition {
    pub from: BunkerStatus,
    pub event: LifecycleEvent,
}

impl fmt::Display for InvalidTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot {:?} a bunker that is {}", self.event, self.from)
    }
}

impl std::error::Error for InvalidTransition {}

/// The state `event` moves a bunker in `from` to, or why it may not.
pub fn transition(
    from: BunkerStatus,
    event: LifecycleEvent,
) -> Result<BunkerStatus, InvalidTransition> {
    use BunkerStatus as S;
    use LifecycleEvent as E;
    let to = match (from, event) {
        (S::Pending, E::Provision) => S::Provisioning,
        (S::Provisioning, E::Ready) => S::Running,
        (S::Running, E::Pause) => S::Paused,
        (S::Paused, E::Resume) => S::Running,
        (S::Running, E::SnapshotBegin) => S::Snapshotting,
        (S::Snapshotting, E::SnapshotEnd) => S::Running,
        (s, E::Terminate) if !s.is_terminal() => S::Terminated,
        (s, E::Fail) if !s.is_terminal() => S::Failed,
        _ => return Err(InvalidTransition { from, event }),
    };
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use BunkerStatus as S;
    use LifecycleEvent as E;

    const EVENTS: [LifecycleEvent; 8] = [
        E::Provision,
        E::Ready,
        E::Pause,
        E::Resume,
        E::SnapshotBegin,
        E::SnapshotEnd,
        E::Terminate,
        E::Fail,
    ];

    /// Every legal move; every (state, event) pair not listed here must be refused.
    const LEGAL: &[(BunkerStatus, LifecycleEvent, BunkerStatus)] = &[
        (S::Pending, E::Provision, S::Provisioning),
        (S::Pending, E::Terminate, S::Terminated),
        (S::Pending, E::Fail, S::Failed),
        (S::Provisioning, E::Ready, S::Running),
        (S::Provisioning, E::Terminate, S::Terminated),
        (S::Provisioning, E::Fail, S::Failed),
        (S::Running, E::Pause, S::Paused),
        (S::Running, E::SnapshotBegin, S::Snapshotting),
        (S::Running, E::Terminate, S::Terminated),
        (S::Running, E::Fail, S::Failed),
        (S::Paused, E::Resume, S::Running),
        (S::Paused, E::Terminate, S::Terminated),
        (S::Paused, E::Fail, S::Failed),
        (S::Snapshotting, E::SnapshotEnd, S::Running),
        (S::Snapshotting, E::Terminate, S::Terminated),
        (S::Snapshotting, E::Fail, S::Failed),
    ];

    #[test]
    fn every_pair_is_legal_exactly_when_listed() {
        for from in BunkerStatus::ALL {
            for event in EVENTS {
                let expected = LEGAL
                    .iter()
                    .find(|(f, e, _)| *f == from && *e == event)
                    .map(|(_, _, to)| *to);
                match (transition(from, event), expected) {
                    (Ok(got), Some(want)) => assert_eq!(got, want, "{from} {event:?}"),
                    (Err(err), None) => assert_eq!(err, InvalidTransition { from, event }),
                    (got, want) => panic!("{from} {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn terminal_states_never_come_back() {
        for from in [S::Terminated, S::Failed] {
            assert!(from.is_terminal());
            for event in EVENTS {
                assert!(transition(from, event).is_err());
            }
        }
    }

    #[test]
    fn status_names_round_trip() {
        for s in BunkerStatus::ALL {
            assert_eq!(BunkerStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(BunkerStatus::parse("zombie"), None);
    }
}
