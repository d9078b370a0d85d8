//! The policy loader: any text as a tenant's policy file is loaded or reported with its file,
//! line and reason, never a panic.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

/// A policies/ tree with the shipped schema, lists and packs, made once.
static TREE: LazyLock<(tempfile::TempDir, PathBuf)> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("policies");
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    for sub in ["schemas", "lists", "secrets", "packs", "tenants"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
        if sub == "tenants" {
            continue;
        }
        for entry in std::fs::read_dir(shipped.join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), root.join(sub).join(entry.file_name())).unwrap();
        }
    }
    (dir, root)
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let root = &TREE.1;
    std::fs::write(root.join("tenants/t.toml"), text).unwrap();
    if let Err(errors) = callgate::policy::Policies::load(root, b"fuzz") {
        for e in errors {
            assert!(!e.to_string().is_empty());
        }
    }
});
