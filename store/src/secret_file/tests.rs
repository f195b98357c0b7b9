use super::*;

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("meta")
        .permissions()
        .mode()
        & 0o777
}

/// Names in `dir` other than `keep`: temporary files left behind.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

#[test]
fn created_file_is_0600_in_a_0700_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("a/b/key");
    create_new(&p, b"secret").expect("create");
    assert_eq!(mode(&p), 0o600);
    assert_eq!(mode(&dir.path().join("a/b")), 0o700);
    assert_eq!(read(&p).expect("read"), b"secret");
    assert_eq!(
        leftovers(&dir.path().join("a/b"), &["key"]),
        Vec::<String>::new()
    );
}

#[test]
fn existing_file_is_not_overwritten_unless_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("key");
    create_new(&p, b"first").expect("create");
    let e = create_new(&p, b"second").unwrap_err();
    assert!(matches!(e, SecretFileError::Exists { .. }), "{e}");
    assert!(e.to_string().contains("refusing to overwrite"), "{e}");
    assert_eq!(read(&p).expect("read"), b"first");
    assert_eq!(leftovers(dir.path(), &["key"]), Vec::<String>::new());
    replace(&p, b"second").expect("replace");
    assert_eq!(read(&p).expect("read"), b"second");
    assert_eq!(mode(&p), 0o600);
    assert_eq!(leftovers(dir.path(), &["key"]), Vec::<String>::new());
}

#[test]
fn replace_narrows_a_file_that_had_wider_bits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("authorized_keys");
    fs::write(&p, b"old").expect("write");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).expect("chmod");
    replace(&p, b"new").expect("replace");
    assert_eq!(mode(&p), 0o600);
    assert_eq!(read(&p).expect("read"), b"new");
}

#[test]
fn wrong_mode_is_refused_with_the_fix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("key");
    create_new(&p, b"secret").expect("create");
    for bits in [0o640, 0o604, 0o644] {
        fs::set_permissions(&p, fs::Permissions::from_mode(bits)).expect("chmod");
        let e = read(&p).unwrap_err();
        assert!(
            matches!(e, SecretFileError::Permissions { mode, .. } if mode == bits),
            "{e}"
        );
        let msg = e.to_string();
        assert!(msg.contains(&format!("mode {bits:04o}")), "{msg}");
        assert!(msg.contains("expected 0600"), "{msg}");
        assert!(msg.contains(&format!("chmod 600 {}", p.display())), "{msg}");
    }
    // Owner-only, even narrower than 0600, is fine.
    fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).expect("chmod");
    assert_eq!(read(&p).expect("0400 is private"), b"secret");
}

#[test]
fn missing_symlink_and_directory_are_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("none");
    assert!(matches!(
        read(&missing),
        Err(SecretFileError::Missing { .. })
    ));
    let real = dir.path().join("real");
    create_new(&real, b"secret").expect("create");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let e = read(&link).unwrap_err();
    assert!(matches!(e, SecretFileError::Symlink { .. }), "{e}");
    assert!(matches!(
        read(dir.path()),
        Err(SecretFileError::NotAFile { .. })
    ));
    // create_new does not write through a link either.
    assert!(matches!(
        create_new(&link, b"other"),
        Err(SecretFileError::Exists { .. })
    ));
    assert_eq!(read(&real).expect("read"), b"secret");
}

#[test]
fn a_failed_write_leaves_no_partial_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("key");
    {
        let mut staged = Staged::begin(&p).expect("begin");
        staged.write_all(b"half of a key").expect("write");
        // Dropped without a commit, as on any error before it.
    }
    assert!(!p.exists());
    assert_eq!(leftovers(dir.path(), &[]), Vec::<String>::new());
    // A commit that cannot finish (the destination is a directory) leaves
    // neither the file nor its temporary behind.
    fs::create_dir(&p).expect("mkdir");
    assert!(replace(&p, b"secret").is_err());
    assert_eq!(leftovers(dir.path(), &["key"]), Vec::<String>::new());
    assert!(p.is_dir());
}

#[test]
fn concurrent_creators_keep_one_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("key");
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8u8)
            .map(|i| {
                let p = &p;
                s.spawn(move || create_new(p, &[i; 64]).is_ok())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("join"))
            .collect()
    });
    assert_eq!(results.iter().filter(|ok| **ok).count(), 1);
    let bytes = read(&p).expect("read");
    assert_eq!(bytes.len(), 64);
    assert!(
        bytes.iter().all(|b| *b == bytes[0]),
        "one writer's whole file"
    );
    assert_eq!(leftovers(dir.path(), &["key"]), Vec::<String>::new());
}
