//! Debian packages the xtask's commands need (the real node's containerd and runc,
//! the images' buildah and the trainer's libgloo-dev), installed with apt-get when
//! missing, so that a fresh machine of this project's kind needs no manual step.

use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

/// Installs those of `packages` (a package and a file that shows it is installed) whose
/// file is missing; `user` names what needs them, for the messages. Needs root when
/// something is missing.
pub(crate) fn install_missing(packages: &[(&str, &str)], user: &str) -> Result<()> {
    let missing = missing(packages, Path::exists);
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "{user} needs Debian packages that are missing; as root: apt-get install {}",
            missing.join(" ")
        );
    }
    println!(
        "==> installing the Debian packages {user} needs: {}",
        missing.join(" ")
    );
    // Debian starts daemons from their maintainer scripts unless policy-rc.d says no;
    // the real node's run as the cluster's own processes instead.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy.exists();
    if ours {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")
            .and_then(|()| std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755)))
            .with_context(|| format!("failed to write {}", policy.display()))?;
    }
    let installed = apt(&["update", "-qq"]).and_then(|()| {
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&missing);
        apt(&args)
    });
    if ours {
        let _ = std::fs::remove_file(policy);
    }
    installed
}

/// The packages whose file `installed` does not find.
fn missing<'a>(packages: &[(&'a str, &str)], installed: impl Fn(&Path) -> bool) -> Vec<&'a str> {
    packages
        .iter()
        .filter(|(_, file)| !installed(Path::new(file)))
        .map(|(package, _)| *package)
        .collect()
}

fn apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .context("failed to run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_packages_whose_file_is_absent_are_installed() {
        let packages = [
            ("buildah", "/usr/bin/buildah"),
            ("libgloo-dev", "/usr/include/gloo/allreduce.h"),
        ];
        let missing = missing(&packages, |file| file == Path::new("/usr/bin/buildah"));
        assert_eq!(missing, ["libgloo-dev"]);
    }
}
