//! The byte budget of a controller's stream resume buffers: a total cap and a per-tenant cap over
//! every [`ExecBuffer`](super::exec_stream::ExecBuffer) it holds, so no tenant (and no number of
//! clients that start streamed execs and disconnect) can exhaust the controller's memory.
//!
//! 1. A streamed exec is admitted with [`RESERVE_BYTES`] charged to the controller and to its
//!    tenant (its guaranteed resume window), before anything starts in the bunker.
//! 2. Output past what a buffer is charged asks for more ([`Budget::grow`]); when the budget
//!    cannot grant it, the buffer drops its oldest events instead (a shorter resume window), so
//!    a running exec never goes past the caps and is never stopped by them.
//! 3. A finished buffer is charged what it holds and may be evicted: whenever room is short,
//!    finished buffers go first, the asking tenant's own oldest first, then (for the total cap)
//!    anyone's oldest. Running buffers keep their charge: one tenant never shrinks another's.
//! 4. With nothing finished left to evict, a new streamed exec is refused
//!    (`429 STREAM_BUDGET_EXCEEDED`): one tenant fills at most its own cap, so the others keep
//!    the rest of the total.

use std::collections::{BTreeMap, HashMap};

/// What a new streamed exec is charged up front: its resume window when the budget is tight.
pub const RESERVE_BYTES: u64 = 1024 * 1024;

/// The caps, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Every buffer of the controller together.
    pub total_bytes: u64,
    /// Every buffer of one tenant together.
    pub tenant_bytes: u64,
}

/// Which cap refused an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Controller,
    Tenant,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Controller => "controller",
            Self::Tenant => "tenant",
        }
    }
}

/// A new streamed exec found no room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub scope: Scope,
    pub limit_bytes: u64,
}

struct Account {
    tenant: String,
    charged: u64,
    /// Its place in the order buffers finished in; `None` while the exec runs.
    finished: Option<u64>,
}

/// The accounts of every buffer (pure bookkeeping: the hub holds the buffers themselves and
/// drops the ones this evicts).
pub struct Budget {
    limits: Limits,
    accounts: HashMap<String, Account>,
    /// Finished buffers by the order they finished in: the eviction order.
    finished: BTreeMap<u64, String>,
    next_finish: u64,
    used: u64,
    by_tenant: HashMap<String, u64>,
}

impl Budget {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            accounts: HashMap::new(),
            finished: BTreeMap::new(),
            next_finish: 0,
            used: 0,
            by_tenant: HashMap::new(),
        }
    }

    /// Bytes charged to every buffer together.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes charged to the buffers of `tenant`.
    pub fn tenant_used(&self, tenant: &str) -> u64 {
        self.by_tenant.get(tenant).copied().unwrap_or(0)
    }

    /// Charges a new buffer its reservation, evicting finished buffers (their ids are pushed
    /// to `evicted`) if that makes room.
    pub fn admit(
        &mut self,
        exec_id: &str,
        tenant: &str,
        evicted: &mut Vec<String>,
    ) -> Result<(), Refused> {
        self.make_room(tenant, RESERVE_BYTES, evicted)?;
        self.accounts.insert(
            exec_id.to_owned(),
            Account {
                tenant: tenant.to_owned(),
                charged: 0,
                finished: None,
            },
        );
        self.charge(exec_id, RESERVE_BYTES);
        Ok(())
    }

    /// Grants a running buffer `bytes` more if there is (or eviction makes) room.
    pub fn grow(&mut self, exec_id: &str, bytes: u64, evicted: &mut Vec<String>) -> bool {
        let Some(tenant) = self.accounts.get(exec_id).map(|a| a.tenant.clone()) else {
            return false;
        };
        if self.make_room(&tenant, bytes, evicted).is_err() {
            return false;
        }
        self.charge(exec_id, bytes);
        true
    }

    /// Charges `bytes` whatever the caps: a single event larger than a buffer's whole charge.
    pub fn force(&mut self, exec_id: &str, bytes: u64) {
        self.charge(exec_id, bytes);
    }

    /// The exec is over: its buffer is charged what it holds and may be evicted from now on.
    pub fn finish(&mut self, exec_id: &str, holds: u64) {
        let Some(a) = self.accounts.get_mut(exec_id) else {
            return;
        };
        if a.finished.is_some() {
            return;
        }
        let freed = a.charged.saturating_sub(holds);
        a.charged -= freed;
        a.finished = Some(self.next_finish);
        self.finished.insert(self.next_finish, exec_id.to_owned());
        self.next_finish += 1;
        let tenant = a.tenant.clone();
        self.uncharge(&tenant, freed);
    }

    /// Forgets a buffer and everything charged to it.
    pub fn remove(&mut self, exec_id: &str) {
        let Some(a) = self.accounts.remove(exec_id) else {
            return;
        };
        if let Some(order) = a.finished {
            self.finished.remove(&order);
        }
        self.uncharge(&a.tenant, a.charged);
    }

    fn charge(&mut self, exec_id: &str, bytes: u64) {
        let Some(a) = self.accounts.get_mut(exec_id) else {
            return;
        };
        a.charged += bytes;
        self.used += bytes;
        *self.by_tenant.entry(a.tenant.clone()).or_default() += bytes;
    }

    fn uncharge(&mut self, tenant: &str, bytes: u64) {
        self.used -= bytes;
        if let Some(t) = self.by_tenant.get_mut(tenant) {
            *t -= bytes;
            if *t == 0 {
                self.by_tenant.remove(tenant);
            }
        }
    }

    /// Evicts finished buffers until `need` more bytes fit both caps for `tenant`.
    fn make_room(
        &mut self,
        tenant: &str,
        need: u64,
        evicted: &mut Vec<String>,
    ) -> Result<(), Refused> {
        loop {
            let over_tenant = self.tenant_used(tenant) + need > self.limits.tenant_bytes;
            let over_total = self.used + need > self.limits.total_bytes;
            if !over_tenant && !over_total {
                return Ok(());
            }
            let own = self
                .finished
                .values()
                .find(|id| self.accounts.get(*id).is_some_and(|a| a.tenant == tenant));
            // Only the tenant's own buffers free room under its cap; under the total cap, the
            // tenant's own go first, then anyone's, oldest first.
            let victim = match (own, over_tenant) {
                (Some(id), _) => Some(id.clone()),
                (None, false) => self.finished.values().next().cloned(),
                (None, true) => None,
            };
            let Some(victim) = victim else {
                return Err(if over_tenant {
                    Refused {
                        scope: Scope::Tenant,
                        limit_bytes: self.limits.tenant_bytes,
                    }
                } else {
                    Refused {
                        scope: Scope::Controller,
                        limit_bytes: self.limits.total_bytes,
                    }
                });
            };
            self.remove(&victim);
            evicted.push(victim);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = RESERVE_BYTES;

    fn budget(total: u64, tenant: u64) -> Budget {
        Budget::new(Limits {
            total_bytes: total * MB,
            tenant_bytes: tenant * MB,
        })
    }

    #[test]
    fn one_tenant_fills_only_its_own_cap() {
        let mut b = budget(6, 4);
        let mut evicted = Vec::new();
        for i in 0..4 {
            b.admit(&format!("a{i}"), "A", &mut evicted).expect("room");
        }
        assert_eq!(
            b.admit("a4", "A", &mut evicted),
            Err(Refused {
                scope: Scope::Tenant,
                limit_bytes: 4 * MB
            })
        );
        // Running buffers are never evicted, and another tenant still gets in.
        assert!(evicted.is_empty());
        b.admit("b0", "B", &mut evicted).expect("B has room");
        assert_eq!(b.tenant_used("A"), 4 * MB);
        assert_eq!(b.used(), 5 * MB);
    }

    #[test]
    fn the_total_cap_holds_across_tenants() {
        let mut b = budget(5, 3);
        let mut evicted = Vec::new();
        for (id, t) in [
            ("a0", "A"),
            ("a1", "A"),
            ("a2", "A"),
            ("b0", "B"),
            ("b1", "B"),
        ] {
            b.admit(id, t, &mut evicted).expect("room");
        }
        assert_eq!(
            b.admit("c0", "C", &mut evicted),
            Err(Refused {
                scope: Scope::Controller,
                limit_bytes: 5 * MB
            })
        );
        // Growth is refused the same way: the running buffer keeps its window instead.
        assert!(!b.grow("b0", 1, &mut evicted));
        assert_eq!(b.used(), 5 * MB);
    }

    #[test]
    fn finished_buffers_are_evicted_before_anyone_is_refused() {
        let mut b = budget(4, 3);
        let mut evicted = Vec::new();
        for id in ["a0", "a1", "a2"] {
            b.admit(id, "A", &mut evicted).expect("room");
        }
        b.admit("b0", "B", &mut evicted).expect("room");
        b.finish("a1", MB);
        b.finish("a0", MB / 2);
        // A finished exec gives back what it reserved and does not hold.
        assert_eq!(b.used(), 4 * MB - MB / 2);
        // C needs the total cap's room: anyone's oldest finished buffer goes (a1 finished first).
        b.admit("c0", "C", &mut evicted)
            .expect("room after eviction");
        assert_eq!(evicted, ["a1"]);
        // B, under the total cap too, evicts a0, the only finished buffer left.
        b.admit("b1", "B", &mut evicted)
            .expect("room after eviction");
        assert_eq!(evicted, ["a1", "a0"]);
        assert!(b.used() <= 4 * MB);
        assert!(b.admit("c1", "C", &mut evicted).is_err());
    }

    #[test]
    fn under_its_own_cap_a_tenant_evicts_only_its_own() {
        let mut b = budget(10, 2);
        let mut evicted = Vec::new();
        b.admit("b0", "B", &mut evicted).expect("room");
        b.finish("b0", MB);
        b.admit("a0", "A", &mut evicted).expect("room");
        b.admit("a1", "A", &mut evicted).expect("room");
        b.finish("a1", MB);
        b.admit("a2", "A", &mut evicted)
            .expect("room after evicting a1");
        assert_eq!(evicted, ["a1"]);
        // B's finished buffer is older but is not A's to take.
        assert!(b.admit("a3", "A", &mut evicted).is_err());
        assert_eq!(evicted, ["a1"]);
        assert_eq!(b.tenant_used("B"), MB);
    }

    #[test]
    fn removing_gives_everything_back_once() {
        let mut b = budget(4, 4);
        let mut evicted = Vec::new();
        b.admit("a0", "A", &mut evicted).expect("room");
        assert!(b.grow("a0", MB, &mut evicted));
        b.finish("a0", 2 * MB);
        b.remove("a0");
        b.remove("a0");
        assert_eq!(b.used(), 0);
        assert_eq!(b.tenant_used("A"), 0);
    }
}
