//! `cargo xtask crds`: the committed CRD manifests, generated from `kubetune-crds`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use kubetune_crds::manifests;

/// Writes every CRD to `crds/manifests/`.
pub fn write(root: &Path) -> Result<()> {
    let dir = root.join("crds/manifests");
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    for (file, crd) in manifests::crds() {
        let path = dir.join(file);
        std::fs::write(&path, manifests::to_yaml(&crd)?)
            .with_context(|| format!("failed to write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

/// Fails when a committed manifest differs from what the types generate.
pub fn check(root: &Path) -> Result<()> {
    let dir = root.join("crds/manifests");
    let mut stale = Vec::new();
    for (file, crd) in manifests::crds() {
        let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if committed != manifests::to_yaml(&crd)? {
            stale.push(file);
        }
    }
    if !stale.is_empty() {
        bail!(
            "crds/manifests/ is out of date ({}): run `cargo xtask crds` and commit the result",
            stale.join(", ")
        );
    }
    println!("==> crds/manifests/ matches the API types");
    Ok(())
}
