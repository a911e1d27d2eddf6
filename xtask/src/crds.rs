//! `cargo xtask crds`: the committed CRD manifests, generated from `kubetune-crds`,
//! in `crds/manifests/` and, byte for byte, in the Helm chart's `crds/`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use kubetune_crds::manifests;

/// Where the generated manifests go, relative to the workspace root.
const DIRS: [&str; 2] = ["crds/manifests", "charts/kubetune/crds"];

/// Writes every CRD to each of [`DIRS`].
pub fn write(root: &Path) -> Result<()> {
    for dir in DIRS {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("failed to create {}", dir.display()))?;
        for (file, crd) in manifests::crds() {
            let path = dir.join(file);
            std::fs::write(&path, manifests::to_yaml(&crd)?)
                .with_context(|| format!("failed to write {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// Fails when a committed manifest, in either of [`DIRS`], differs from what the
/// types generate.
pub fn check(root: &Path) -> Result<()> {
    let mut stale = Vec::new();
    for dir in DIRS {
        for (file, crd) in manifests::crds() {
            let committed = std::fs::read_to_string(root.join(dir).join(file)).unwrap_or_default();
            if committed != manifests::to_yaml(&crd)? {
                stale.push(format!("{dir}/{file}"));
            }
        }
    }
    if !stale.is_empty() {
        bail!(
            "generated CRDs are out of date ({}): run `cargo xtask crds` and commit the result",
            stale.join(", ")
        );
    }
    println!("==> crds/manifests/ and charts/kubetune/crds/ match the API types");
    Ok(())
}
