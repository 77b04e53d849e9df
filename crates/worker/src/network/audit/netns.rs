//! The audit's side of the bunker's network namespace: a helper thread enters it, turns on
//! conntrack accounting and timestamps, and opens the three netlink sockets there; the
//! sockets keep that namespace for life, so the thread then ends.
//!
//! Steps, on the helper thread (`setns` changes only the calling thread):
//! 1. `setns(netns, CLONE_NEWNET)`;
//! 2. write `1` to `net.netfilter.nf_conntrack_{acct,timestamp,events}`: `/proc/sys/net` is
//!    the calling thread's netns, so these are the bunker's own settings. They apply to
//!    entries created afterwards, so the audit starts before the guest runs;
//! 3. open the DESTROY-event socket (bound to `NFNLGRP_CONNTRACK_DESTROY`), the NFLOG socket
//!    (bound to the deny group, acknowledged by the kernel, so a group already taken in this
//!    netns fails the start) and a plain ctnetlink socket for the final dump;
//! 4. open `/proc/thread-self/net/netlink`, this netns's netlink socket table, whose `Drops`
//!    column counts what the kernel could not queue to each socket: how a gap is counted.

use std::fs::File;
use std::io::{Read, Seek};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use rustix::net::netlink::{self, SocketAddrNetlink};
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use super::AuditError;
use super::netlink::{NLMSG_ERROR, messages};

/// The sysctls the audit needs on, in the bunker's netns.
const SYSCTLS: [&str; 3] = [
    "net/netfilter/nf_conntrack_acct",
    "net/netfilter/nf_conntrack_timestamp",
    // The default (2) attaches the event extension only while a listener exists when an
    // entry is created; 1 makes every entry report its end.
    "net/netfilter/nf_conntrack_events",
];
/// How long the kernel has to acknowledge the NFLOG bind.
const BIND_TIMEOUT: Duration = Duration::from_secs(2);

/// What [`open`] made in the bunker's netns.
pub struct Sockets {
    /// Conntrack DESTROY events.
    pub events: OwnedFd,
    /// Packets logged to the deny group.
    pub log: OwnedFd,
    /// Conntrack requests (the dump at finish).
    pub query: OwnedFd,
    pub drops: DropTable,
}

/// Enters `netns` on a helper thread and opens the audit's sockets there.
pub fn open(netns: &File, group: u16, recv_buffer_bytes: usize) -> Result<Sockets, AuditError> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("audit-netns".to_owned())
            .spawn_scoped(scope, || open_here(netns, group, recv_buffer_bytes))
            .map_err(AuditError::Thread)?
            .join()
            .map_err(|_| AuditError::ThreadPanicked)?
    })
}

fn open_here(netns: &File, group: u16, recv_buffer_bytes: usize) -> Result<Sockets, AuditError> {
    rustix::thread::move_into_link_name_space(
        netns.as_fd(),
        Some(rustix::thread::LinkNameSpaceType::Network),
    )
    .map_err(|e| AuditError::EnterNetns(e.into()))?;
    for name in SYSCTLS {
        std::fs::write(format!("/proc/sys/{name}"), b"1")
            .map_err(|source| AuditError::Sysctl { name, source })?;
    }
    let socket_err = |socket: &'static str, step: &'static str| {
        move |e: rustix::io::Errno| AuditError::Socket {
            socket,
            step,
            source: e.into(),
        }
    };

    let events = netfilter_socket().map_err(socket_err("conntrack events", "create"))?;
    grow_receive_buffer(&events, recv_buffer_bytes)
        .map_err(socket_err("conntrack events", "size"))?;
    rustix::net::bind(
        &events,
        &SocketAddrNetlink::new(0, super::conntrack::DESTROY_GROUP_MASK),
    )
    .map_err(socket_err("conntrack events", "bind"))?;

    let log = netfilter_socket().map_err(socket_err("nflog", "create"))?;
    grow_receive_buffer(&log, recv_buffer_bytes).map_err(socket_err("nflog", "size"))?;
    rustix::net::bind(&log, &SocketAddrNetlink::new(0, 0)).map_err(socket_err("nflog", "bind"))?;
    bind_log_group(&log, group).map_err(|source| AuditError::NflogBind { group, source })?;

    let query = netfilter_socket().map_err(socket_err("conntrack query", "create"))?;
    rustix::net::bind(&query, &SocketAddrNetlink::new(0, 0))
        .map_err(socket_err("conntrack query", "bind"))?;

    for (fd, name) in [
        (&events, "conntrack events"),
        (&log, "nflog"),
        (&query, "conntrack query"),
    ] {
        rustix::io::ioctl_fionbio(fd, true).map_err(socket_err(name, "make non-blocking"))?;
    }
    let drops = DropTable::open();
    Ok(Sockets {
        events,
        log,
        query,
        drops,
    })
}

fn netfilter_socket() -> rustix::io::Result<OwnedFd> {
    rustix::net::socket_with(
        AddressFamily::NETLINK,
        SocketType::RAW,
        SocketFlags::CLOEXEC,
        Some(netlink::NETFILTER),
    )
}

/// A burst of ends (a guest closing thousands of flows) must fit while the reader is busy:
/// as root the buffer may exceed `rmem_max`.
fn grow_receive_buffer(fd: &OwnedFd, bytes: usize) -> rustix::io::Result<()> {
    match rustix::net::sockopt::set_socket_recv_buffer_size_force(fd, bytes) {
        Err(rustix::io::Errno::PERM) => {
            rustix::net::sockopt::set_socket_recv_buffer_size(fd, bytes)
        }
        other => other,
    }
}

/// Sends the NFLOG bind and waits (blocking, bounded) for the kernel's acknowledgement.
fn bind_log_group(fd: &OwnedFd, group: u16) -> std::io::Result<()> {
    const SEQ: u32 = 1;
    rustix::net::sockopt::set_socket_timeout(
        fd,
        rustix::net::sockopt::Timeout::Recv,
        Some(BIND_TIMEOUT),
    )?;
    rustix::net::send(
        fd,
        &super::nflog::bind_request(group, SEQ),
        SendFlags::empty(),
    )?;
    let mut buf = vec![0u8; 8192];
    loop {
        let (n, _) = rustix::net::recv(fd, &mut buf[..], RecvFlags::empty())?;
        for message in messages(&buf[..n]) {
            let message = message.map_err(std::io::Error::other)?;
            if message.kind == NLMSG_ERROR && message.seq == SEQ {
                return match message.error_code() {
                    Some(0) => {
                        rustix::net::sockopt::set_socket_timeout(
                            fd,
                            rustix::net::sockopt::Timeout::Recv,
                            None,
                        )?;
                        Ok(())
                    }
                    Some(code) => Err(std::io::Error::from_raw_os_error(-code)),
                    None => Err(std::io::Error::other("a short netlink acknowledgement")),
                };
            }
        }
    }
}

/// This netns's `/proc/net/netlink`, opened from inside it (a `/proc` net file keeps the
/// netns of whoever opened it), re-read when a count is needed.
pub struct DropTable {
    file: Option<File>,
}

impl DropTable {
    fn open() -> Self {
        let file = File::open("/proc/thread-self/net/netlink")
            .map_err(
                |e| tracing::warn!(error = %e, "no netlink socket table: gaps count 1 per overrun"),
            )
            .ok();
        Self { file }
    }

    /// The kernel's drop count of the socket with inode `inode`.
    fn drops_of(&mut self, inode: u64) -> Option<u64> {
        let file = self.file.as_mut()?;
        file.rewind().ok()?;
        let mut table = String::new();
        file.read_to_string(&mut table).ok()?;
        drops_in_table(&table, inode)
    }
}

/// `sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode`: the `Drops` of the row of `inode`.
fn drops_in_table(table: &str, inode: u64) -> Option<u64> {
    table.lines().skip(1).find_map(|row| {
        let cols: Vec<&str> = row.split_whitespace().collect();
        let (drops, ino) = (cols.get(8)?, cols.get(9)?);
        (ino.parse::<u64>().ok()? == inode).then(|| drops.parse().ok())?
    })
}

/// The events lost on one socket, reported once each.
pub struct Overruns {
    inode: Option<u64>,
    /// The kernel's count when last read.
    seen: u64,
    /// Losses already reported beyond the kernel's count (an overrun reported before the
    /// count showed it); later counts pay them back first.
    credit: u64,
}

impl Overruns {
    pub fn new(fd: &OwnedFd, table: &mut DropTable) -> Self {
        let inode = rustix::fs::fstat(fd).ok().map(|s| s.st_ino);
        let seen = inode.and_then(|i| table.drops_of(i)).unwrap_or(0);
        Self {
            inode,
            seen,
            credit: 0,
        }
    }

    /// Events lost since the last call; at least 1 when `overrun` (the socket said ENOBUFS).
    pub fn take(&mut self, table: &mut DropTable, overrun: bool) -> u64 {
        let now = self.inode.and_then(|i| table.drops_of(i));
        let delta = now.map_or(0, |n| n.saturating_sub(self.seen));
        if let Some(n) = now {
            self.seen = n;
        }
        let paid = delta.min(self.credit);
        self.credit -= paid;
        let mut lost = delta - paid;
        if overrun && lost == 0 {
            lost = 1;
            self.credit += 1;
        }
        lost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode
0000000000000000 0   4197       00000000 0        0        0     2        0        1001
0000000000000000 12  4198       00000004 2304     0        0     2        37       1002
";

    #[test]
    fn reads_the_drops_of_one_socket() {
        assert_eq!(drops_in_table(TABLE, 1002), Some(37));
        assert_eq!(drops_in_table(TABLE, 1001), Some(0));
        assert_eq!(drops_in_table(TABLE, 9), None);
        assert_eq!(drops_in_table("garbage\n1 2 3\n", 3), None);
    }

    #[test]
    fn an_overrun_counts_at_least_one_and_is_not_counted_twice() {
        let mut none = DropTable { file: None };
        let mut o = Overruns {
            inode: None,
            seen: 0,
            credit: 0,
        };
        assert_eq!(o.take(&mut none, true), 1);
        assert_eq!(o.take(&mut none, false), 0);

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("netlink");
        let write = |drops: u64| {
            std::fs::write(
                &path,
                format!("sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode\n0 12 1 4 0 0 0 2 {drops} 7\n"),
            )
            .expect("write the fake socket table")
        };
        write(0);
        let mut table = DropTable {
            file: Some(File::open(&path).expect("open the fake socket table")),
        };
        let mut o = Overruns {
            inode: Some(7),
            seen: 0,
            credit: 0,
        };
        // ENOBUFS seen before the kernel's count moved: 1, owed.
        assert_eq!(o.take(&mut table, true), 1);
        write(5);
        table.file = Some(File::open(&path).expect("open the fake socket table"));
        assert_eq!(o.take(&mut table, false), 4, "the owed one is paid back");
        write(5);
        table.file = Some(File::open(&path).expect("open the fake socket table"));
        assert_eq!(o.take(&mut table, false), 0);
    }
}
