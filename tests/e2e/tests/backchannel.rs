//! The agent backchannel end to end through `scaibunker up`: a program in an `isolated`
//! bunker, as the guest's plain user, calls the platform as its bunker over
//! `/run/scaibunker/api.sock` (through `scaibunker-guest`): its own record whatever identity
//! it claims, metadata and events that show on the public API, a child it creates, lists and
//! deletes, a wider child refused, another bunker out of reach, a burst limited, and a
//! clone restored from its memory speaking as the clone. At most two VMs run at once.

use scaibunker_api::bunkers::CreateBunker;
use scaibunker_api::exec::ExecRequest;
use scaibunker_api::snapshots::{CreateSnapshot, SnapshotKind};
use scaibunker_e2e::{Up, UpOptions, require_images};
use serde_json::Value;

const GUEST: &str = "/run/scaibunker/scaibunker-guest";

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: Some(cmd.into()),
        ..Default::default()
    }
}

/// Runs `args` of `scaibunker-guest` in `bunker`: `(exit code, stdout as JSON or a string)`.
async fn guest(up: &Up, bunker: &str, args: &str) -> (Option<i32>, Value, String) {
    let out = up
        .client()
        .exec(bunker, &sh(&format!("{GUEST} {args}")))
        .await
        .expect("exec");
    let stdout = out.stdout.clone().unwrap_or_default();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::String(stdout.clone()));
    (out.exit_code, json, out.stderr.unwrap_or_default())
}

#[tokio::test]
async fn a_bunker_calls_the_platform_as_itself() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();
    let parent = up.tiny_bunker().await;
    assert_eq!(
        parent.network_profile,
        scaibunker_api::bunkers::NetworkProfile::Isolated
    );

    // Its own record, as the guest's plain user (the exec default), with no network.
    let (code, v, err) = guest(&up, &parent.id, "self").await;
    assert_eq!(code, Some(0), "{v} {err}");
    assert_eq!(v["data"]["id"], parent.id.as_str());
    assert_eq!(v["data"]["tenant_id"], parent.tenant_id.as_str());
    let who = client.exec(&parent.id, &sh("id -u")).await.expect("exec");
    assert_eq!(who.stdout.as_deref().map(str::trim), Some("1000"));

    // Another bunker: its id in a forged header is ignored, and it is out of reach.
    let other = up.tiny_bunker().await;
    let (code, v, _) = guest(
        &up,
        &parent.id,
        &format!(
            "-H 'X-Bunker-Id: {0}' -H 'X-Worker-Id: x' -H 'Authorization: Bearer {1}' self",
            other.id,
            up.key()
        ),
    )
    .await;
    assert_eq!(code, Some(0));
    assert_eq!(
        v["data"]["id"],
        parent.id.as_str(),
        "forged identity ignored: {v}"
    );
    let (code, v, _) = guest(&up, &parent.id, &format!("children delete {}", other.id)).await;
    assert_eq!(code, Some(1));
    assert_eq!(v["error"]["code"], "BUNKER_NOT_FOUND", "{v}");
    let (code, _, err) = guest(
        &up,
        &parent.id,
        &format!("request GET /v1/self/../../bunkers/{}", other.id),
    )
    .await;
    assert_eq!(code, Some(1));
    assert!(err.contains("HTTP 404"), "{err}");
    assert_eq!(
        client.bunker(&other.id).await.expect("get").status,
        "running",
        "untouched"
    );
    client
        .delete_bunker(&other.id)
        .await
        .expect("delete the other bunker");

    // Metadata and events land where the public API shows them.
    let (code, v, err) = guest(&up, &parent.id, "metadata set stage two").await;
    assert_eq!(code, Some(0), "{v} {err}");
    let record = client.bunker(&parent.id).await.expect("get");
    assert_eq!(
        record.label_set.get("stage").map(String::as_str),
        Some("two")
    );
    let (code, v, _) = guest(&up, &parent.id, "event progress 'half way'").await;
    assert_eq!(code, Some(0), "{v}");
    let event_id = v["data"]["id"].as_str().expect("audit id").to_owned();
    let audit: Value = reqwest::Client::new()
        .get(format!("{}/v1/audit-log?action=bunker.event", up.url()))
        .bearer_auth(up.key())
        .send()
        .await
        .expect("audit")
        .json()
        .await
        .expect("json");
    let row = audit["data"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == event_id.as_str()))
        .unwrap_or_else(|| panic!("the event is in the audit: {audit}"));
    assert_eq!(row["actor_type"], "bunker");
    assert_eq!(row["actor_id"], parent.id.as_str());

    // A child wider than the parent is refused; a narrow one is created, listed, deleted.
    let (code, v, _) = guest(
        &up,
        &parent.id,
        r#"children create '{"network_profile":"unrestricted"}'"#,
    )
    .await;
    assert_eq!(code, Some(1));
    assert_eq!(v["error"]["code"], "NETWORK_PROFILE_DENIED", "{v}");
    let (code, v, err) = guest(
        &up,
        &parent.id,
        r#"children create '{"memory_mb":256,"wait":true}'"#,
    )
    .await;
    assert_eq!(code, Some(0), "{v} {err}");
    let child = v["data"]["id"].as_str().expect("child id").to_owned();
    assert_eq!(v["data"]["status"], "running", "{v}");
    assert_eq!(v["data"]["lifecycle_mode"], "ephemeral");
    assert_eq!(
        v["data"]["owner_id"],
        parent.owner_id.as_str(),
        "charged to the creator"
    );
    assert_eq!(v["data"]["image_id"], parent.image_id.as_str());
    let (code, v, _) = guest(&up, &parent.id, "children list").await;
    assert_eq!(code, Some(0));
    let ids: Vec<&str> = v["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["id"].as_str())
        .collect();
    assert_eq!(ids, vec![child.as_str()]);
    let (code, v, _) = guest(&up, &parent.id, &format!("children delete {child}")).await;
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["data"]["status"], "terminated");
    assert_eq!(
        client.bunker(&child).await.expect("get").status,
        "terminated"
    );

    // A burst past the worker's bucket is refused, with the controller left alone.
    let out = client
        .exec(&parent.id, &sh(&format!("{GUEST} burst 120 self")))
        .await
        .expect("exec");
    let counts = out.stdout.unwrap_or_default();
    eprintln!("a burst of 120 calls: {}", counts.trim());
    assert!(counts.contains("429="), "{counts}");
    assert!(counts.contains("200="), "{counts}");

    // A clone of the parent's memory is its own bunker at once: nothing in the guest said
    // who it was, so there is nothing stale to say.
    let full = client
        .snapshot_bunker(
            &parent.id,
            &CreateSnapshot {
                kind: Some(SnapshotKind::Full),
                expires_in_s: Some(600),
            },
        )
        .await
        .expect("full snapshot");
    client.delete_bunker(&parent.id).await.expect("delete");
    let clone = client
        .create_bunker(&CreateBunker {
            snapshot_id: Some(full.id.clone()),
            ..Default::default()
        })
        .await
        .expect("restore");
    assert_eq!(clone.status, "running", "{:?}", clone.failure_reason);
    let (code, v, err) = guest(&up, &clone.id, "self").await;
    assert_eq!(code, Some(0), "{v} {err}");
    assert_eq!(
        v["data"]["id"],
        clone.id.as_str(),
        "the clone speaks as itself"
    );
    let (code, v, _) = guest(&up, &clone.id, "children list").await;
    assert_eq!(code, Some(0));
    assert_eq!(
        v["data"],
        serde_json::json!([]),
        "the parent's children are not the clone's"
    );
    client
        .delete_bunker(&clone.id)
        .await
        .expect("delete the clone");
}
