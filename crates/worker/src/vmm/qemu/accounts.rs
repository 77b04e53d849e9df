//! The unprivileged accounts QEMU processes drop to: uid and gid `base + slot`, one slot per
//! running QEMU, so that no two VMs share a uid (one QEMU can neither signal, trace nor read
//! the memory of another, nor open what another's uid was given).
//!
//! A slot is leased when a QEMU is spawned and returned when its process has been reaped
//! (the lease lives in the task that waits for it), never earlier. The accounts need no
//! `/etc/passwd` entry: QEMU takes a numeric `-runas uid:gid`. Nothing on disk is owned by
//! them: QEMU opens every file as root before it drops.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};

use super::cmdline::RunAs;

/// The range of uids (and gids) QEMU runs under.
#[derive(Debug)]
pub struct Accounts {
    base: u32,
    count: u32,
    state: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    leased: BTreeSet<u32>,
    /// Where the next search starts, so a returned uid is not handed out again at once.
    next: u32,
}

/// One leased account; dropping it returns the slot.
#[derive(Debug)]
pub struct Lease {
    accounts: Arc<Accounts>,
    slot: u32,
}

impl Accounts {
    /// `count` accounts from uid `base` on. The caller checked that the range holds no root
    /// and fits in a uid.
    pub fn new(base: u32, count: u32) -> Arc<Self> {
        Arc::new(Self {
            base,
            count,
            state: Mutex::new(Slots::default()),
        })
    }

    /// A free account, or `None` when every slot is leased.
    pub fn lease(self: &Arc<Self>) -> Option<Lease> {
        // Each update is one insert or remove, which a panic cannot tear.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let start = state.next;
        let slot = (0..self.count)
            .map(|i| (start + i) % self.count)
            .find(|slot| !state.leased.contains(slot))?;
        state.leased.insert(slot);
        state.next = (slot + 1) % self.count;
        Some(Lease {
            accounts: Arc::clone(self),
            slot,
        })
    }

    pub fn base(&self) -> u32 {
        self.base
    }

    pub fn count(&self) -> u32 {
        self.count
    }
}

impl Lease {
    pub fn run_as(&self) -> RunAs {
        let id = self.accounts.base + self.slot;
        RunAs { uid: id, gid: id }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.accounts
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .leased
            .remove(&self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_vms_never_share_an_account_and_slots_come_back() {
        let accounts = Accounts::new(20000, 3);
        let a = accounts.lease().expect("a");
        let b = accounts.lease().expect("b");
        let c = accounts.lease().expect("c");
        let uids: BTreeSet<u32> = [&a, &b, &c].iter().map(|l| l.run_as().uid).collect();
        assert_eq!(uids, BTreeSet::from([20000, 20001, 20002]));
        assert_eq!(
            a.run_as(),
            RunAs {
                uid: 20000,
                gid: 20000
            }
        );
        assert!(accounts.lease().is_none(), "all three are running");
        drop(b);
        let d = accounts.lease().expect("b's slot is free again");
        assert_eq!(d.run_as().uid, 20001);
        drop(a);
        drop(c);
        // The search goes on from the last lease, not from the lowest free slot.
        assert_eq!(accounts.lease().expect("e").run_as().uid, 20002);
    }
}
