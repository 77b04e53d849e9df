//! Who a file request acts as.
//!
//! A file request for [`GuestUser::User`] runs its whole handler thread as the guest's
//! `user` account: before the request touches any path, the thread sets its supplementary
//! groups, then its real, effective and saved gid, then uid (the kernel's per-thread
//! `setgroups`/`setresgid`/`setresuid`, not libc's process-wide ones). From then on the
//! kernel judges every path component, symlink and permission as that user, so a symlink a
//! guest process planted cannot lead the request anywhere the user could not go itself,
//! and nothing needs checking twice (no TOCTOU). With all three uids non-zero the thread has
//! no capabilities left and cannot switch back; it ends with its request. Other streams'
//! threads keep the agent's root credentials.
//!
//! An agent that is not root (tests, debugging) cannot switch and acts as itself.

use std::io;

use rustix::process::{Gid, Uid};
use scaibunker_proto::agent::GuestUser;

use crate::account;

/// Why the thread could not take the guest user's credentials.
#[derive(Debug, thiserror::Error)]
#[error("switch this request to uid {uid}")]
pub struct SwitchUserError {
    uid: u32,
    #[source]
    source: io::Error,
}

/// Makes the calling thread act as `user` for good (see the module doc). Never returns
/// `Ok` while the thread still holds root for a [`GuestUser::User`] request.
pub fn act_as(user: GuestUser) -> Result<(), SwitchUserError> {
    if user == GuestUser::Root || !rustix::process::geteuid().is_root() {
        return Ok(());
    }
    let account = account::guest_user();
    let fail = |source| SwitchUserError {
        uid: account.uid,
        source,
    };
    let gid = Gid::from_raw(account.gid);
    let uid = Uid::from_raw(account.uid);
    rustix::thread::set_thread_groups(&[gid]).map_err(|e| fail(e.into()))?;
    rustix::thread::set_thread_res_gid(gid, gid, gid).map_err(|e| fail(e.into()))?;
    rustix::thread::set_thread_res_uid(uid, uid, uid).map_err(|e| fail(e.into()))?;
    if rustix::process::geteuid() != uid {
        return Err(fail(io::Error::other("the uid did not change")));
    }
    Ok(())
}

/// The mode bits a caller acting as `user` may set: no setuid or setgid for the guest user.
pub fn allowed_mode(user: GuestUser, mode: u32) -> u32 {
    match user {
        GuestUser::Root => mode & 0o7777,
        GuestUser::User => mode & 0o1777,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_user_loses_setuid_and_setgid() {
        assert_eq!(allowed_mode(GuestUser::User, 0o4755), 0o755);
        assert_eq!(allowed_mode(GuestUser::User, 0o2755), 0o755);
        assert_eq!(allowed_mode(GuestUser::User, 0o1777), 0o1777);
        assert_eq!(allowed_mode(GuestUser::Root, 0o4755), 0o4755);
        assert_eq!(allowed_mode(GuestUser::Root, 0o170_755), 0o755);
    }
}
