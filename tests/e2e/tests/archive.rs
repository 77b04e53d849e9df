//! Directory trees and files through the archive routes and `scaibunker cp`, both ways, on a
//! real microVM; archives that try to escape their directory are refused and change nothing.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use scaibunker_api::exec::ExecRequest;
use scaibunker_e2e::{Up, UpOptions, require_images};

/// Nested directories, an empty one, an executable, a 3 MB binary, a relative symlink.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("src/deep/er")).expect("dirs");
    fs::create_dir_all(root.join("empty")).expect("empty dir");
    fs::write(root.join("README"), b"hello\n").expect("file");
    let blob: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    fs::write(root.join("src/deep/er/data.bin"), blob).expect("file");
    fs::write(root.join("run.sh"), b"#!/bin/sh\necho ran\n").expect("script");
    fs::set_permissions(root.join("run.sh"), fs::Permissions::from_mode(0o755)).expect("chmod");
    symlink("src/deep", root.join("shortcut")).expect("symlink");
}

/// `(relative path, kind, mode, content or link target)` of every entry, sorted.
fn snapshot(root: &Path) -> Vec<(String, char, u32, Vec<u8>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, char, u32, Vec<u8>)>) {
        for entry in fs::read_dir(dir).expect("read_dir") {
            let path = entry.expect("entry").path();
            let rel = path
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let mode = meta.permissions().mode() & 0o7777;
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path).expect("readlink");
                out.push((rel, 'l', 0, target.display().to_string().into_bytes()));
            } else if meta.is_dir() {
                out.push((rel, 'd', mode, Vec::new()));
                walk(root, &path, out);
            } else {
                out.push((rel, 'f', mode, fs::read(&path).expect("read")));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out.sort();
    out
}

fn sh(cmd: &str) -> ExecRequest {
    ExecRequest {
        command: Some(cmd.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn trees_and_files_copy_both_ways_and_escapes_are_refused() {
    require_images(&["tiny.ext4"]).expect("guest images");
    let up = Up::start(UpOptions::default()).expect("scaibunker up gets ready");
    let client = up.client();
    let bunker = up.tiny_bunker().await;
    let id = bunker.id.as_str();
    let local = tempfile::tempdir().expect("tempdir");
    let tree = local.path().join("tree");
    make_tree(&tree);

    // Up: the directory's contents land in /home/user/data/tree (created with its parents).
    let tree_arg = tree.display().to_string();
    let (code, out, err) = up
        .cli(
            &["cp", &tree_arg, &format!("{id}:/home/user/data/tree")],
            b"",
        )
        .await;
    assert_eq!(code, 0, "{out} {err}");
    let ran = client.exec(id, &sh("/home/user/data/tree/run.sh && readlink /home/user/data/tree/shortcut && ls -A /home/user/data/tree/empty | wc -l")).await.expect("exec");
    assert_eq!(ran.stdout.as_deref(), Some("ran\nsrc/deep\n0\n"), "{ran:?}");

    // Down again: identical tree, modes and symlink included.
    let back = local.path().join("back");
    let back_arg = back.display().to_string();
    let (code, out, err) = up
        .cli(
            &["cp", &format!("{id}:/home/user/data/tree"), &back_arg],
            b"",
        )
        .await;
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(snapshot(&back), snapshot(&tree));

    // Single files: into a directory with a trailing slash, and back to a named file.
    let readme = tree.join("README").display().to_string();
    let (code, _, err) = up.cli(&["cp", &readme, &format!("{id}:/tmp/")], b"").await;
    assert_eq!(code, 0, "{err}");
    let copy = local.path().join("readme.copy");
    let copy_arg = copy.display().to_string();
    let (code, _, err) = up
        .cli(&["cp", &format!("{id}:/tmp/README"), &copy_arg], b"")
        .await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(fs::read(&copy).expect("copy"), b"hello\n");

    // A second upload merges: new files added, existing ones replaced, others kept.
    fs::write(tree.join("README"), b"changed\n").expect("edit");
    fs::write(tree.join("NEW"), b"new\n").expect("new file");
    fs::remove_file(tree.join("run.sh")).expect("rm");
    let (code, _, err) = up
        .cli(
            &["cp", &tree_arg, &format!("{id}:/home/user/data/tree")],
            b"",
        )
        .await;
    assert_eq!(code, 0, "{err}");
    let merged = client
        .exec(
            id,
            &sh("cat /home/user/data/tree/README /home/user/data/tree/NEW; test -x /home/user/data/tree/run.sh && echo kept"),
        )
        .await
        .expect("exec");
    assert_eq!(
        merged.stdout.as_deref(),
        Some("changed\nnew\nkept\n"),
        "{merged:?}"
    );

    // Escapes: a `..` entry, and a symlink out followed by a file through it.
    let mut header = tar::Header::new_old();
    let name = b"../escaped";
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.set_size(1);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    let mut dotdot = header.as_bytes().to_vec();
    dotdot.extend_from_slice(b"x");
    dotdot.resize(1024 + 1024, 0);
    let mut builder = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    builder
        .append_link(&mut link, "out", "/etc")
        .expect("symlink entry");
    let mut file = tar::Header::new_gnu();
    file.set_size(4);
    file.set_mode(0o644);
    builder
        .append_data(&mut file, "out/evil", &b"evil"[..])
        .expect("file entry");
    let through_link = builder.into_inner().expect("tar");
    for (what, tar) in [("`..`", dotdot), ("symlink", through_link)] {
        let refused = client
            .write_archive(id, "/home/user/data/jail", tar)
            .await
            .err()
            .unwrap_or_else(|| panic!("{what} archive accepted"));
        assert_eq!(refused.code(), Some("INVALID_ARCHIVE"), "{what}: {refused}");
    }
    let left = client
        .exec(id, &sh("ls /home/user/data; test -e /etc/evil && echo EVIL; test -e /home/user/data/escaped && echo ESCAPED; true"))
        .await
        .expect("exec");
    assert_eq!(
        left.stdout.as_deref(),
        Some("tree\n"),
        "nothing else was created: {left:?}"
    );

    // Archive downloads of a file, or of nothing, say so.
    let not_dir = client
        .read_archive_stream(id, "/home/user/data/tree/README")
        .await
        .expect_err("a file");
    assert_eq!(not_dir.code(), Some("NOT_A_DIRECTORY"), "{not_dir}");
    let missing = client
        .read_archive_stream(id, "/nope")
        .await
        .expect_err("missing");
    assert_eq!(missing.code(), Some("FILE_NOT_FOUND"), "{missing}");
    client.delete_bunker(id).await.expect("delete");
}
