//! How bunkers and times read on the wire: the public record of a bunker row, RFC 3339
//! timestamps and the API code for a worker's error code.

use scaibunker_api::bunkers as api;
use scaibunker_api::codes;

use crate::store::bunkers::BunkerRow;

/// Unix milliseconds as RFC 3339 UTC (`2026-11-28T10:33:54.123Z`).
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{millis:03}Z")
}

/// Parses an RFC 3339 time (`2026-11-28T10:00:00Z`, any offset) into Unix milliseconds.
pub fn parse_rfc3339(t: &str) -> Option<i64> {
    // Any offset (`Z`, `+02:00`, `-05:30`), as RFC 3339 allows; the instant is what counts.
    let ts: jiff::Timestamp = t.parse().ok()?;
    Some(ts.as_millisecond())
}

/// The public record of a bunker row. `env_vars` are never included.
pub fn to_api(r: &BunkerRow) -> api::Bunker {
    let parse_mode = |m: &str| match m {
        "session" => api::LifecycleMode::Session,
        "persistent" => api::LifecycleMode::Persistent,
        _ => api::LifecycleMode::Ephemeral,
    };
    let parse_profile = |m: &str| match m {
        "registry" => api::NetworkProfile::Registry,
        "allowlisted" => api::NetworkProfile::Allowlisted,
        "unrestricted" => api::NetworkProfile::Unrestricted,
        "transit" => api::NetworkProfile::Transit,
        _ => api::NetworkProfile::Isolated,
    };
    let parse_session = |m: &str| match m {
        "scaicore" => api::SessionType::Scaicore,
        "scaiwave" => api::SessionType::Scaiwave,
        "api" => api::SessionType::Api,
        _ => api::SessionType::Standalone,
    };
    api::Bunker {
        id: r.id.clone(),
        tenant_id: r.tenant_id.clone(),
        owner_id: r.owner_id.clone(),
        name: r.name.clone(),
        image: r.image_name.clone(),
        image_id: r.image_id.clone(),
        snapshot_id: r.snapshot_id.clone(),
        lifecycle_mode: parse_mode(&r.lifecycle_mode),
        status: r.status.clone(),
        network_profile: parse_profile(&r.network_profile),
        network_allowlist: serde_json::from_str(&r.network_allowlist).unwrap_or_default(),
        cpu_millicores: r.cpu_millicores as u64,
        memory_mb: r.memory_mb as u64,
        disk_mb: r.disk_mb as u64,
        gpu_count: r.gpu_count as u64,
        gpu_type: r.gpu_type.clone(),
        max_lifetime_s: r.max_lifetime_s.map(|v| v as u64),
        idle_timeout_s: r.idle_timeout_s as u64,
        session_type: parse_session(&r.session_type),
        session_ref: r.session_ref.clone(),
        label_set: serde_json::from_str(&r.label_set).unwrap_or_default(),
        interfaces: serde_json::from_str(&r.interfaces).unwrap_or_default(),
        bandwidth_mbit: r.bandwidth_mbit.map(|v| v as u64),
        worker_id: r.worker_id.clone(),
        failure_reason: r.failure_reason.clone(),
        created_at: rfc3339(r.created_at),
        started_at: r.started_at.map(rfc3339),
        last_activity_at: r.last_activity_at.map(rfc3339),
        terminated_at: r.terminated_at.map(rfc3339),
    }
}

/// The API code a worker's error code maps to, with its HTTP status.
pub fn worker_code_status(code: &str) -> (u16, &'static str) {
    match code {
        "FILE_NOT_FOUND" => (404, codes::FILE_NOT_FOUND),
        "IS_A_DIRECTORY" => (409, codes::IS_A_DIRECTORY),
        "NOT_A_DIRECTORY" => (409, codes::NOT_A_DIRECTORY),
        "DIRECTORY_NOT_EMPTY" => (409, codes::DIRECTORY_NOT_EMPTY),
        "INVALID_PATH" => (422, codes::INVALID_PATH),
        "INVALID_ARCHIVE" => (422, codes::INVALID_ARCHIVE),
        "FILE_PERMISSION_DENIED" => (403, codes::FILE_PERMISSION_DENIED),
        "VALIDATION_ERROR" => (422, codes::VALIDATION_ERROR),
        "FILE_TOO_LARGE" => (413, codes::FILE_TOO_LARGE),
        "BUNKER_NOT_RUNNING" | "BUNKER_NOT_FOUND" => (409, codes::BUNKER_NOT_RUNNING),
        // A create that reached a worker as it began to stop: wait, or add a worker.
        "WORKER_STOPPING" => (503, codes::WORKER_UNAVAILABLE),
        _ => (502, codes::WORKER_ERROR),
    }
}

/// The network a worker sets up for a bunker row.
pub fn network_spec(r: &BunkerRow) -> scaibunker_proto::worker::NetworkSpec {
    use scaibunker_core::spec::NetworkProfile as Core;
    use scaibunker_proto::worker::NetworkProfile as P;
    let profile = match Core::parse(&r.network_profile).unwrap_or_default() {
        Core::Isolated => P::Isolated,
        Core::Registry => P::Registry,
        Core::Allowlisted => P::Allowlisted,
        Core::Unrestricted => P::Unrestricted,
        Core::Transit => P::Transit,
    };
    let allowlist = if profile == P::Allowlisted {
        serde_json::from_str(&r.network_allowlist).unwrap_or_default()
    } else {
        Vec::new()
    };
    // In the order the create checked (`eth1`, `eth2`, …): the guest names its NICs so.
    let interfaces = if profile == P::Transit {
        serde_json::from_str::<Vec<api::Interface>>(&r.interfaces)
            .unwrap_or_default()
            .into_iter()
            .map(|i| scaibunker_proto::worker::TransitInterface {
                bridge: i.bridge_name,
                mac: i.mac,
                spoof_guard: i.spoof_guard,
            })
            .collect()
    } else {
        Vec::new()
    };
    scaibunker_proto::worker::NetworkSpec {
        profile,
        bandwidth_mbit: r.bandwidth_mbit.and_then(|b| u64::try_from(b).ok()),
        allowlist,
        interfaces,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_862_034_123), "2026-11-28T10:33:54.123Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn rfc3339_parses_what_it_formats() {
        for ms in [0, 951_782_400_000, 1_795_862_034_123] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(
            parse_rfc3339("2026-11-28T10:33:54Z"),
            Some(1_795_862_034_000)
        );
        // Any RFC 3339 offset names the same instant (what OpenAPI's `date-time` allows).
        assert_eq!(
            parse_rfc3339("2026-11-28T12:33:54+02:00"),
            Some(1_795_862_034_000)
        );
        assert_eq!(
            parse_rfc3339("2026-11-28T10:33:54.123-00:00"),
            Some(1_795_862_034_123)
        );
        for bad in [
            "",
            "2026-11-28",
            "2026-13-01T00:00:00Z",
            "2026-11-28T10:33:54",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
